"""`finetune chat HOME` (or `ADAPTER`): talk to the tuned model in the terminal.

Type a message and the persona answers; `/reset` forgets the conversation, `/quit` (or Ctrl-D)
ends. Works with piped input too, one message per line. An adapter trained with the persona's memory
recalls notes into each prompt as the bot does; `--show-memory` prints the notes each reply was given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .model_loading import DTYPE_CHOICES, QUANTIZE_CHOICES, ModelLoadError, load_persona_model
from .person_memory import MEMORY_FILE, PersonMemory, PersonMemoryError, notes
from .profile import ProfileError, read_profile
from .prompt import MEMORY_SHARE


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", type=Path, metavar="HOME|ADAPTER",
                   help="a persona home (personas/NAME: its adapter/, else merged/), or a folder written by "
                   "`finetune train` (or `merge`)")
    p.add_argument("--base", default=None, help="load the base model from here instead of the manifest's id (same model)")
    p.add_argument("--name", default="あなた", help="your speaker name in the conversation (default: あなた)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--memory-notes", type=int, default=None, metavar="K",
                   help="notes recalled from the persona's memory per reply (default: as trained; 0: none)")
    p.add_argument("--profile", type=Path, default=None, help="the persona's profile file, at the top of every prompt")
    p.add_argument("--show-memory", action="store_true", help="print the notes each reply was given")


def run(args: argparse.Namespace) -> int:
    from .generation import GenerationSettings, fit_context, generate_replies
    from .prompt import ChatTurn, fit_notes

    try:
        profile = read_profile(args.profile) if args.profile is not None else ()
        loaded = load_persona_model(args.adapter, base=args.base, quantize=args.quantize, device=args.device, dtype=args.dtype)
        memory, k = _memory(args, loaded.manifest)
    except (ModelLoadError, ProfileError, PersonMemoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    manifest = loaded.manifest
    settings = GenerationSettings.from_manifest(
        manifest.generation, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p
    )
    budget = max(16, manifest.max_length - settings.max_new_tokens)
    speakers = [*manifest.speakers, args.name]
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{manifest.persona} ({args.adapter}). /reset forgets, /quit ends.")
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
        history.append(ChatTurn(args.name, text))
        recalled = notes(memory.recall(history, k)) if memory is not None else []
        if args.show_memory:
            shown = fit_notes(loaded.tokenizer, recalled, budget // MEMORY_SHARE)
            for note in shown:
                for turn in note.turns:
                    print(f"  (memory {note.date}) {turn.speaker}: {turn.text}", flush=True)
            if not shown:
                print("  (memory: nothing recalled)", flush=True)
        prompt = fit_context(loaded.tokenizer, history, manifest.persona, manifest.template, budget,
                             memory=recalled, profile=profile)
        [(reply, _)] = generate_replies(loaded.model, loaded.tokenizer, [prompt], settings, speakers, seed=args.seed)
        history.append(ChatTurn(manifest.persona, reply))
        print(f"{manifest.persona}: {reply if reply else '…'}", flush=True)
    return 0


def _memory(args: argparse.Namespace, manifest) -> tuple[PersonMemory | None, int]:
    """The adapter's memory and how many notes a reply recalls; (None, 0) when it has none or 0 is asked."""
    k = args.memory_notes if args.memory_notes is not None else int(manifest.memory.get("notes") or 0)
    if k < 0:
        raise PersonMemoryError("--memory-notes must be >= 0")
    if k == 0:
        return None, 0
    if not (Path(args.adapter) / MEMORY_FILE).is_file():
        if args.memory_notes:
            raise PersonMemoryError(f"{args.adapter} holds no {MEMORY_FILE}: it was trained without the persona's memory")
        return None, 0
    return PersonMemory.load(args.adapter), k

