"""Next-token choice for the slot engine: transformers' logits processors, on a whole batch at once.

The order and arithmetic follow `generate()`: repetition penalty over every token the row has
seen (prompt included), then temperature, top-k, top-p, then a draw; temperature 0 is greedy.
So greedy replies equal `generate()`'s token for token, and sampled ones have its distribution.
"""

from __future__ import annotations

from finetune.generation import GenerationSettings


def next_tokens(logits, seen, settings: GenerationSettings, generator=None):
    """logits: (rows, vocab) float32, modified in place. seen: (rows, vocab) bool. Returns (rows,) ids."""
    import torch

    penalty = settings.repetition_penalty
    if penalty != 1.0:
        penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(seen, penalised, logits)
    if settings.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / settings.temperature
    if settings.top_k > 0:
        k = min(settings.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        # As TopPLogitsWarper: drop the least likely tokens whose total mass is at most 1 - top_p,
        # always keeping the most likely one.
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - settings.top_p)
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
