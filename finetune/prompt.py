"""The one prompt renderer, imported by training and serving alike.

What the model saw in training is byte for byte what it sees in chat: `finetune train`, `finetune
chat` and the bot's worker all call `encode_prompt` on (speaker, text) turns. Two templates:

- "transcript" (default): the conversation as it reads, one `name: text` turn per line, then
  the persona's name and a colon. A base model has seen countless transcripts; it needs no
  instruction to continue one, and the speaker names let it tell people apart.
- "instruction": the `### 指示:` / `### 回答:` layout that most rinna LoRA tutorials use.

Line breaks inside a message and between turns are written in the tokenizer's convention
(`<NL>` for rinna). The reply ends with EOS; at serving time a reply also ends where the model
starts another speaker's turn (`turn_end`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .tokenization import ChatTokenizer

TEMPLATES = ("transcript", "instruction")
IGNORE_INDEX = -100  # label value the loss skips (prompt tokens)

_INSTRUCTION_HEAD = "### 指示:\n{persona}として、次の会話の続きを返信してください。\n\n### 会話:\n"
_INSTRUCTION_TAIL = "\n\n### 回答:\n"


@dataclass(frozen=True)
class ChatTurn:
    speaker: str
    text: str


@dataclass(frozen=True)
class MemoryNote:
    """Something said before, shown to the model with its date: a persona's note (person_memory.py) or an
    older turn of the same chat. `turns` (usually what was asked, then the persona's answer) make one line."""

    date: str  # YYYY-MM-DD ("" where unknown)
    turns: tuple[ChatTurn, ...]


# The memory block goes right before the latest turn: the prompt still ends as a transcript does (the message,
# then the persona's name), and a chat's prompt keeps its start (profile + older turns) from one message to the
# next, so the engine reuses what it computed. Each note is one dated line of quotes, `2024-01-12: 健太「出身
# どこ？」 → 美咲「新潟だよ」`, not `name: text` lines: a base model reads those as more conversation and goes on
# writing dated turns instead of answering (docs/architecture.md, "Prompt fitting", has the figures from Gemma 3
# 270M). The profile is the same for every reply: it opens the prompt.
MEMORY_OPEN = "［記憶］"
PROFILE_OPEN = "［{persona}のプロフィール］"
BLOCK_CLOSE = "［ここまで］"


def as_turns(context: Iterable) -> list[ChatTurn]:
    """Accept prepare's `{"speaker", "text"}` dicts, ChatTurns or (speaker, text) pairs."""
    turns = []
    for item in context:
        if isinstance(item, ChatTurn):
            turns.append(item)
        elif isinstance(item, dict):
            turns.append(ChatTurn(item["speaker"], item["text"]))
        else:
            speaker, text = item
            turns.append(ChatTurn(speaker, text))
    return turns


def render_memory(notes: Sequence[MemoryNote]) -> str:
    """The notes between two markers, oldest first, one dated line of quotes each ("" for none)."""
    if not notes:
        return ""
    lines = [(f"{note.date}: " if note.date else "") + " → ".join(f"{t.speaker}「{t.text}」" for t in note.turns)
             for note in notes]
    return "\n".join([MEMORY_OPEN, *lines, BLOCK_CLOSE])


def fit_notes(tokenizer: ChatTokenizer, notes: Sequence[MemoryNote], budget: int) -> list[MemoryNote]:
    """The notes whose block fits `budget` tokens: the oldest go first (what was said last matters most).

    Training and serving both call this with a share of the prompt (MEMORY_SHARE), so the memory never
    crowds the conversation itself out of the prompt, and a model sees as much memory as it learned with."""
    kept = list(notes)
    while kept and len(tokenizer.encode(tokenizer.to_model_text(render_memory(kept)))) > budget:
        kept.pop(0)
    return kept


MEMORY_SHARE = 3  # memory gets at most a third of the prompt budget


def render_profile(profile: Sequence[str], persona: str) -> str:
    if not profile:
        return ""
    return "\n".join([PROFILE_OPEN.format(persona=persona), *profile, BLOCK_CLOSE])


def render_prompt(context: Sequence[ChatTurn], persona: str, template: str = "transcript", *,
                  memory: Sequence[MemoryNote] = (), profile: Sequence[str] = ()) -> str:
    """The prompt as plain text with "\\n" line breaks (the tokenizer's convention is applied later).

    Without memory and profile it is exactly the prompt of a model trained before either existed."""
    turns = [f"{t.speaker}: {t.text}" for t in context]
    head = render_profile(profile, persona)
    notes = render_memory(memory)
    if template == "transcript":
        parts = [p for p in (head, *turns[:-1], notes, *turns[-1:]) if p]
        return "\n".join(parts) + f"\n{persona}: " if parts else f"{persona}: "
    if template == "instruction":
        lines = "\n".join(turns)
        body = _INSTRUCTION_HEAD.format(persona=persona) + (head + "\n\n" if head else "") + lines
        return body + (f"\n\n### 記憶:\n{notes}" if notes else "") + _INSTRUCTION_TAIL
    raise ValueError(f"unknown prompt template {template!r}; known: {', '.join(TEMPLATES)}")


def prefix_ids(tokenizer: ChatTokenizer) -> list[int]:
    """BOS where the model's tokenizer starts every text with it (Llama-architecture bases); rinna and Qwen use none."""
    return [tokenizer.bos_id] if tokenizer.add_bos else []


def encode_prompt(tokenizer: ChatTokenizer, context: Sequence[ChatTurn], persona: str, template: str, *,
                  memory: Sequence[MemoryNote] = (), profile: Sequence[str] = ()) -> list[int]:
    text = render_prompt(context, persona, template, memory=memory, profile=profile)
    return prefix_ids(tokenizer) + tokenizer.encode(tokenizer.to_model_text(text))


def encode_reply(tokenizer: ChatTokenizer, text: str) -> list[int]:
    return tokenizer.encode(tokenizer.to_model_text(text)) + [tokenizer.eos_id]


def encode_sample(
    tokenizer: ChatTokenizer,
    context: Sequence[ChatTurn],
    persona: str,
    target: str,
    template: str,
    max_length: int,
    *,
    memory: Sequence[MemoryNote] = (),
    profile: Sequence[str] = (),
) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) for one training sample; labels are IGNORE_INDEX on the prompt.

    Too long for `max_length`: the oldest context turns go first (as the bot's memory drops
    them); None if even the reply alone does not fit.
    """
    reply = encode_reply(tokenizer, target)
    if len(reply) >= max_length:
        return None
    memory = fit_notes(tokenizer, memory, (max_length - len(reply)) // MEMORY_SHARE) if memory else ()
    _, prompt = drop_oldest_turns(tokenizer, context, persona, template, max_length - len(reply), memory=memory, profile=profile)
    if len(prompt) + len(reply) > max_length:
        return None
    return prompt + reply, [IGNORE_INDEX] * len(prompt) + reply


def drop_oldest_turns(
    tokenizer: ChatTokenizer, context: Sequence[ChatTurn], persona: str, template: str, budget: int, *,
    memory: Sequence[MemoryNote] = (), profile: Sequence[str] = (),
) -> tuple[int, list[int]]:
    """(how many of the oldest turns were dropped, the prompt of the rest): the fewest dropped for the prompt
    to fit `budget` tokens, so training (encode_sample) and serving (generation.fit_context) cut alike. With
    every turn dropped the prompt may still not fit; the caller decides what then.

    One turn at a time: a chars/4 guess of a turn's tokens undercounts Japanese and dropped more context
    than needed. Context is <= 10 turns in training, a memory's worth when serving: cheap."""
    dropped = 0
    while True:
        prompt = encode_prompt(tokenizer, context[dropped:], persona, template, memory=memory, profile=profile)
        if len(prompt) <= budget or dropped >= len(context):
            return dropped, prompt
        dropped += 1


def turn_end(text: str, speakers: Iterable[str]) -> int | None:
    """Where a generated reply stops because the model began another speaker's turn, or None.

    In the transcript template a new turn is a line starting `name: `. Known names are checked
    exactly; any short `name: ` line also ends the reply, since the model may invent a speaker.
    """
    for match in _TURN_START.finditer(text):
        name = match.group(1)
        if name in speakers or len(name) <= 20:
            return match.start()
    return None


_TURN_START = re.compile(r"\n([^\n:：]{1,40}): ")
