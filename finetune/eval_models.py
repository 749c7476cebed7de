"""The base and the tuned model's side of `finetune eval` (and of the short eval that ends `train`).

Replies are generated exactly as the bot would answer the same conversation: the bot's prompt
renderer and context fitting (bot.backend.ModelBackend), the adapter's generation settings, the slot
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
from collections.abc import Callable
from dataclasses import dataclass, replace

from .generation import GenerationSettings
from .model_loading import LoadedModel
from .prompt import as_turns


@dataclass
class ModelSystem:
    replies: list[str]
    loss: float | None
    seconds: float  # generating and scoring, for the progress line


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
) -> dict[str, ModelSystem]:
    """{"base": ..., "tuned": ...} for a peft model; {"tuned": ...} for a model without a LoRA to switch off
    (a merged folder), since its base is not in memory. `with_loss` False: no loss is computed (None)."""
    # One tokenizer: the same rows serve both systems.
    rows = loss_rows(loaded, samples, template, max_length) if with_loss else []

    def one(name: str) -> ModelSystem:
        return _one_system(name, loaded, rows, persona, template, settings, speakers, max_length, samples, seed, slots,
                           progress)

    systems: dict[str, ModelSystem] = {}
    if hasattr(loaded.model, "disable_adapter"):
        with loaded.model.disable_adapter():
            systems["base"] = one("base")
    systems["tuned"] = one("tuned")
    return systems


def _one_system(name, loaded, rows, persona, template, settings, speakers, max_length, samples, seed, slots,
                progress) -> ModelSystem:
    import time

    started = time.monotonic()
    loss = reply_loss(loaded, rows)
    replies = generate(loaded, persona=persona, template=template, settings=settings, speakers=speakers,
                       max_length=max_length, contexts=[s["context"] for s in samples], seed=seed, slots=slots,
                       on_reply=(lambda: progress(name, 1)) if progress else None)
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
) -> list[str]:
    """One reply per context, as the bot's worker makes them: every admitted chat decodes in the same step."""
    from bot.backend import ModelBackend, served_context

    if not contexts:
        return []
    # The prompt budget the bot has on this model (its whole context), not the training length.
    budget = served_context(loaded.model, max_length) - settings.max_new_tokens
    if budget < 16:
        raise ValueError(f"max_new_tokens {settings.max_new_tokens} leaves {budget} of {max_length} tokens for the prompt")
    backend = ModelBackend(loaded, persona, template, settings, tuple(speakers), budget,
                           cuda_graphs=loaded.device.startswith("cuda"))
    # The prompts are the bot's (its budget), but the cache need only hold the longest of them and a reply.
    longest = max(len(backend.prompt_ids(as_turns(c))) for c in contexts) + settings.max_new_tokens
    length = min(budget + settings.max_new_tokens, -(-longest // 64) * 64)
    stepper = backend.make_stepper(max(1, min(slots, len(contexts))), seed=seed, length=length)
    replies: list[str | None] = [None] * len(contexts)
    waiting = iter(range(len(contexts)))
    next_index = next(waiting, None)
    done = 0
    try:
        while done < len(contexts):
            while next_index is not None and stepper.busy < stepper.capacity:
                stepper.admit(next_index, as_turns(contexts[next_index]))
                next_index = next(waiting, None)
            for key, text, _tokens in stepper.step():
                replies[key] = text
                done += 1
                if on_reply:
                    on_reply()
    finally:
        stepper.release()
    return [r or "" for r in replies]


def loss_rows(loaded: LoadedModel, samples: list[dict], template: str, max_length: int) -> list:
    """The samples' real replies encoded as training encodes them (prompt tokens unscored), packed into rows."""
    from .packing import pack_samples
    from .train import encode_all

    encoded, _ = encode_all(loaded.tokenizer, samples, template, max_length)
    if not encoded:
        return []
    context = getattr(loaded.model.config, "max_position_embeddings", None) or 2048
    pack_length = max(max_length, min(2048, context))
    return pack_samples(encoded, pack_length)


def reply_loss(loaded: LoadedModel, rows: list) -> float | None:
    """Mean loss per reply token of the real replies in `rows` (loss_rows'); None without any."""
    from .train import token_weighted_loss

    rows_per_batch = 4 if loaded.device.startswith("cuda") else 1
    return token_weighted_loss(loaded.model, rows, loaded.tokenizer.pad_id, rows_per_batch)


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else math.inf


def with_model(loaded: LoadedModel, model) -> LoadedModel:
    """The same loaded base, with `model` (e.g. the peft-wrapped one in training) in its place."""
    return replace(loaded, model=model)
