"""Benchmark: `finetune train` against the community LoRA recipe, on rinna-3.6b's shape.

Builds a random-weight model with rinna/japanese-gpt-neox-3.6b's shape (same speed as the real
one) and a synthetic chat dataset whose lengths look like real chat, then runs, each in its own
process: `finetune train` in bf16, 8-bit and 4-bit, and the community recipe (8-bit, r=8, batches
of 8 padded in random order). Reports useful (non-padding) tokens per second and peak GPU memory.

    python bench/train_throughput.py --out bench/results/train_h100.json      # on a GPU
    python bench/train_throughput.py --shape tiny --runs ours-bf16              # a CPU smoke run

Goals (issue 3): >= 20,000 useful tokens/s on an H100; bf16 LoRA peak < 16 GB; 4-bit < 8 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from rinna_shape import RINNA_3_6B, TINY, build_dataset, build_model  # noqa: E402

GOALS = {"useful_tokens_per_second": 20000, "bf16_peak_gb": 16, "4bit_peak_gb": 8}


def ours(name: str, extra: list[str]) -> dict:
    return {"name": name, "kind": "ours", "args": extra}


RUNS = {
    "ours-bf16": ours("finetune train, bf16, defaults (4096 tokens/step on this GPU)", []),
    "ours-bf16-2k": ours("finetune train, bf16, 2048 tokens/step (what it picks on a 24 GB card)", ["--batch-tokens", "2048"]),
    "ours-bf16-sdpa": ours("finetune train, bf16, masked SDPA over packed rows instead of varlen", ["--attention", "sdpa"]),
    "ours-bf16-2k-compiled": ours("finetune train, bf16, 2048 tokens/step, torch.compile",
                                  ["--batch-tokens", "2048", "--compile"]),
    "ours-bf16-compiled": ours("finetune train, bf16, defaults, torch.compile", ["--compile"]),
    "ours-8bit": ours("finetune train, 8-bit", ["--quantize", "8bit"]),
    "ours-4bit": ours("finetune train, 4-bit", ["--quantize", "4bit"]),
    "community-8bit": {"name": "community recipe: 8-bit, r=8, batch 8 random order padded", "kind": "community"},
}


def run_one(key: str, model: Path, data: Path, work: Path, steps: int) -> dict:
    spec = RUNS[key]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(REPO / "bench"), os.environ.get("PYTHONPATH")]))}
    start = time.time()
    if spec["kind"] == "ours":
        out = work / f"adapter-{key}"
        cmd = [sys.executable, "-m", "finetune", "train", str(data), "--base", str(model), "--out", str(out), "--force",
               "--max-steps", str(steps), "--eval-every", "0", "--save-every", "1000000", "--no-progress", *spec["args"]]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"key": key, "name": spec["name"], "error": proc.stderr[-2000:]}
        training = json.loads((out / "bunshin.json").read_text(encoding="utf-8"))["training"]
        result = {k: training[k] for k in ("useful_tokens_per_second", "useful_tokens_per_second_overall", "peak_gpu_memory_gb", "steps", "rows_per_step",
                                           "tokens_per_step", "pack_length", "gradient_checkpointing", "attention", "compiled", "dtype",
                                           "quantize", "train_seconds")}
    else:
        cmd = [sys.executable, str(REPO / "bench" / "community_recipe.py"), "--model", str(model), "--data", str(data),
               "--steps", str(steps)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"key": key, "name": spec["name"], "error": proc.stderr[-2000:]}
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"key": key, "name": spec["name"], "command": " ".join(cmd[1:]).replace(str(REPO) + "/", ""),
            "wall_seconds": round(time.time() - start, 1), **result}


def device_info() -> dict:
    info = {"python": platform.python_version()}
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__)
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 1e9, 1))
        import peft

        info["peft"] = peft.__version__
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["rinna-3.6b", "tiny"], default="rinna-3.6b")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from: {', '.join(RUNS)}")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bunshin-bench"))
    ap.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    a = ap.parse_args()

    model, data = a.work / f"model-{a.shape}", a.work / "data"
    t = time.time()
    if not (model / "config.json").exists():
        build_model(model, RINNA_3_6B if a.shape == "rinna-3.6b" else TINY)
    build_seconds = round(time.time() - t, 1)
    dataset = build_dataset(data, model, a.samples)
    print(f"model {a.shape} in {build_seconds}s; dataset {dataset}", flush=True)
    results = []
    for key in a.runs.split(","):
        r = run_one(key.strip(), model, data, a.work, a.steps)
        print(json.dumps(r, ensure_ascii=False), flush=True)
        results.append(r)

    by_key = {r["key"]: r for r in results if "error" not in r}
    community = by_key.get("community-8bit", {}).get("useful_tokens_per_second")
    best = max((r for r in by_key.values() if r["key"].startswith("ours-bf16")),
               key=lambda r: r["useful_tokens_per_second"], default=None)
    verdict = {}
    if best:
        verdict["best_bf16"] = best["key"]
        verdict["useful_tokens_per_second"] = best["useful_tokens_per_second"]
        verdict["meets_speed_goal"] = best["useful_tokens_per_second"] >= GOALS["useful_tokens_per_second"]
        if community:
            verdict["speedup_over_community"] = round(best["useful_tokens_per_second"] / community, 1)
    if by_key.get("ours-bf16-2k", {}).get("peak_gpu_memory_gb") is not None:
        # The memory goal is about 24 GB cards, where the default step is 2048 tokens.
        verdict["bf16_peak_gb_24gb_card_setting"] = verdict["bf16_peak_gb"] = by_key["ours-bf16-2k"]["peak_gpu_memory_gb"]
        verdict["meets_bf16_memory_goal"] = verdict["bf16_peak_gb"] < GOALS["bf16_peak_gb"]
    if by_key.get("ours-4bit", {}).get("peak_gpu_memory_gb") is not None:
        verdict["4bit_peak_gb"] = by_key["ours-4bit"]["peak_gpu_memory_gb"]
        verdict["meets_4bit_memory_goal"] = verdict["4bit_peak_gb"] < GOALS["4bit_peak_gb"]
    report = {
        "benchmark": "LoRA training throughput and memory, rinna-3.6b shape, synthetic chat lengths",
        "produced_by": "python bench/train_throughput.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(),
        "shape": a.shape,
        "dataset": dataset,
        "steps_per_run": a.steps,
        "goals": GOALS,
        "results": results,
        "verdict": verdict,
    }
    text = json.dumps(report, ensure_ascii=False, indent=2) + "\n"
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text, encoding="utf-8")
    print(f"\n{'run':18} {'useful tok/s':>12} {'peak GB':>9}")
    for r in results:
        print(f"{r['key']:18} {r.get('useful_tokens_per_second', 'ERROR')!s:>12} {r.get('peak_gpu_memory_gb', '')!s:>9}")
    print(json.dumps(verdict))


if __name__ == "__main__":
    main()
