"""Benchmark (issue 12): `finetune train` on one GPU and on several through torchrun, and what
the progress line and the manifest report for the whole run.

rinna-3.6b's shape with random weights (bench/rinna_shape.py), the same steps on each. The
manifest's `useful_tokens_per_second` is the whole run's (all processes summed), with
`world_size` and `useful_tokens_per_second_by_process` beside it.

    python bench/train_multi_gpu.py --gpus 2 --out bench/results/train_h200x2.json
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
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--samples", type=int, default=8000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bunshin-bench"))
    ap.add_argument("--device", default=None, help="pass --device to train (cpu: a smoke run of the launches)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    model, data = a.work / f"model-{a.shape}", a.work / f"data-{a.samples}"
    if not (model / "config.json").exists():
        build_model(model, RINNA_3_6B if a.shape == "rinna-3.6b" else TINY)
    dataset = build_dataset(data, model, a.samples)
    py = sys.executable

    def train_args(name: str) -> list[str]:
        extra = ["--device", a.device] if a.device else []
        return ["train", str(data), "--base", str(model), "--out", str(a.work / name), "--force", "--max-steps", str(a.steps),
                "--eval-every", "0", "--save-every", "1000000", "--no-progress", *extra]

    gpus = ",".join(map(str, range(a.gpus)))
    one = run_launch("1-gpu", [py, "-m", "finetune", *train_args("1-gpu")], a.work / "1-gpu", {"CUDA_VISIBLE_DEVICES": "0"})
    print(json.dumps(one, ensure_ascii=False), flush=True)
    many = run_launch(f"{a.gpus}-gpu-torchrun",
                      [py, "-m", "torch.distributed.run", "--nproc_per_node", str(a.gpus), "-m", "finetune",
                       *train_args(f"{a.gpus}-gpu")], a.work / f"{a.gpus}-gpu", {"CUDA_VISIBLE_DEVICES": gpus})
    print(json.dumps(many, ensure_ascii=False), flush=True)

    verdict = {}
    if "training" in one and "training" in many:
        t1, tn = one["training"], many["training"]
        verdict = {
            "world_size": tn["world_size"],
            "useful_tokens_per_second_1_gpu": t1["useful_tokens_per_second"],
            f"useful_tokens_per_second_{a.gpus}_gpus": tn["useful_tokens_per_second"],
            "by_process": tn["useful_tokens_per_second_by_process"],
            "scaling": round(tn["useful_tokens_per_second"] / t1["useful_tokens_per_second"], 2),
            "whole_run_is_sum_of_processes": abs(sum(tn["useful_tokens_per_second_by_process"])
                                                 - tn["useful_tokens_per_second"]) < 1.0,
        }
    report = {
        "benchmark": "LoRA training throughput, 1 GPU vs torchrun, whole-run figures in the manifest (issue 12)",
        "produced_by": "python bench/train_multi_gpu.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(),
        "shape": a.shape,
        "dataset": dataset,
        "steps_per_run": a.steps,
        "results": [one, many],
        "verdict": verdict,
    }
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(verdict))


if __name__ == "__main__":
    main()
