"""The model systems of `finetune eval` (and of the short eval that ends `train`).

Four ways of answering (SYSTEMS): the base model; tuned (the LoRA); prompt-only (the base with the persona's
memory and a few of their messages as examples in the prompt); hybrid (the LoRA with the memory).

Replies are generated exactly as the bot would answer the same conversation: the bot's prompt
renderer and context fitting (model_backend.ModelBackend), the adapter's generation settings, the slot
engine where it serves the model (plain batched `generate()` where it does not), and one seed for
both systems, so base and tuned draw from the same random stream.

The base model is the tuned one with its LoRA switched off (peft's `disable_adapter()`), not a
second copy in memory. The slot engine captures its CUDA graphs inside that switch, so the graphs
replay the base alone; the tuned system gets an engine of its own.

The loss is what `train` reports: the mean loss per reply token (EOS included) of the real replies,
on the same samples as everything else in the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .generation import GenerationSettings, prompt_budget
from .model_loading import LoadedModel
from .prompt import as_turns


@dataclass
class ModelSystem:
    replies: list[str]
    loss: float | None
    seconds: float  # generating and scoring, for the progress line


@dataclass(frozen=True)
class SystemSpec:
    """One way of answering: with or without the LoRA, with or without the persona's memory in the prompt."""

    name: str
    lora: bool  # the adapter on (tuned, hybrid) or switched off (base, prompt-only)
    memory: bool  # recalled notes before the reply
    examples: int = 0  # a few of the person's own messages shown as notes too (prompt-only: style by example)


PROMPT_EXAMPLES = 4
SYSTEMS = {
    "base": SystemSpec("base", lora=False, memory=False),
    "tuned": SystemSpec("tuned", lora=True, memory=False),
    "prompt-only": SystemSpec("prompt-only", lora=False, memory=True, examples=PROMPT_EXAMPLES),
    "hybrid": SystemSpec("hybrid", lora=True, memory=True),
}

# notes_for(spec, index): the memory notes of the index-th context's prompt for that system.
NotesFor = Callable[[SystemSpec, int], list]


def base_and_tuned(
    loaded: LoadedModel,
    *,
    persona: str,
    template: str,
    settings: GenerationSettings,
    speakers: list[str],
    max_length: int,
    samples: list[dict],
    seed: int,
    slots: int = 32,
    progress: Callable[[str, int], None] | None = None,
    with_loss: bool = True,
    notes_for: NotesFor | None = None,
) -> dict[str, ModelSystem]:
    """{"base": ..., "tuned": ...} for a peft model; {"tuned": ...} for a model without a LoRA to switch off
    (a merged folder), since its base is not in memory. `with_loss` False: no loss is computed (None).
    With `notes_for`, "tuned" answers with the memory, as the bot serves an adapter trained with one."""
    specs = [SYSTEMS["base"], replace(SYSTEMS["tuned"], memory=notes_for is not None)]
    return model_systems(loaded, specs, persona=persona, template=template, settings=settings, speakers=speakers,
                         max_length=max_length, contexts=[s["context"] for s in samples], seed=seed, slots=slots,
                         progress=progress, loss_samples=samples if with_loss else None, notes_for=notes_for)


def model_systems(
    loaded: LoadedModel,
    specs: list[SystemSpec],
    *,
    persona: str,
    template: str,
    settings: GenerationSettings,
    speakers: list[str],
    max_length: int,
    contexts: list[list],
    seed: int,
    slots: int = 32,
    progress: Callable[[str, int], None] | None = None,
    loss_samples: list[dict] | None = None,
    notes_for: NotesFor | None = None,
    profile: Sequence[str] = (),
) -> dict[str, ModelSystem]:
    """Replies (and the real replies' loss, for `loss_samples`, the samples `contexts` came from) per system.

    Systems without the LoRA are skipped for a model that has none to switch off (a merged folder). Memory
    systems need `notes_for`; they also carry the `profile` (the others never see one)."""
    has_lora = hasattr(loaded.model, "disable_adapter")
    systems: dict[str, ModelSystem] = {}
    for spec in specs:
        if spec.memory and notes_for is None:
            raise ValueError(f"system {spec.name} answers with memory, but there is none")
        if not spec.lora and not has_lora:
            continue
        memories = [notes_for(spec, i) for i in range(len(contexts))] if spec.memory else None

        def one(spec=spec, memories=memories) -> ModelSystem:
            return _one_system(spec.name, loaded, persona, template, settings, speakers, max_length, contexts,
                               memories, loss_samples, seed, slots, progress, tuple(profile) if spec.memory else ())

        if spec.lora:
            systems[spec.name] = one()
        else:
            with loaded.model.disable_adapter():
                systems[spec.name] = one()
    return systems


