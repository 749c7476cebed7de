"""Probe: where a decode step's time goes in the slot engine (rinna-3.6b shape, random weights).

Times one CUDA-graph replay per (batch, cache length) bucket, a whole engine step (sampling and
bookkeeping included), one prefill, and lists the GPU kernels of one eager decode forward by
total time. Used to decide what to optimise; bench/generation_speed.py has the goal figures.

    python bench/decode_probe.py --work /tmp/genwork --out probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main() -> None:
    import torch
    from engine_driver import slot_engine
    from torch.profiler import ProfilerActivity, profile

    from finetune.generation import GenerationSettings
    from finetune.model_loading import load_persona_model

    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True, help="folder with base/ and adapter/ from generation_speed.py")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    loaded = load_persona_model(Path(args.work) / "adapter", merge=True)
    settings = GenerationSettings(max_new_tokens=64, temperature=0.0, repetition_penalty=1.0)
    engine = slot_engine(loaded.model, loaded.tokenizer, settings, slots=32, length=512)
    result: dict = {"replay_ms": {}, "step_ms": {}}

    def timed(fn, n=50):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return round((time.perf_counter() - t) / n * 1000, 3)

    for (batch, kv), (graph, _) in engine.runner._graphs.items():
        if kv in (256, 512):
            result["replay_ms"][f"{batch}x{kv}"] = timed(graph.replay)

    prompt = list(range(10, 210))
    for batch in (1, 8, 32):
        engine.abort()
        for i in range(batch):
            engine.add(i, prompt)
        engine.step()  # prefill all
        # Steady decode steps (rows never end: long max_new_tokens would be needed; re-add if so).
        result["step_ms"][str(batch)] = timed(engine.step, n=30)
    engine.abort()

    def prefill(n):
        def run():
            for i in range(n):
                engine.add(i, prompt)
            engine.step()
            engine.abort()
        return run

    result["prefill_ms"] = {str(n): timed(prefill(n), n=10) for n in (1, 4, 8)}

    engine.add(0, prompt)
    engine.step()
    with torch.inference_mode():
        engine.runner._ids[:1] = 5
        engine.runner._pos[:1] = 250
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.runner._forward_decode(1, 256)
            torch.cuda.synchronize()
    # (kernel, calls, GPU microseconds) for every kernel that ran on the GPU
    kernels = [(e.key, e.count, getattr(e, "self_device_time_total", 0)) for e in prof.key_averages()]
    kernels = sorted((k for k in kernels if k[2] > 0), key=lambda k: -k[2])
    result["eager_forward_1x256"] = {
        "kernels": sum(calls for _, calls, _ in kernels),
        "gpu_ms": round(sum(us for _, _, us in kernels) / 1000, 3),
        "top": [{"kernel": name[:90], "calls": calls, "ms": round(us / 1000, 3)} for name, calls, us in kernels[:20]],
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
