"""Benchmark (issue 12): does `finetune train` train the same under every launcher?

`accelerate launch --num_processes 1 --mixed_precision no -m finetune train` (what a default
`accelerate config` gives) was reported to log `loss nan` from the first step and write the adapter
anyway. This runs, on one GPU and rinna-3.6b's shape with random weights (bench/rinna_shape.py):

- plain `python -m finetune train`, the reference;
- the reported command, through bench/precision_probe.py with train.py's pin of the mixed
  precision switched off (PROBE_UNPINNED=1): the behaviour before the fix, with its precision print-outs;
- ACCELERATE_MIXED_PRECISION=no without accelerate, unpinned: the variable alone, not the launcher;
- `accelerate launch` with its defaults;
- the reported command as it is, with the fix;
- where the variable does decide (--dtype fp32 weights under `--mixed_precision fp16`), before and
  after the fix; float16 weights; and a run made to diverge (--lr 1e30) under the reported launcher.

    python bench/precision_launchers.py --out bench/results/train_precision_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from rinna_shape import RINNA_3_6B, TINY, build_dataset, build_model  # noqa: E402
from train_runs import device_info, run_launch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["rinna-3.6b", "tiny"], default="rinna-3.6b")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--samples", type=int, default=8000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bunshin-bench"))
    ap.add_argument("--only", default=None, help="comma-separated run names")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    model, data = a.work / f"model-{a.shape}", a.work / f"data-{a.samples}"
    if not (model / "config.json").exists():
        build_model(model, RINNA_3_6B if a.shape == "rinna-3.6b" else TINY)
    dataset = build_dataset(data, model, a.samples)
    py = sys.executable
    accelerate = [py, "-m", "accelerate.commands.launch"]
    probe = str(REPO / "bench" / "precision_probe.py")

    def train_args(name: str, *extra: str) -> list[str]:
        return ["train", str(data), "--base", str(model), "--out", str(a.work / name), "--force", "--max-steps", str(a.steps),
                "--eval-every", "0", "--save-every", "1000000", "--no-progress", *extra]

    one_gpu = {"CUDA_VISIBLE_DEVICES": "0"}
    runs = {
        "python": ([py, "-m", "finetune", *train_args("python")], one_gpu),
        "accelerate-no-unpinned": ([*accelerate, "--num_processes", "1", "--mixed_precision", "no", probe,
                                    *train_args("accelerate-no-unpinned")], {**one_gpu, "PROBE_UNPINNED": "1"}),
        "env-no-unpinned": ([py, probe, *train_args("env-no-unpinned")],
                            {**one_gpu, "PROBE_UNPINNED": "1", "ACCELERATE_MIXED_PRECISION": "no"}),
        "accelerate-defaults": ([*accelerate, "-m", "finetune", *train_args("accelerate-defaults")], one_gpu),
        "accelerate-no": ([*accelerate, "--num_processes", "1", "--mixed_precision", "no", "-m", "finetune",
                           *train_args("accelerate-no")], one_gpu),
        # Where the variable does decide: fp32 weights, whose TrainingArguments set neither bf16 nor fp16.
        "accelerate-fp16-dtype-fp32-unpinned": ([*accelerate, "--num_processes", "1", "--mixed_precision", "fp16", probe,
                                                 *train_args("accelerate-fp16-dtype-fp32-unpinned", "--dtype", "fp32")],
                                                {**one_gpu, "PROBE_UNPINNED": "1"}),
        "accelerate-fp16-dtype-fp32": ([*accelerate, "--num_processes", "1", "--mixed_precision", "fp16", probe,
                                        *train_args("accelerate-fp16-dtype-fp32", "--dtype", "fp32")], one_gpu),
        # float16 weights (an older GPU's default): fp16 autocast and GradScaler.
        "python-dtype-fp16": ([py, probe, *train_args("python-dtype-fp16", "--dtype", "fp16")], one_gpu),
        # A run that does diverge, under the reported launcher: it must stop, exit 1 and write nothing.
        "accelerate-no-lr-1e30": ([*accelerate, "--num_processes", "1", "--mixed_precision", "no", "-m", "finetune",
                                   *train_args("accelerate-no-lr-1e30", "--lr", "1e30")], one_gpu),
    }
    chosen = a.only.split(",") if a.only else list(runs)
    results = []
    for name in chosen:
        cmd, env = runs[name]
        r = run_launch(name, cmd, a.work / name, env)
        print(json.dumps(r, ensure_ascii=False), flush=True)
        results.append(r)
    report = {
        "benchmark": "finetune train under different launchers: loss, eval loss, adapter written or refused (issue 12)",
        "produced_by": "python bench/precision_launchers.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(),
        "shape": a.shape,
        "dataset": dataset,
        "steps_per_run": a.steps,
        "results": results,
    }
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    for r in results:
        loss = (r["last_step_log"] or {}).get("loss")
        print(f"{r['name']:24} rc={r['returncode']} last loss {loss} adapter={r['adapter_written']} "
              f"eval {r.get('eval_loss')} {r['errors'][:1]}")


if __name__ == "__main__":
    main()
