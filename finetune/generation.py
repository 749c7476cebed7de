"""Batched reply generation: shared by `finetune chat`, `finetune eval` and the bot's worker.

Prompts are rendered by prompt.py (as in training). The engine (engine/) takes them as `EngineRequest`s; this
module says what a persona's request is for it (`GenerationSettings.sampling`, `ReplyCodec`, `turn_rule`), and is
the plain path beside it: `generate_outputs` left-pads requests into batches for transformers' `generate()`
(one batch per set of sampling parameters; a seeded request alone). A reply ends at EOS, a stop, or where the
model starts another speaker's turn; `<NL>` becomes a newline again.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial

from engine.detokenizer import first_stop
from engine.request import EngineOutput, EngineRequest, SamplingParams

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

    def sampling(self, **overrides) -> SamplingParams:
        """The engine's parameters for a reply: these settings, with a request's own values where it gives them
        (max_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop, stop_token_ids)."""
        base = dict(max_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                    repetition_penalty=self.repetition_penalty)
        return SamplingParams(**{**base, **{k: v for k, v in overrides.items() if v is not None}})

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


class ReplyCodec:
    """What the engine needs of bunshin's tokenizer: the padding and end ids, and a reply's text from its ids (the
    model's spelling undone, byte-fallback debris dropped; not yet cut or stripped)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_id
        self.eos_id = tokenizer.eos_id

    def text(self, ids: list[int]) -> str:
        return self.clean(self.tokenizer.decode(ids))

    def clean(self, model_text: str) -> str:
        """Text in the model's spelling as a reply's text (an engine elsewhere that sends text, not ids)."""
        return _CONTROL.sub("", self.tokenizer.from_model_text(model_text))


def turn_rule(speakers: Sequence[str]):
    """The stop rule of a persona's reply: where the model begins another speaker's turn (prompt.turn_end)."""
    return partial(turn_end, speakers=tuple(speakers))


def persona_request(key, prompt: list[int], sampling: SamplingParams, speakers: Sequence[str] = (),
                    stream: bool = False, deadline: float | None = None) -> EngineRequest:
    """An engine request for a persona's reply: it ends where another speaker's turn begins."""
    return EngineRequest(key, list(prompt), sampling, stream=stream, stop_rule=turn_rule(speakers), deadline=deadline)


def generate_replies(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    settings: GenerationSettings,
    speakers: Sequence[str] = (),
    seed: int | None = None,
) -> list[tuple[str, int]]:
    """(reply text, tokens generated) for each prompt, generated as one left-padded batch."""
    requests = [persona_request(i, p, settings.sampling(), speakers) for i, p in enumerate(prompts)]
    return [(o.full_text.strip(), len(o.token_ids)) for o in generate_outputs(model, tokenizer, requests, seed)]


def generate_outputs(model, tokenizer, requests: Sequence[EngineRequest], seed: int | None = None) -> list[EngineOutput]:
    """Each request's finished output, by transformers' `generate()`: requests with the same sampling parameters
    (stop strings aside) in one left-padded batch, a seeded request alone (generate() draws from torch's global
    generator, which the seed then sets)."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    groups: dict[object, list[int]] = {}
    for i, request in enumerate(requests):
        key = (i,) if request.sampling.seed is not None else replace(request.sampling, stop=())
        groups.setdefault(key, []).append(i)
    outputs: list[EngineOutput | None] = [None] * len(requests)
    for members in groups.values():
        batch = [requests[i] for i in members]
        for i, output in zip(members, _generate_batch(model, tokenizer, batch), strict=True):
            outputs[i] = output
    return outputs


def _generate_batch(model, tokenizer, requests: Sequence[EngineRequest]) -> list[EngineOutput]:
    import torch

    sampling = requests[0].sampling
    device = next(p for p in model.parameters()).device
    prompts = [r.prompt_ids for r in requests]
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), tokenizer.pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, longest - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention[i, longest - len(ids) :] = 1
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed_for_torch())
    ends = [tokenizer.eos_id, *sampling.stop_token_ids]
    kwargs = dict(
        max_new_tokens=sampling.max_tokens,
        do_sample=not sampling.greedy,
        repetition_penalty=sampling.repetition_penalty,
        eos_token_id=ends,
        pad_token_id=tokenizer.pad_id,
    )
    if not sampling.greedy:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    from transformers import StoppingCriteriaList

    codec = ReplyCodec(tokenizer)
    stop = StoppingCriteriaList([_Stopped(codec, longest, requests)])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             stopping_criteria=stop, **kwargs)
    outputs = []
    for request, row in zip(requests, out[:, longest:].tolist(), strict=True):
        ended = next((j for j, token in enumerate(row) if token in ends), None)
        generated = len(row) if ended is None else ended
        ids = row[: len(row) if ended is None else ended]
        while ended is None and ids and ids[-1] == tokenizer.pad_id:  # a row padded after another row's end
            ids.pop()
            generated -= 1
        text = codec.text(ids)
        cut = _first_stop(text, request)
        reason = "stop" if ended is not None or cut is not None or generated < sampling.max_tokens else "length"
        whole = text if cut is None else text[:cut]
        outputs.append(EngineOutput(request.key, ids, whole, True, reason, len(request.prompt_ids), generated, whole))
    return outputs


def _first_stop(text: str, request: EngineRequest) -> int | None:
    """Where a finished reply's text ends: its first stop string, or the stop rule's cut."""
    return first_stop(text, request.sampling.stop, request.stop_rule)


def _Stopped(codec: ReplyCodec, prompt_length: int, requests: Sequence[EngineRequest]):  # noqa: N802 - it makes the criterion
    """A transformers stopping criterion: a row is done once its reply holds a stop string or has begun another
    speaker's turn (the stop rule), as the slot engine ends a row. Everything after would be cut from the reply
    anyway, and on a CPU the tokens up to max_new_tokens are most of a reply's time. The text before the stop is
    the same either way: its first stop stays the first."""
    import torch
    from transformers import StoppingCriteria

    class Stopped(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = [_first_stop(codec.text(row[prompt_length:].tolist()), request) is not None
                    for request, row in zip(requests, input_ids, strict=True)]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return Stopped()


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
