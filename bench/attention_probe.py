"""Probe: where does a LoRA training step on rinna-3.6b's shape spend its time?

Times forward+backward (LoRA r=16 on query_key_value, bf16, no optimizer) on one model for
several batch layouts and attention implementations, each after warm-up, with the GPU
synchronised around the timed region. Used to choose `finetune train`'s defaults; the numbers
go to bench/results/ with the training benchmark.

    python bench/attention_probe.py --model DIR [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def packed_batch(rows: int, length: int, rng: random.Random, vocab: int):
    """Rows of `length` tokens packed with chat-like samples (log-normal, median ~66)."""
    import math

    import torch

    ids, pos = [], []
    for _ in range(rows):
        row_ids, row_pos = [], []
        while len(row_ids) < length:
            n = max(8, int(math.exp(rng.gauss(math.log(66), 0.6))))
            n = min(n, length - len(row_ids))
            row_ids += [rng.randrange(4, vocab) for _ in range(n)]
            row_pos += list(range(n))
        ids.append(row_ids)
        pos.append(row_pos)
    return torch.tensor(ids), torch.tensor(pos)


def time_steps(model, make_inputs, steps: int = 10, warmup: int = 3) -> tuple[float, float]:
    import torch

    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        inputs = make_inputs()
        out = model(**inputs)
        out.loss.backward()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, torch.cuda.max_memory_allocated() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--variants", default="all")
    a = ap.parse_args()

    import sys

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from finetune import packed_attention
    from finetune.packing import FlatCollator, PackedRow

    rng = random.Random(0)
    results = []
    flat_losses = {}
    for attn in ("sdpa", packed_attention.register(), "flex_attention"):
        model = AutoModelForCausalLM.from_pretrained(str(a.model), dtype=torch.bfloat16, attn_implementation=attn).cuda()
        model.config.use_cache = False
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["query_key_value"], task_type="CAUSAL_LM"))
        vocab = model.config.vocab_size
        layouts = {
            "sdpa": [("packed", 1, 2048), ("packed", 2, 2048), ("flat", 1, 2048), ("single-sequence", 1, 2048),
                     ("dense-random", 8, 256)],
            packed_attention.NAME: [("flat", 1, 2048), ("flat", 1, 4096), ("flat", 1, 8192)],
            "flex_attention": [("packed", 2, 2048)],
        }[attn]
        for layout, rows, length in layouts:
            if layout in ("packed", "flat"):
                ids, pos = packed_batch(rows, length, rng if layout == "packed" else random.Random(length), vocab)

                if layout == "flat":
                    row = PackedRow(ids[0].tolist(), ids[0].tolist(), pos[0].tolist(), 0)
                    batch = FlatCollator(0, length)([row])
                    batch.pop("useful_tokens")

                    def make(batch=batch):
                        return {k: (v.cuda() if hasattr(v, "cuda") else v) for k, v in batch.items()}
                else:
                    def make(ids=ids, pos=pos):
                        return {"input_ids": ids.cuda(), "position_ids": pos.cuda(), "labels": ids.cuda()}
            else:
                ids = torch.randint(4, vocab, (rows, length))

                def make(ids=ids):
                    return {"input_ids": ids.cuda(), "labels": ids.cuda()}
            try:
                if layout == "flat":
                    with torch.no_grad():
                        flat_losses[(attn, length)] = model(**make()).loss.item()
                seconds, peak = time_steps(model, make)
                r = {"attn": attn, "layout": layout, "rows": rows, "length": length,
                     "tokens_per_second": round(rows * length / seconds), "step_ms": round(seconds * 1000, 1),
                     "peak_gb": round(peak, 2)}
                if layout == "flat":
                    r["loss"] = round(flat_losses[(attn, length)], 5)
            except Exception as exc:  # a variant that cannot run is a finding, not a crash
                r = {"attn": attn, "layout": layout, "rows": rows, "length": length, "error": f"{type(exc).__name__}: {exc}"[:300]}
            print(json.dumps(r), flush=True)
            results.append(r)
        del model
        torch.cuda.empty_cache()
    # The same flat 2048-token batch through masked SDPA and through varlen must give the same loss.
    if ("sdpa", 2048) in flat_losses and (packed_attention.NAME, 2048) in flat_losses:
        a_, b_ = flat_losses[("sdpa", 2048)], flat_losses[(packed_attention.NAME, 2048)]
        check = {"check": "flat batch loss, sdpa vs varlen", "sdpa": a_, "varlen": b_, "relative_difference": abs(a_ - b_) / abs(a_)}
        print(json.dumps(check), flush=True)
        results.append(check)
    if a.out:
        a.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
