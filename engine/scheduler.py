"""What the next engine step runs: whole prompts prefilled, one decoded token for every running reply, or both at
once (a mixed step: every running reply's token and chunks of waiting prompts in one forward pass).

A step is one forward pass. Its cost is mostly reading the weights once, whether it carries one token or hundreds,
and every decoding reply waits for it. So while replies are decoding, a waiting prompt rides along with their
tokens, in chunks of at most `chunk_tokens` prompt tokens a step, shared by the waiting prompts oldest first
(vLLM v1's idea: no prefill phase and no decode phase, one token budget a step). A long prompt then costs the
running replies a little on each of a few steps instead of one long pause. When nothing is decoding, whole prompts
are prefilled together through captured CUDA graphs (PREFILL_TOKEN_BUDGET prompt tokens a step at most): nobody
waits on those steps, and a graph is the fastest way through them.

With mixed steps off (`SlotEngine(mixed=False)`, the engine before them), prompts wait while replies decode, a few
steps (PREFILL_WAIT_STEPS) or until a few of them (PREFILL_GROUP) can be prefilled in one separate step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PREFILL_GROUP = 4
PREFILL_WAIT_STEPS = 4
PREFILL_TOKEN_BUDGET = 16384  # prompt tokens a prefill step computes at most (one prompt always goes, however long)
# Prompt tokens a mixed step computes at most. 512 tokens of a 3.6B model are ~3.7 TFLOP, a few milliseconds of an
# H100/H200, about what a decode step of 32 rows costs: a chunk at most doubles the step every running reply waits on.
CHUNK_TOKENS = 512


@dataclass
class Decision:
    prefill: int = 0  # how many of the waiting prompts (oldest first) to prefill whole this step
    # Mixed step: prompt tokens to compute this step for each of the first len(chunks) waiting prompts, with a
    # decoded token for every running reply.
    chunks: list[int] = field(default_factory=list)


class Scheduler:
    def __init__(self, max_prefill_rows: int, token_budget: int = PREFILL_TOKEN_BUDGET, *, mixed: bool = True,
                 chunk_tokens: int = CHUNK_TOKENS) -> None:
        if chunk_tokens < 1:
            raise ValueError("a mixed step needs a budget of at least one prompt token")
        self.max_prefill_rows = max_prefill_rows
        self.token_budget = token_budget
        self.mixed = mixed
        self.chunk_tokens = chunk_tokens
        self.waited = 0  # decode steps the oldest waiting prompt has waited

    def next_step(self, waiting: list[int], running: int, free: int, begun: int = 0) -> Decision:
        """`waiting`: the waiting prompts' lengths in tokens still to compute, oldest first; `running`: replies
        decoding; `free`: slots neither running nor waiting; `begun`: how many of the waiting prompts (the first)
        have chunks in their slots already (they go on in chunks until done)."""
        if self.mixed and waiting and (running or begun):
            return Decision(chunks=self._chunks(waiting))
        if waiting and (not running or len(waiting) >= min(PREFILL_GROUP, free + len(waiting))
                        or self.waited >= PREFILL_WAIT_STEPS):
            self.waited = 0
            return Decision(self._fit(waiting))
        if running:
            self.waited += bool(waiting)
        return Decision()

    def _fit(self, waiting: list[int]) -> int:
        count, tokens = 0, 0
        for length in waiting[: self.max_prefill_rows]:
            if count and tokens + length > self.token_budget:
                break
            count, tokens = count + 1, tokens + length
        return count

    def _chunks(self, waiting: list[int]) -> list[int]:
        chunks, budget = [], self.chunk_tokens
        for remaining in waiting:
            if budget == 0:
                break
            take = min(remaining, budget)
            chunks.append(take)
            budget -= take
        return chunks
