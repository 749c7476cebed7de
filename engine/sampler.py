"""Next-token choice for a batch whose rows each bring their own sampling parameters, in one batched pass.

The order and arithmetic follow `generate()`'s logits processors: repetition penalty over every token the row has
seen (prompt included), then temperature, top-k, top-p, then a draw; a row at temperature 0 takes the argmax. So a
greedy reply equals `generate()`'s token for token, and a sampled one has its distribution.

The draw is the exponential race (vLLM's and FlashInfer's): the argmax of probs / E with E ~ Exp(1) picks token i
with probability probs[i], and the noise E of a row with a seed comes from that row's own generator. So a seeded
request gives the same tokens every time, whatever else shares its batch; the others draw from the engine's
generator. Work that no row of the batch needs (a penalty, a sort for top-k/top-p) is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

from .request import SamplingParams

_TINY = 1e-10  # exponential_ can return 0: a token of probability 0 must still lose


@dataclass
class BatchParams:
    """The sampling parameters of a batch's rows, as device tensors, and what the batch needs at all."""

    temperature: object  # (rows,) float32; a greedy row holds 1 (its argmax is taken anyway)
    top_p: object  # (rows,) float32
    top_k: object  # (rows,) int64, 0 = no limit
    penalty: object  # (rows,) float32
    greedy: object  # (rows,) bool
    seeded: list  # (row, torch.Generator) of the rows whose draws are their own
    any_sampled: bool
    any_penalty: bool
    any_top_k: bool
    any_top_p: bool

    @classmethod
    def of(cls, params: list[SamplingParams | None], device, generators: dict[int, object] | None = None):
        """`params[i]`: row i's parameters (None: an idle row, greedy); `generators`: row -> its own generator."""
        import torch

        rows = [p or SamplingParams() for p in params]
        sampled = [not p.greedy for p in rows]
        values = torch.tensor([[p.temperature if s else 1.0, p.top_p if s else 1.0, p.repetition_penalty]
                               for p, s in zip(rows, sampled, strict=True)], dtype=torch.float32)
        ints = torch.tensor([[p.top_k if s else 0, not s] for p, s in zip(rows, sampled, strict=True)], dtype=torch.long)
        values, ints = values.to(device, non_blocking=True), ints.to(device, non_blocking=True)
        return cls(values[:, 0], values[:, 1], ints[:, 0], values[:, 2], ints[:, 1].bool(),
                   [(i, g) for i, g in (generators or {}).items() if sampled[i]],
                   any(sampled), any(p.repetition_penalty != 1.0 for p in rows),
                   any(s and p.top_k > 0 for p, s in zip(rows, sampled, strict=True)),
                   any(s and p.top_p < 1.0 for p, s in zip(rows, sampled, strict=True)))


def choose(logits, seen, params: BatchParams, generator=None):
    """logits: (rows, vocab) float32, not modified. seen: (rows, vocab) bool. Returns (rows,) token ids."""
    import torch

    if params.any_penalty:
        penalty = params.penalty.unsqueeze(1)
        penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(seen, penalised, logits)
    best = logits.argmax(dim=-1)
    if not params.any_sampled:
        return best
    logits = logits / params.temperature.unsqueeze(1)
    if params.any_top_k or params.any_top_p:
        ascending, order = torch.sort(logits, descending=False, dim=-1)
        vocab = logits.shape[-1]
        drop = torch.zeros_like(ascending, dtype=torch.bool)
        if params.any_top_k:
            # As TopKLogitsWarper: keep the k most likely (k = 0: all), i.e. drop the vocab - k least likely.
            keep = torch.where(params.top_k > 0, params.top_k.clamp(max=vocab), vocab)
            drop = torch.arange(vocab, device=logits.device).unsqueeze(0) < (vocab - keep).unsqueeze(1)
            ascending = ascending.masked_fill(drop, float("-inf"))
        if params.any_top_p:
            # As TopPLogitsWarper: drop the least likely tokens whose total mass is at most 1 - top_p, always
            # keeping the most likely one.
            cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
            drop = drop | (cumulative <= (1 - params.top_p).unsqueeze(1))
            drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for row, own in params.seeded:
        noise[row].exponential_(generator=own)
    sampled = (probs / noise.clamp_min_(_TINY)).argmax(dim=-1)
    return torch.where(params.greedy, best, sampled)


def row_generator(params: SamplingParams, device):
    """A row's own generator, seeded from its request; None for a row without a seed or a greedy one."""
    if params.seed is None or params.greedy:
        return None
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed_for_torch())
    return generator
