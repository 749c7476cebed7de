"""What the next engine step runs: a prefill of waiting prompts, or one decoded token for every running reply.

A step is one forward pass. Its cost is mostly reading the weights once, whether it carries one prompt or eight,
and every decoding reply waits for it; so while replies are decoding, new prompts wait a few steps (PREFILL_WAIT_STEPS)
or until a few of them (PREFILL_GROUP) can be prefilled together, within a budget of prompt tokens a step
(PREFILL_TOKEN_BUDGET: a prefill step of 8 full-context prompts is as long as many decode steps, which every
running reply feels as a pause). With 32 chats going on, a prefill per arriving message took half an H200's time.

Not built: steps that mix prefill chunks and decodes in one forward pass (vLLM v1's scheduler). The slot attention
gathers each row's whole cache row for its queries (engine/slot_attention.py), so a prompt chunk's hundreds of
queries in a decode batch would each read a full cache row; a mixed step needs a varlen attention kernel
(FlashAttention's varlen or flex_attention's block masks) over a paged cache first. docs/architecture.md keeps
this as the next lever.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFILL_GROUP = 4
PREFILL_WAIT_STEPS = 4
PREFILL_TOKEN_BUDGET = 16384  # prompt tokens a prefill step computes at most (one prompt always goes, however long)


@dataclass
class Decision:
    prefill: int  # how many of the waiting prompts (oldest first) to prefill this step; 0: decode


class Scheduler:
    def __init__(self, max_prefill_rows: int, token_budget: int = PREFILL_TOKEN_BUDGET) -> None:
        self.max_prefill_rows = max_prefill_rows
        self.token_budget = token_budget
        self.waited = 0  # decode steps the oldest waiting prompt has waited

    def next_step(self, waiting: list[int], running: int, free: int) -> Decision:
        """`waiting`: the waiting prompts' lengths in tokens still to compute, oldest first; `running`: replies
        decoding; `free`: slots neither running nor waiting."""
        if waiting and (not running or len(waiting) >= min(PREFILL_GROUP, free + len(waiting))
                        or self.waited >= PREFILL_WAIT_STEPS):
            self.waited = 0
            return Decision(self._fit(waiting))
        if running:
            self.waited += bool(waiting)
        return Decision(0)

    def _fit(self, waiting: list[int]) -> int:
        count, tokens = 0, 0
        for length in waiting[: self.max_prefill_rows]:
            if count and tokens + length > self.token_budget:
                break
            count, tokens = count + 1, tokens + length
        return count
