"""Benchmark: does the clone know the person? LoRA alone against LoRA + memory, on the synthetic fact persona.

One run, every step a bunshin command as a user would type it:

    finetune synth-persona  ->  prepare  ->  train --memory-notes 0   (LoRA alone)
                                         ->  train --memory-notes 3   (trained with the persona's memory)
    eval LORA_ALONE --systems tuned --probes                       (the LoRA-only figures)
    eval WITH_MEMORY --systems base,tuned,prompt-only,hybrid --probes  (the four systems)

Goals (issue 22, on Gemma 3 270M): the hybrid answers >= 80% of the probes of stated facts right, gives the old
value for at most 1 in 10 changed facts, invents a specific value for at most 1 in 10 never-stated ones, beats
LoRA alone and prompt-only on fact accuracy, and keeps its style (style distance no worse than tuned's).

    python bench/memory_facts.py --base ~/.cache/bunshin/bases/gemma-3-270m --out bench/results/memory_facts_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOALS = {"fact_accuracy_min": 0.8, "stale_rate_max": 0.1, "invented_rate_max": 0.1}


def sh(args: list[str], log: list[dict]) -> None:
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "finetune", *map(str, args)], cwd=REPO, capture_output=True, text=True)
    log.append({"command": "python -m finetune " + " ".join(map(str, args)), "seconds": round(time.monotonic() - began, 1),
                "rc": done.returncode, "tail": done.stdout[-1500:] + done.stderr[-1500:]})
    print(f"[{log[-1]['seconds']:>6.1f}s] rc={done.returncode} {log[-1]['command']}", flush=True)
    if done.returncode != 0:
        print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
        raise SystemExit(done.returncode)


def device() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    return {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="base model folder (e.g. the converted Gemma 3 270M)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bunshin-memory-facts"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "memory_facts.json")
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=-1, help="for a smoke run")
    parser.add_argument("--samples", type=int, default=0, help="held-out samples scored (0: all)")
    parser.add_argument("--memory-from-reply", action="store_true", help="train --memory-from-reply for the hybrid")
    parser.add_argument("--memory-drill", type=int, default=1, help="train --memory-drill for the hybrid")
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="train --batch-tokens (default: train's own, from free GPU memory: set it when runs share a GPU)")
    args = parser.parse_args()

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    log: list[dict] = []
    synth, data = work / "synth", work / "dataset"
    sh(["synth-persona", synth, "--seed", args.seed], log)
    sh(["prepare", synth / "line_export.txt", "--persona", "彩花", "--out", data, "--timezone", "Asia/Tokyo"], log)
    train = ["--base", args.base, "--epochs", args.epochs, "--lr", args.lr, "--seed", args.seed, "--max-steps",
             args.max_steps, "--no-style-eval", "--eval-every", 0, "--no-progress"]
    if args.batch_tokens:
        train += ["--batch-tokens", args.batch_tokens]
    sh(["train", data, "--out", work / "lora-alone", "--memory-notes", 0, *train], log)
    from_reply = ["--memory-from-reply"] if args.memory_from_reply else []
    sh(["train", data, "--out", work / "with-memory", "--memory-notes", 3, *from_reply, "--memory-drill",
        args.memory_drill, *train], log)
    common = ["--data", data, "--probes", synth / "probes.jsonl", "--samples", args.samples, "--seed", args.seed,
              "--base", args.base, "--no-progress"]
    sh(["eval", work / "lora-alone", "--out", work / "report-lora-alone", "--systems", "tuned", *common], log)
    sh(["eval", work / "with-memory", "--out", work / "report", "--systems", "base,tuned,prompt-only,hybrid", *common], log)

    alone = json.loads((work / "report-lora-alone" / "report.json").read_text(encoding="utf-8"))
    report = json.loads((work / "report" / "report.json").read_text(encoding="utf-8"))
    systems = {"lora-alone": {**_figures(alone, "tuned")}, **{n: _figures(report, n) for n in report["systems"]}}
    hybrid = systems["hybrid"]
    verdict = {
        "fact_accuracy": hybrid["fact_accuracy"] >= GOALS["fact_accuracy_min"],
        "stale_rate": hybrid["stale_rate"] <= GOALS["stale_rate_max"],
        "invented_rate": hybrid["invented_rate"] <= GOALS["invented_rate_max"],
        "beats_lora_alone": hybrid["fact_accuracy"] > systems["lora-alone"]["fact_accuracy"],
        "beats_prompt_only": hybrid["fact_accuracy"] > systems["prompt-only"]["fact_accuracy"],
        "style_kept": hybrid["style_distance"] <= systems["lora-alone"]["style_distance"] + 0.02,
    }
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": "fact probes on the synthetic persona: LoRA alone vs prompt-only vs LoRA + memory",
        "produced_by": "python bench/memory_facts.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "device": device(),
        "base": args.base,
        "settings": {"epochs": args.epochs, "lr": args.lr, "seed": args.seed, "max_steps": args.max_steps,
                     "memory_notes": 3, "memory_from_reply": args.memory_from_reply,
                     "memory_drill": args.memory_drill, "batch_tokens": args.batch_tokens,
                     "environment": {k: v for k, v in os.environ.items() if k.startswith("BUNSHIN_EXP_")}},
        "goals": GOALS,
        "systems": systems,
        "verdict": verdict,
        "probe_items": report["probes"]["items"],
        "lora_alone_items": alone["probes"]["items"],
        "steps": log,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({"systems": systems, "verdict": verdict}, ensure_ascii=False, indent=1))


def _figures(report: dict, name: str) -> dict:
    probes = report["probes"]["systems"][name]
    style = report["systems"][name]
    return {
        "fact_accuracy": probes["fact_accuracy"], "stale_rate": probes["stale_rate"],
        "invented_rate": probes["invented_rate"], "abstained_rate": probes["abstained_rate"],
        "counts": probes["counts"], "style_distance": style["style_distance"], "chrf": style["chrf"],
        "verbatim_rate": style["verbatim"]["rate"], "loss": style.get("loss"),
    }


if __name__ == "__main__":
    main()
