"""Probe: what precision `finetune train` really trains in, under whatever launcher runs it.

Runs `python -m finetune train ...` in-process with print-outs added (issue 12: `accelerate launch
--mixed_precision no` gave NaN from the first step): the launcher's environment, the Accelerator's
mixed precision, autocast, GradScaler, the dtypes of the LoRA weights, their gradients and the
optimizer state, and each step's loss and gradient norm (read back every step: slow, a probe only).

    accelerate launch --num_processes 1 --mixed_precision no bench/precision_probe.py train DATA --out A ...
    PROBE_UNPINNED=1 python bench/precision_probe.py train ...   # without train.py's pin_mixed_precision
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHOW_STEPS = 5  # every step up to here, then every 10th


def say(*parts) -> None:
    print(f"probe[rank {os.environ.get('RANK', '0')}]:", *parts, file=sys.stderr, flush=True)


def dtypes(tensors) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in tensors:
        if t is not None:
            key = str(t.dtype).removeprefix("torch.")
            counts[key] = counts.get(key, 0) + 1
    return counts


def install() -> None:
    import torch
    import transformers

    import finetune.train as train

    if os.environ.get("PROBE_UNPINNED"):
        train.pin_mixed_precision = lambda precision, dtype: say(f"pin_mixed_precision({precision!r}) skipped")
    say("env", {k: v for k, v in sorted(os.environ.items())
                if k.startswith(("ACCELERATE_", "OMP_", "CUDA_VISIBLE", "WORLD_SIZE", "LOCAL_RANK", "NCCL_NVLS"))})
    say("versions", {"torch": torch.__version__, "transformers": transformers.__version__,
                     "accelerate": __import__("accelerate").__version__, "peft": __import__("peft").__version__})

    trainer_cls = transformers.Trainer
    create = trainer_cls.create_accelerator_and_postprocess

    def create_and_show(self):
        create(self)
        acc = self.accelerator
        say("TrainingArguments", {"bf16": self.args.bf16, "fp16": self.args.fp16,
                                  "mixed_precision": self.args.mixed_precision, "max_grad_norm": self.args.max_grad_norm})
        say("Accelerator", {"mixed_precision": acc.mixed_precision, "native_amp": acc.native_amp,
                            "scaler": type(acc.scaler).__name__ if acc.scaler is not None else None,
                            "distributed_type": str(acc.distributed_type)})

    trainer_cls.create_accelerator_and_postprocess = create_and_show

    step_fn = trainer_cls.training_step
    grad_fn = trainer_cls._get_grad_norm

    def shown(step: int) -> bool:
        return step <= SHOW_STEPS or step % 10 == 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step + 1
        if step == 1:
            trainable = [p for p in model.parameters() if p.requires_grad]
            frozen = [p for p in model.parameters() if not p.requires_grad]
            say("weights", {"trainable": dtypes(trainable), "frozen": dtypes(frozen)})
            say("forward is accelerate-wrapped:", hasattr(model.forward, "__wrapped__") or "autocast" in repr(model.forward))
            lora = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))

            def pre(module, args):
                say("in lora_A: autocast", torch.is_autocast_enabled("cuda") if torch.cuda.is_available() else None,
                    torch.get_autocast_dtype("cuda") if torch.cuda.is_available() else None, "input", args[0].dtype)

            handle = lora.register_forward_pre_hook(pre)
            self._probe_handle = handle
        loss = step_fn(self, model, inputs, num_items_in_batch)
        if step == 1:
            self._probe_handle.remove()
            grads = [p.grad for p in model.parameters() if p.requires_grad]
            say("gradients", dtypes(grads))
        if shown(step):
            say(f"step {step} loss {loss.item():.4f}")
        return loss

    def get_grad_norm(self, model, grad_norm=None):
        value = grad_fn(self, model, grad_norm=grad_norm)
        step = self.state.global_step + 1
        if shown(step):
            say(f"step {step} grad_norm {float(value):.4g}")
        if step == 2:
            states = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
            say("optimizer state", dtypes(states), type(self.optimizer).__name__)
        return value

    trainer_cls.training_step = training_step
    trainer_cls._get_grad_norm = get_grad_norm


if __name__ == "__main__":
    install()
    from finetune.cli import main

    raise SystemExit(main(sys.argv[1:]))
