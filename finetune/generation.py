"""Batched reply generation: shared by `finetune chat` and the bot's worker.

Prompts are rendered by prompt.py (as in training), left-padded into one batch, and generated
together. A reply ends at EOS or where the model starts another speaker's turn; `<NL>` becomes
a newline again.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .manifest import DEFAULT_GENERATION
from .prompt import (
    MEMORY_SHARE,
    ChatTurn,
    MemoryNote,
    drop_oldest_turns,
    encode_prompt,
    fit_notes,
    prefix_ids,
    turn_end,
)

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffd]")


# Tokens of a chat (prompt + reply) served at most. rinna has 2048; newer bases declare 8192 to 128k,
# which no chat memory of 20 turns needs, while every cache row and warm-up graph would grow with it.
MAX_SERVED_CONTEXT = 4096


def served_context(model, fallback: int) -> int:
    """Tokens of a chat (prompt + reply) served on `model` (the bot, the eval, `chat` on a base): its whole
    context, at most MAX_SERVED_CONTEXT; `fallback` (the training length) where the config does not say."""
    context = getattr(model.config, "max_position_embeddings", None)
    return min(context, MAX_SERVED_CONTEXT) if context else fallback


MIN_PROMPT_TOKENS = 16  # a prompt shorter than this holds no conversation to answer


def prompt_budget(model, max_new_tokens: int, fallback: int | None) -> int:
    """Prompt tokens of a reply served on `model`: its served context (served_context) less the reply's room.
    The one rule of the bot, `eval` and `chat`, so that each prompts as the others do. `fallback`: the training
    length, or None where a model whose config does not say its context is an error. ValueError when the reply
    leaves too little room, or the context is unknown."""
    context = served_context(model, fallback)
    if not context:
        raise ValueError("the model's config does not say its context length (max_position_embeddings)")
    budget = context - max_new_tokens
    if budget < MIN_PROMPT_TOKENS:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves {budget} of {context} tokens for the prompt")
    return budget


@dataclass
class GenerationSettings:
    max_new_tokens: int = DEFAULT_GENERATION["max_new_tokens"]
    temperature: float = DEFAULT_GENERATION["temperature"]
    top_p: float = DEFAULT_GENERATION["top_p"]
    top_k: int = DEFAULT_GENERATION["top_k"]
    repetition_penalty: float = DEFAULT_GENERATION["repetition_penalty"]

    @classmethod
    def from_manifest(cls, generation: dict, **overrides) -> GenerationSettings:
        known = {k: v for k, v in {**generation, **{k: v for k, v in overrides.items() if v is not None}}.items()
                 if k in cls.__dataclass_fields__}
        return cls(**known)


def fit_context(tokenizer, turns: Sequence[ChatTurn], persona: str, template: str, budget: int,
                block: int = 1, *, memory: Sequence[MemoryNote] = (), profile: Sequence[str] = ()) -> list[int]:
    """Prompt ids for the latest turns that fit `budget` tokens (the oldest are dropped first), with the
    memory notes that fit a share of the budget (prompt.fit_notes, as in training) and the profile.

    `block` > 1 drops old turns in multiples of `block`: the prompt then keeps its start for several
    messages as the conversation grows, so the serving engine can reuse what it computed for the last
    one (dropping one turn per message would change the start, and the whole prompt, every time)."""
    turns = list(turns)
    memory = fit_notes(tokenizer, memory, budget // MEMORY_SHARE) if memory else ()
    dropped, ids = drop_oldest_turns(tokenizer, turns, persona, template, budget, memory=memory, profile=profile)
    if block > 1 and 0 < dropped < len(turns):
        rounded = min(len(turns) - 1, -(-dropped // block) * block)
        if rounded != dropped:
            dropped = rounded
            ids = encode_prompt(tokenizer, turns[dropped:], persona, template, memory=memory, profile=profile)
    if len(ids) <= budget:
        return ids
    # Even the last turn alone is too long: keep its end, and the BOS the model expects at the start.
    start = prefix_ids(tokenizer)
    return start + ids[len(start):][len(ids) - budget:]


def generate_replies(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    settings: GenerationSettings,
    speakers: Sequence[str] = (),
    seed: int | None = None,
) -> list[tuple[str, int]]:
    """(reply text, tokens generated) for each prompt, generated as one left-padded batch."""
    import torch

    device = next(p for p in model.parameters()).device
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), tokenizer.pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, longest - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention[i, longest - len(ids) :] = 1
    if seed is not None:
        torch.manual_seed(seed)
    sample = settings.temperature > 0
    kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sample,
        repetition_penalty=settings.repetition_penalty,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    if sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    from transformers import StoppingCriteriaList

    stop = StoppingCriteriaList([_TurnEnded(tokenizer, longest, speakers)])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             stopping_criteria=stop, **kwargs)
    replies = []
    for row in out[:, longest:].tolist():
        if tokenizer.eos_id in row:
            row = row[: row.index(tokenizer.eos_id)]
        while row and row[-1] == tokenizer.pad_id:
            row.pop()
        replies.append((reply_text(tokenizer, row, speakers), len(row)))
    return replies


def _TurnEnded(tokenizer, prompt_length: int, speakers: Sequence[str]):  # noqa: N802 - it makes the criterion
    """A transformers stopping criterion: a row is done once its reply has begun another speaker's turn (turn_end),
    as the slot engine ends a row. Everything after would be cut from the reply anyway, and on a CPU the tokens
    up to max_new_tokens are most of a reply's time. The text before the turn is the same either way: its first
    `\nname: ` stays the first."""
    import torch
    from transformers import StoppingCriteria

    class TurnEnded(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = [turn_end(tokenizer.from_model_text(tokenizer.decode(row[prompt_length:].tolist())), speakers)
                    is not None for row in input_ids]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return TurnEnded()


def reply_text(tokenizer, ids: list[int], speakers: Sequence[str] = ()) -> str:
    """The reply a chat partner sees for generated `ids` (EOS already removed)."""
    return reply_from_model_text(tokenizer, tokenizer.decode(ids), speakers)


def reply_from_model_text(tokenizer, model_text: str, speakers: Sequence[str] = ()) -> str:
    """The reply a chat partner sees for generated text in the model's spelling (an engine that returns text)."""
    # Control characters (byte-fallback debris of a half-trained model) are never worth sending.
    text = _CONTROL.sub("", tokenizer.from_model_text(model_text))
    cut = turn_end(text, speakers)
    if cut is not None:
        text = text[:cut]
    return text.strip()