def _one_system(name, loaded, persona, template, settings, speakers, max_length, contexts, memories, loss_samples,
                seed, slots, progress, profile) -> ModelSystem:
    import time

    started = time.monotonic()
    loss = None
    if loss_samples is not None:
        by_id = {id(s): memories[i] for i, s in enumerate(loss_samples)} if memories is not None else None
        rows = loss_rows(loaded, loss_samples, template, max_length,
                         memory=(lambda s: by_id[id(s)]) if by_id is not None else None, profile=profile)
        loss = reply_loss(loaded, rows)
    replies = generate(loaded, persona=persona, template=template, settings=settings, speakers=speakers,
                       max_length=max_length, contexts=contexts, memories=memories, seed=seed, slots=slots,
                       on_reply=(lambda: progress(name, 1)) if progress else None, profile=profile)
    return ModelSystem(replies, loss, time.monotonic() - started)


def generate(
    loaded: LoadedModel,
    *,
    persona: str,
    template: str,
    settings: GenerationSettings,
    speakers: list[str],
    max_length: int,
    contexts: list[list],
    seed: int,
    slots: int = 32,
    on_reply: Callable[[], None] | None = None,
    memories: list[list] | None = None,
    profile: Sequence[str] = (),
) -> list[str]:
    """One reply per context, as the bot's worker makes them: every admitted chat decodes in the same step."""
    from .model_backend import ModelBackend

    if not contexts:
        return []
    # The prompt budget the bot has on this model (its whole context), not the training length.
    budget = prompt_budget(loaded.model, settings.max_new_tokens, max_length)
    backend = ModelBackend(loaded, persona, template, settings, tuple(speakers), budget,
                           cuda_graphs=loaded.device.startswith("cuda"), profile=tuple(profile))
    # The prompts are the bot's (its budget), but the cache need only hold the longest of them and a reply.
    memories = memories or [[] for _ in contexts]
    longest = max(len(backend.prompt_ids(as_turns(c), m)) for c, m in zip(contexts, memories, strict=True))
    longest += settings.max_new_tokens
    length = min(budget + settings.max_new_tokens, -(-longest // 64) * 64)
    stepper = backend.make_stepper(max(1, min(slots, len(contexts))), seed=seed, length=length)
    replies: list[str | None] = [None] * len(contexts)
    waiting = iter(range(len(contexts)))
    next_index = next(waiting, None)
    done = 0
    try:
        while done < len(contexts):
            while next_index is not None and stepper.busy < stepper.capacity:
                stepper.admit(next_index, as_turns(contexts[next_index]), memories[next_index])
                next_index = next(waiting, None)
            for output in stepper.step():
                if not output.finished:
                    continue
                replies[output.key] = output.full_text
                done += 1
                if on_reply:
                    on_reply()
    finally:
        stepper.release()
    return [r or "" for r in replies]


def loss_rows(loaded: LoadedModel, samples: list[dict], template: str, max_length: int,
              memory: Callable[[dict], list] | None = None, profile: Sequence[str] = ()) -> list:
    """The samples' real replies encoded as training encodes them (prompt tokens unscored), packed into rows."""
    from .encoding import encode_all
    from .packing import pack_samples

    encoded, _ = encode_all(loaded.tokenizer, samples, template, max_length, memory, profile)
    if not encoded:
        return []
    context = getattr(loaded.model.config, "max_position_embeddings", None) or 2048
    pack_length = max(max_length, min(2048, context))
    return pack_samples(encoded, pack_length)


def reply_loss(loaded: LoadedModel, rows: list) -> float | None:
    """Mean loss per reply token of the real replies in `rows` (loss_rows'); None without any."""
    from .reply_loss import token_weighted_loss

    rows_per_batch = 4 if loaded.device.startswith("cuda") else 1
    return token_weighted_loss(loaded.model, rows, loaded.tokenizer.pad_id, rows_per_batch)


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else math.inf


def with_model(loaded: LoadedModel, model) -> LoadedModel:
    """The same loaded base, with `model` (e.g. the peft-wrapped one in training) in its place."""
    return replace(loaded, model=model)
