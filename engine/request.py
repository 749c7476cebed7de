"""What goes into the engine and what comes out: one request type and one output type for every engine.

The slot engine (slot_engine.py), plain batched `generate()` and a remote OpenAI-compatible engine all take an
`EngineRequest` (prompt token ids, the reply's own sampling parameters, stop strings and stop token ids, a deadline)
and report `EngineOutput`s: the token ids and text that are new since the last output, and on the last one the
finish reason (`stop`: an end token, a stop string or the caller's stop rule; `length`: max_tokens reached;
`abort`: cancelled, the deadline passed before the reply started, or the engine failed it) and the token counts.

No torch here: the bot's event loop, the API and the remote engine use these without loading a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]

MAX_STOP_STRINGS = 16  # OpenAI allows 4; vLLM more. A bound keeps each step's check cheap.


@dataclass(frozen=True)
class SamplingParams:
    """How one reply's tokens are chosen, in the order `generate()` applies them: repetition penalty over every
    token the row has seen (prompt included), then temperature, top-k, top-p, then a draw. Temperature 0 is greedy.
    A `seed` makes the row's draws its own: the same request gives the same tokens whatever else is in the batch."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the reply ends before the first of these in its text; none of it is sent
    stop_token_ids: tuple[int, ...] = ()  # as the end token: the reply ends, the token is not part of it

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            problems.append(f"max_tokens must be an integer of at least 1, not {self.max_tokens!r}")
        if not (_finite(self.temperature) and self.temperature >= 0):
            problems.append(f"temperature must be a number of at least 0, not {self.temperature!r}")
        if not (_finite(self.top_p) and 0 < self.top_p <= 1):
            problems.append(f"top_p must be above 0 and at most 1, not {self.top_p!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            problems.append(f"top_k must be an integer of at least 0, not {self.top_k!r}")
        if not (_finite(self.repetition_penalty) and self.repetition_penalty > 0):
            problems.append(f"repetition_penalty must be above 0, not {self.repetition_penalty!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            problems.append(f"seed must be an integer, not {type(self.seed).__name__}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            problems.append("stop_token_ids must be token ids (integers of at least 0)")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def seed_for_torch(self) -> int:
        """The seed as torch.Generator takes it (a 64-bit unsigned integer): any integer a client sends maps to one."""
        return self.seed % (1 << 64)


@dataclass(eq=False)
class EngineRequest:
    key: object  # the caller's handle for the request; outputs carry it back
    prompt_ids: list[int]
    sampling: SamplingParams
    # Stream text: each step's output carries the new text (held back while it may still become a stop string).
    # Off, text is worked out only where a stop needs it, and the whole reply comes with the last output.
    stream: bool = False
    # A stop the strings cannot list: given the reply's text so far, where it ends (an index into it) or None.
    # The bot's: a line `name: ` of a speaker the model invented (finetune.prompt.turn_end). It is checked when
    # the latest token holds one of `stop_rule_triggers` (a turn begins with a ':'), and once at the end.
    stop_rule: Callable[[str], int | None] | None = None
    stop_rule_triggers: str = ":"
    adapter: str | None = None  # which adapter generates it; None: the one the engine holds
    deadline: float | None = None  # time.monotonic() by which the reply must have started, else it is aborted

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclass
class EngineOutput:
    key: object
    # New since the previous output of this request (so a request that does not stream gets all of them, once), an
    # end or stop token excluded.
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # new text since the previous output (streamed requests; the last output of any request)
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # the reply's tokens so far (an end or stop token not counted)
    # On the last output: the reply's whole text, cut at its stop (the streamed texts joined give the same).
    full_text: str | None = None
    error: str | None = None  # why an `abort` came, where one is known


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def stop_list(values: Sequence[str] | str | None) -> tuple[str, ...]:
    """OpenAI's `stop`: a string or a list of them, as a tuple."""
    if values is None:
        return ()
    return (values,) if isinstance(values, str) else tuple(values)
