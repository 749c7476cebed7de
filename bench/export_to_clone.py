"""Benchmark: the whole path a user waits for, from a large export to a judged clone, each stage timed.

A synthetic LINE export of `--lines` lines (bench/synthetic_line.py: a group chat, stickers, photos, quoted
multi-line messages) is turned into a judged clone by the real commands, each in its own process, as a user
runs them:

    inspect EXPORT  ->  prepare EXPORT --persona 佐藤  ->  train DATASET --base BASE (defaults)
                    ->  eval ADAPTER --systems base,tuned

The base is a random-weight model with rinna/japanese-gpt-neox-3.6b's shape (bench/rinna_shape.py: as fast as
the real one); building it stands in for the download and is not counted. Goal (issue 23, one H200): the four
stages together in under 5 minutes for 100,000 messages. Each stage's figure comes with what the command
printed of its own work (samples, steps, tokens/s), so the lever is visible.

    python bench/export_to_clone.py --out bench/results/export_to_clone_h200.json            # one GPU
    python bench/export_to_clone.py --shape tiny --lines 3000 --out /tmp/x.json              # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from rinna_shape import RINNA_3_6B, TINY, build_model  # noqa: E402
from synthetic_line import write_export  # noqa: E402
from train_runs import launch_env  # noqa: E402

GOAL_S = 300
PERSONA = "佐藤"
SHAPES = {"rinna": RINNA_3_6B, "tiny": TINY}


def stage(name: str, args: list[str], log: Path) -> dict:
    """One command as a user runs it; its wall time and the tail of what it printed."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "finetune", *args], cwd=REPO, env=launch_env(), capture_output=True,
                          text=True)
    seconds = time.perf_counter() - started
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr, encoding="utf-8")
    result = {"command": "python -m finetune " + " ".join(args), "seconds": round(seconds, 2), "rc": proc.returncode}
    if proc.returncode != 0:
        result["error_tail"] = (proc.stderr or proc.stdout)[-1500:]
    result["printed_tail"] = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()][-6:]
    print(name, result["seconds"], "s", "rc", proc.returncode, flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--lines", type=int, default=100_000)
    p.add_argument("--shape", choices=sorted(SHAPES), default="rinna")
    p.add_argument("--work", default=None, help="folder for the export, base and outputs (kept)")
    p.add_argument("--train-args", default="", help="extra arguments for train (default: none, the defaults)")
    p.add_argument("--eval-args", default="", help="extra arguments for eval")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bunshin-path-"))
    work.mkdir(parents=True, exist_ok=True)
    export = work / "export.txt"
    if not export.exists():
        write_export(export, args.lines)
    base = work / f"base-{args.shape}"
    if not (base / "config.json").exists():
        build_model(base, SHAPES[args.shape])
    ds, adapter, report = work / "dataset", work / "adapter", work / "report"
    stages = {
        "inspect": stage("inspect", ["inspect", str(export)], work / "inspect.log"),
        "prepare": stage("prepare", ["prepare", str(export), "--persona", PERSONA, "--out", str(ds), "--force",
                                     "--no-progress"], work / "prepare.log"),
    }
    stages["train"] = stage("train", ["train", str(ds), "--base", str(base), "--out", str(adapter), "--force",
                                      "--no-progress", *args.train_args.split()], work / "train.log")
    stages["eval"] = stage("eval", ["eval", str(adapter), "--data", str(ds), "--out", str(report), "--force",
                                    "--systems", "base,tuned", "--no-progress", *args.eval_args.split()], work / "eval.log")
    stats = json.loads((ds / "stats.json").read_text(encoding="utf-8")) if (ds / "stats.json").exists() else {}
    manifest = adapter / "bunshin.json"
    training = json.loads(manifest.read_text(encoding="utf-8")).get("training", {}) if manifest.exists() else {}
    total = sum(s["seconds"] for s in stages.values())
    import torch

    result = {
        "benchmark": "export_to_clone",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                   "torch": torch.__version__, "python": sys.version.split()[0]},
        "shape": args.shape,
        "export_lines": args.lines,
        "goal_s": GOAL_S,
        "total_s": round(total, 2),
        "met": total < GOAL_S and all(s["rc"] == 0 for s in stages.values()),
        "stages": stages,
        "dataset": {k: stats.get(k) for k in ("train_samples", "eval_samples", "samples", "persona_messages")
                    if k in stats} or {k: v for k, v in stats.items() if isinstance(v, (int, float))},
        "training": training,
    }
    Path(args.out).write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("total_s", "met")}, ensure_ascii=False))
    print({name: s["seconds"] for name, s in stages.items()})


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
