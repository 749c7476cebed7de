"""Which free slot a new prompt goes to, and how much of it the slot's cache already holds.

A chat's next message is its previous prompt + the reply + a new turn, as the bot's memory builds it.
When that chat's earlier reply finished, its slot kept the keys and values of everything it had been
fed; if the slot is still free, only the tokens past the common prefix need a forward pass. Matching
is by token ids, not by chat: no caller has to say which chat a prompt belongs to, a prompt that
merely starts like another chat's (a shared system text) benefits too, and a prompt that changed at
the start (memory dropped old turns) simply matches nothing.

Fresh prompts take the lowest free slot, so the decode batch (rows 0..highest busy slot) stays narrow;
a prompt with a usable prefix takes the slot that holds it, wherever it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MIN_REUSE = 16  # below this a fresh prefill (a captured graph of its own) is as cheap


@dataclass(frozen=True)
class Placement:
    slot: int
    reused: int  # leading prompt tokens whose keys and values the slot already holds


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix; list slices compare in C, so halving is fast for long prompts."""
    limit = min(len(a), len(b))
    if limit == 0 or a[0] != b[0]:
        return 0
    if a[:limit] == b[:limit]:
        return limit
    low, high = 1, limit  # a[:low] == b[:low] and a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


def place(prompts: Sequence[Sequence[int]], free: Sequence[int], cached: Sequence[Sequence[int]],
          max_new: int | None = None) -> list[Placement]:
    """A slot for each prompt (len(free) >= len(prompts)). Prompts that can reuse a slot's cache choose
    first, longest reuse first; the rest take the lowest free slots. At least one token of every prompt
    is left to compute (its logits choose the first reply token); `max_new` caps the tokens an
    extension may compute, beyond which a fresh prefill is used."""
    available = sorted(free)
    candidates = []
    for i, prompt in enumerate(prompts):
        for slot in available:
            shared = min(common_prefix(cached[slot], prompt), len(prompt) - 1)
            if shared >= MIN_REUSE and (max_new is None or len(prompt) - shared <= max_new):
                candidates.append((shared, i, slot))
    placements: dict[int, Placement] = {}
    taken: set[int] = set()
    for shared, i, slot in sorted(candidates, key=lambda c: (-c[0], c[1], c[2])):
        if i in placements or slot in taken:
            continue
        placements[i] = Placement(slot, shared)
        taken.add(slot)
    rest = iter(s for s in available if s not in taken)
    for i in range(len(prompts)):
        if i not in placements:
            placements[i] = Placement(next(rest), 0)
    return [placements[i] for i in range(len(prompts))]
