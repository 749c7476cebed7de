"""Packing short chat samples into long rows, without letting one sample see another.

Chat samples are short (median ~66 tokens). Padded batches of them leave a GPU idle between
tiny kernels and spend compute on padding. So samples are packed, best fit first, into rows of
`pack_length` tokens; each sample's position ids restart at 0, and transformers turns restarting
position ids (with no attention mask) into a block-diagonal causal mask: every sample attends
only to itself, exactly as if it were alone (tests/test_training.py checks the losses agree).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from .prompt import IGNORE_INDEX

USEFUL_TOKENS = "useful_tokens"  # batch key: non-padding tokens, for throughput; not a model input


@dataclass
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    samples: int


def pack_samples(encoded: list[tuple[list[int], list[int]]], pack_length: int) -> list[PackedRow]:
    """Best-fit-decreasing bin packing: O(n log n), rows nearly full, no sample split across rows."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]), reverse=True)
    rows: list[PackedRow] = []
    free: list[tuple[int, int]] = []  # (free space, row index), sorted: the tightest fit is found by bisect
    for i in order:
        ids, labels = encoded[i]
        n = len(ids)
        if n > pack_length:
            raise ValueError(f"sample of {n} tokens does not fit a row of {pack_length}")
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append(PackedRow([], [], [], 0))
            row_index, space = len(rows) - 1, pack_length
        else:
            space, row_index = free.pop(at)
        row = rows[row_index]
        row.input_ids += ids
        row.labels += labels
        row.position_ids += range(n)
        row.samples += 1
        if space - n > 0:
            bisect.insort(free, (space - n, row_index))
    return rows


class PackedCollator:
    """Stacks rows into a batch, each padded to `length` (static shapes keep the GPU's kernels
    and their autotuning stable); padding is its own 'sample' (positions from 0), unlabelled.

    `useful_tokens` (non-padding tokens in the batch) rides along so the trainer can report
    useful tokens per second; the trainer removes it before the model sees the batch.
    """

    def __init__(self, pad_id: int, length: int | None = None):
        self.pad_id = pad_id
        self.length = length

    def __call__(self, rows: list[PackedRow]):
        import torch

        longest = max(self.length or 0, *(len(r.input_ids) for r in rows))
        input_ids, labels, positions = [], [], []
        for r in rows:
            pad = longest - len(r.input_ids)
            input_ids.append(r.input_ids + [self.pad_id] * pad)
            labels.append(r.labels + [IGNORE_INDEX] * pad)
            positions.append(r.position_ids + list(range(pad)))
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            # A plain int, not a tensor: the Trainer moves tensors to the GPU, and reading one back
            # would make the CPU wait for the GPU every step.
            USEFUL_TOKENS: sum(len(r.input_ids) for r in rows),
        }


class FlatCollator:
    """The rows of a batch as ONE flat sequence plus the samples' boundaries (`cu_seq_lens_*`),
    for variable-length attention (packed_attention.py): no padding between samples, no mask.
    Padded at the end to `length` tokens so every step has the same shape."""

    def __init__(self, pad_id: int, length: int):
        self.pad_id = pad_id
        self.length = length

    def __call__(self, rows: list[PackedRow]):
        import torch

        ids = [t for r in rows for t in r.input_ids]
        labels = [t for r in rows for t in r.labels]
        positions = [p for r in rows for p in r.position_ids]
        useful = len(ids)
        pad = max(0, self.length - useful)
        ids += [self.pad_id] * pad
        labels += [IGNORE_INDEX] * pad
        positions += range(pad)
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        longest = max(b - a for a, b in zip(starts, starts[1:], strict=False))
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seq_lens_q": torch.tensor(starts, dtype=torch.int32),
            "cu_seq_lens_k": torch.tensor(starts, dtype=torch.int32),
            "max_length_q": longest,
            "max_length_k": longest,
            USEFUL_TOKENS: useful,
        }
