"""Training refuses to lie: a loss or gradient that is not a finite number stops `train`, and
weights holding NaN or inf are refused where an adapter is loaded.

Once a NaN reaches the LoRA weights every later step is NaN too, and an adapter written from them
answers with garbage (or nothing) while its manifest looks like any other. So the run stops at the
first such step, with the step and the likely causes, and writes no adapter.

Per-step cost: the watch keeps the first bad step on the device (a few tiny kernels a step, no
read-back). Reading a value back every step would make the CPU wait for the GPU at each step
instead of queueing the next step's kernels; that is why `logging_nan_inf_filter` is off in
train.py. The watch is read only where the Trainer waits for the GPU anyway (logging, saving,
evaluating, the last step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

LOSS, GRADIENT = "loss", "gradient norm"
_SLOTS = {LOSS: 0, GRADIENT: 2}  # state[i] = first bad step (-1: none), state[i + 1] = its value


class NonFiniteError(Exception):
    """Training produced a loss or gradient that is not a finite number; nothing was written."""


@dataclass(frozen=True)
class NonFinite:
    what: str  # LOSS or GRADIENT
    step: int  # optimizer step, counted from 1 as the progress bar does
    value: float


class NonFiniteWatch:
    """The first optimizer step whose loss or gradient norm was NaN or inf, kept on the device."""

    def __init__(self, device):
        import torch

        self._torch = torch
        # float32: MPS has no float64, and steps stay exact up to 2**24.
        self.state = torch.tensor([-1.0, 0.0, -1.0, 0.0], dtype=torch.float32, device=device)

    def see(self, what: str, value, step: int) -> None:
        """Record `value` (a 0-d tensor) for optimizer step `step`; no read-back, so no wait for the GPU."""
        torch = self._torch
        i = _SLOTS[what]
        value = value.detach().reshape(()).to(device=self.state.device, dtype=torch.float32)
        first = ~torch.isfinite(value) & (self.state[i] < 0)
        seen = torch.stack([torch.full_like(value, float(step)), value])
        self.state[i : i + 2] = torch.where(first, seen, self.state[i : i + 2])

    def first(self) -> NonFinite | None:
        """The earliest bad step over all processes (reads the device, and gathers across ranks)."""
        torch = self._torch
        state = self.state
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank calls this at the same steps (the Trainer's log/save decisions are the same
            # on all of them), so each sees the same answer and all stop together: a rank that
            # stopped alone would leave the others waiting in their next all-reduce.
            gathered = [torch.empty_like(state) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(gathered, state)
            rows = [g.tolist() for g in gathered]
        else:
            rows = [state.tolist()]
        found = [NonFinite(what, int(row[i]), row[i + 1]) for row in rows for what, i in _SLOTS.items() if row[i] >= 0]
        # The loss of a step comes before its gradient: on the same step, report the loss.
        return min(found, key=lambda f: (f.step, _SLOTS[f.what]), default=None)


def likely_causes(*, lr: float, dtype: str, accelerate_precision: str | None) -> list[str]:
    """What usually makes a LoRA run diverge, the ones that apply to this run first.
    `accelerate_precision`: the ACCELERATE_MIXED_PRECISION the run was launched with, if any."""
    causes = [f"the learning rate (--lr {lr:g}) is too high for this model and data: try it 3-10 times lower"]
    if dtype == "float16":
        causes.insert(0, "float16 overflowed (its largest value is 65504): train with --dtype bf16 (GPUs from "
                         "Ampere on) or --dtype fp32")
    else:
        causes.append("float16 overflow, where a run trains in float16 (--dtype fp16, or an older GPU's default)")
    setting = (f" (this run was launched with ACCELERATE_MIXED_PRECISION={accelerate_precision}, which train "
               "overrides to match --dtype)") if accelerate_precision else ""
    causes.append(f"an accelerate launch setting{setting}; a DeepSpeed or FSDP config brings its own precision: "
                  "`python -m finetune train` without accelerate shows whether the launcher is the cause")
    return causes


def describe(found: NonFinite, total_steps: int, causes: list[str]) -> str:
    value = "nan" if math.isnan(found.value) else ("inf" if found.value > 0 else "-inf")
    return (f"training stopped at step {found.step} of {total_steps}: the {found.what} was {value}, so the weights "
            f"are no longer usable and no adapter was written. Likely causes: {'; '.join(causes)}")


def nonfinite_tensors(tensors: dict) -> list[str]:
    """Names of the floating-point tensors in `tensors` that hold a NaN or an inf."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(t.isfinite().all())]


def read_weights(path: Path) -> dict:
    """An adapter weights file (safetensors, or a peft .bin) as name -> tensor, on the CPU."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    import torch

    return torch.load(str(path), map_location="cpu", weights_only=True)


def refusal(path: Path, bad: list[str]) -> str:
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    return (f"{path} holds NaN or inf weights ({bad[0]}{more}): the training run that wrote it diverged; "
            "train again (a lower --lr) instead of serving it")
