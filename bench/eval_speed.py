"""How long `python -m finetune eval` takes for 256 held-out samples, base and tuned, on a GPU.

The model has rinna/japanese-gpt-neox-3.6b's shape with random weights and a random LoRA r=16 adapter
(bench/rinna_shape.py, bench/generation_speed.py): it runs as fast as the real one. Random weights never
choose EOS, so every reply runs to the manifest's 128 new tokens: the slowest case (real replies are a
line or two). Each run is the real command in its own process, timed from the outside, with the
report's own breakdown (model load, each system's loss + warm-up + generation, scoring) kept beside it.

    python bench/eval_speed.py --out bench/results/eval_h200.json [--runs 3] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation_speed import device_info, make_adapter  # noqa: E402
from rinna_shape import RINNA_3_6B, TINY, build_dataset, build_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLES = 256
GOAL_S = 60.0


def spread(values: list[float]) -> dict:
    return {"min": round(min(values), 2), "median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch", type=int, default=32, help="passed to `finetune eval --batch`")
    p.add_argument("--shape", choices=("rinna", "tiny"), default="rinna")
    p.add_argument("--work", default=None)
    args = p.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bunshin-eval-"))
    started = time.monotonic()
    base, adapter, data = work / "base", work / "adapter", work / "data"
    if not (base / "config.json").exists():
        build_model(base, RINNA_3_6B if args.shape == "rinna" else TINY)
    if not (adapter / "bunshin.json").exists():
        make_adapter(base, adapter, max_length=512)
    if not (data / "eval.jsonl").exists():
        build_dataset(data, base, samples=SAMPLES * 50)  # a fiftieth goes to eval.jsonl: 256 samples
    print(f"model, adapter and data ready in {time.monotonic() - started:.0f}s", flush=True)

    runs = []
    for i in range(args.runs):
        out = work / f"report-{i}"
        command = [sys.executable, "-m", "finetune", "eval", str(adapter), "--data", str(data), "--out", str(out),
                   "--samples", str(SAMPLES), "--batch", str(args.batch), "--no-progress", "--force"]
        began = time.monotonic()
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall = time.monotonic() - began
        if proc.returncode != 0:
            raise SystemExit(f"run {i} failed:\n{proc.stderr[-3000:]}")
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        timing = report["timing"]
        runs.append({"wall_s": round(wall, 2), **timing,
                     "eval_without_load_s": round(timing["total_s"] - timing.get("load_s", 0.0), 2),
                     "samples": report["samples"],
                     "mean_reply_chars": {n: s["summary"]["mean_chars"] for n, s in report["systems"].items()}})
        print(json.dumps(runs[-1], ensure_ascii=False), flush=True)

    result = {
        "benchmark": "eval_speed",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(),
        "model": f"GPT-NeoX, {args.shape} shape, random weights, LoRA r=16 adapter (unmerged: base is the LoRA switched off)",
        "workload": f"{SAMPLES} held-out samples, systems base and tuned, 128 new tokens each (random weights never "
                    f"stop early), temperature 0.7, --batch {args.batch}",
        "goal": f"well under {GOAL_S:.0f} s for the whole command",
        "runs": runs,
        "wall_s": spread([r["wall_s"] for r in runs]),
        "eval_without_load_s": spread([r["eval_without_load_s"] for r in runs]),
    }
    Path(args.out).write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("wall_s", "eval_without_load_s")}), flush=True)


if __name__ == "__main__":
    main()
