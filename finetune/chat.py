"""`finetune chat HOME` (or `ADAPTER`): talk to the tuned model in the terminal.

Type a message and the persona answers; `/reset` forgets the conversation, `/quit` (or Ctrl-D)
ends. Works with piped input too, one message per line (`--echo` prints each before its reply). An
adapter trained with the persona's memory recalls notes into each prompt as the bot does;
`--show-memory` prints the notes each reply was given.

`--system` answers the way one of the eval's systems does (eval_models.SYSTEMS): `base` and `prompt-only`
switch the LoRA off, and need no adapter at all: a persona home or dataset that `prepare` made and a base
model (`--base`) are enough for prompt-only, the base with the persona's memory and a few of their own messages
as examples in the prompt. `make demo` talks to 美咲 that way on Gemma 3 270M.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

from .dataset_files import DatasetError, dataset_persona
from .eval_models import SYSTEMS, SystemSpec
from .model_loading import DTYPE_CHOICES, QUANTIZE_CHOICES, LoadedModel, ModelLoadError, load_persona_model
from .person_memory import MEMORY_FILE, PersonMemory, PersonMemoryError, reply_notes
from .profile import ProfileError, read_profile
from .prompt import MEMORY_SHARE

DEFAULT_NOTES = 3  # notes a reply recalls where no adapter says how many it learned with (as `eval`)
FALLBACK_CONTEXT = 2048  # a base whose config does not say its context length


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", type=Path, metavar="HOME|ADAPTER|DATASET",
                   help="a persona home (personas/NAME: its adapter/, else merged/; with --system base or prompt-only "
                   "its dataset/ is enough), a folder written by `finetune train` (or `merge`), or a dataset folder")
    p.add_argument("--base", default=None,
                   help="the base model: load it from here instead of the adapter manifest's id (same model); "
                   "without an adapter, the model to answer with")
    p.add_argument("--system", choices=list(SYSTEMS), default=None,
                   help="answer as this system of `eval` does: tuned (the LoRA), hybrid (the LoRA with the persona's "
                   "memory), base (the base model alone), prompt-only (the base with the memory and a few of the "
                   "persona's own messages as examples). Default: the adapter as it was trained")
    p.add_argument("--data", type=Path, default=None, metavar="DATASET",
                   help="the prepared dataset whose persona and memory a base without an adapter answers with "
                   "(default: the persona home's dataset/)")
    p.add_argument("--name", default="あなた", help="your speaker name in the conversation (default: あなた)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--memory-notes", type=int, default=None, metavar="K",
                   help="notes recalled from the persona's memory per reply (default: as trained, 3 for a system "
                   "with memory on a base; 0: none)")
    p.add_argument("--profile", type=Path, default=None, help="the persona's profile file, at the top of every prompt")
    p.add_argument("--show-memory", action="store_true", help="print the notes each reply was given")
    p.add_argument("--echo", action="store_true",
                   help="with piped input, print each message (as `NAME: text`) before its reply: a transcript")


@dataclass
class Speaker:
    """Everything a reply needs besides the conversation: the model and how it is prompted."""

    loaded: LoadedModel
    persona: str
    template: str
    settings: object  # GenerationSettings
    speakers: list[str]
    budget: int  # prompt tokens, room left for the reply
    memory: PersonMemory | None
    notes: int  # recalled per reply
    examples: int  # the persona's own messages shown as examples (prompt-only)
    lora_off: bool  # the LoRA switched off for each reply (base, prompt-only on an adapter)


def run(args: argparse.Namespace) -> int:
    from .generation import fit_context, generate_replies
    from .prompt import ChatTurn, fit_notes

    spec = SYSTEMS[args.system] if args.system else None
    try:
        if args.memory_notes is not None and args.memory_notes < 0:
            raise PersonMemoryError("--memory-notes must be >= 0")
        profile = read_profile(args.profile) if args.profile is not None else ()
        speaker = _speaker(args, spec)
    except (ModelLoadError, ProfileError, PersonMemoryError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    loaded = speaker.loaded
    interactive = sys.stdin.isatty()
    if interactive:
        system = f", {spec.name}" if spec else ""
        print(f"{speaker.persona} ({args.adapter}{system}). /reset forgets, /quit ends.")
    history: list[ChatTurn] = []
    while True:
        try:
            line = input(f"{args.name}> " if interactive else "")
        except EOFError:
            break
        text = line.replace("\\n", "\n").strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text == "/reset":
            history.clear()
            print("(forgot the conversation)")
            continue
        if args.echo and not interactive:
            print(f"{args.name}: {text}", flush=True)
        history.append(ChatTurn(args.name, text))
        recalled = []
        if speaker.memory is not None:
            recalled = reply_notes(speaker.memory, history, speaker.notes, examples=speaker.examples,
                                   seed=args.seed or 0, key=args.name)
        if args.show_memory:
            shown = fit_notes(loaded.tokenizer, recalled, speaker.budget // MEMORY_SHARE)
            for note in shown:
                for turn in note.turns:
                    print(f"  (memory {note.date}) {turn.speaker}: {turn.text}", flush=True)
            if not shown:
                print("  (memory: nothing recalled)", flush=True)
        prompt = fit_context(loaded.tokenizer, history, speaker.persona, speaker.template, speaker.budget,
                             memory=recalled, profile=profile)
        with loaded.model.disable_adapter() if speaker.lora_off else contextlib.nullcontext():
            [(reply, _)] = generate_replies(loaded.model, loaded.tokenizer, [prompt], speaker.settings,
                                            speaker.speakers, seed=args.seed)
        history.append(ChatTurn(speaker.persona, reply))
        print(f"{speaker.persona}: {reply if reply else '…'}", flush=True)
    return 0


def _speaker(args: argparse.Namespace, spec: SystemSpec | None) -> Speaker:
    """The model and its prompting for `args`: an adapter (or merged folder) as trained or as `spec` says, or, for
    a system without the LoRA and no adapter, the `--base` model with the dataset's persona and memory."""
    from .generation import GenerationSettings, prompt_budget

    overrides = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    if args.adapter is not None and _is_dataset(args.adapter):
        args.data, args.adapter = args.data or args.adapter, None
    if args.adapter is None:
        if spec is None or spec.lora:
            raise ModelLoadError(f"{args.data} holds a dataset, no adapter: train one (`python -m finetune train`), "
                                 "or talk to the base model alone with --system base or --system prompt-only and --base")
        if args.base is None:
            raise ModelLoadError(f"--system {spec.name} without an adapter needs --base, the model to answer with "
                                 "(e.g. --base \"$(python -m finetune get-base gemma-3-270m)\")")
        persona = dataset_persona(args.data)  # before the model loads: a wrong folder fails in a second
        memory = _memory_of(args.data, spec) if spec.memory or args.memory_notes else None
        from .model_loading import load_base_model

        loaded = load_base_model(args.base, quantize=args.quantize, device=args.device, dtype=args.dtype)
        loaded.model.eval()
        settings = GenerationSettings.from_manifest({}, **overrides)
        # The whole context the model serves (as the bot and `eval` give a base), not a training length.
        budget = prompt_budget(loaded.model, settings.max_new_tokens, FALLBACK_CONTEXT)
        notes = _notes(args, spec, learned=0) if memory is not None else 0
        return Speaker(loaded, persona, "transcript", settings, [args.name], budget, memory, notes,
                       spec.examples if notes > 0 else 0, lora_off=False)

    loaded = load_persona_model(args.adapter, base=args.base, quantize=args.quantize, device=args.device, dtype=args.dtype)
    manifest = loaded.manifest
    lora_off = spec is not None and not spec.lora
    if lora_off and not hasattr(loaded.model, "disable_adapter"):
        raise ModelLoadError(f"{args.adapter} is a merged model: it has no LoRA to switch off for --system {spec.name}; "
                             "give the persona's dataset and --base instead")
    settings = GenerationSettings.from_manifest(manifest.generation, **overrides)
    # The bot's budget on this model (its whole served context), so that chat shows what the bot would say.
    budget = prompt_budget(loaded.model, settings.max_new_tokens, manifest.max_length)
    learned = int(manifest.memory.get("notes") or 0)
    notes = _notes(args, spec, learned)
    memory = None
    if notes > 0:
        folder = args.data if args.data is not None else args.adapter
        if (Path(folder) / MEMORY_FILE).is_file():
            memory = PersonMemory.load(folder)
        elif args.memory_notes or (spec is not None and spec.memory):
            raise PersonMemoryError(f"{folder} holds no {MEMORY_FILE}: it was trained without the persona's memory "
                                    "(give the dataset's with --data)")
    notes = notes if memory is not None else 0
    return Speaker(loaded, manifest.persona, manifest.template, settings, [*manifest.speakers, args.name], budget,
                   memory, notes, spec.examples if spec and notes > 0 else 0, lora_off)


def _notes(args: argparse.Namespace, spec: SystemSpec | None, learned: int) -> int:
    """Notes a reply recalls: --memory-notes; else as the adapter learned (the default system); else 3 for a system
    with memory and none for one without."""
    if args.memory_notes is not None:
        return args.memory_notes
    if spec is None:
        return learned
    return (learned or DEFAULT_NOTES) if spec.memory else 0


def _memory_of(folder: Path, spec: SystemSpec) -> PersonMemory:
    if not (Path(folder) / MEMORY_FILE).is_file():
        raise PersonMemoryError(f"{folder} holds no {MEMORY_FILE}, which --system {spec.name} answers with "
                                "(`python -m finetune prepare` writes it: run it again for this dataset)")
    return PersonMemory.load(folder)


def _is_dataset(folder: Path) -> bool:
    """A folder `prepare` wrote (not an adapter or merged model, which hold bunshin.json)."""
    folder = Path(folder)
    return (folder / "stats.json").is_file() and not (folder / "bunshin.json").is_file()
