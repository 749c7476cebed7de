"""Benchmark: `python -m finetune inspect` on a synthetic 1,000,000-line LINE export.

Goal (issue 2): under 3 s wall and under 200 MB peak memory on a 2-core machine, the whole
command included (interpreter start, imports, reading, parsing, counting). For scale, a bare
regex pass over the same lines is timed too.

    python bench/inspect_1m.py            # writes bench/results/inspect_1m.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_line import write_export  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GOAL_SECONDS = 3.0
GOAL_PEAK_MB = 200.0


def run_timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB of the child, stdout) for one run of cmd."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    # communicate() reaped the child; RUSAGE_CHILDREN holds the largest maxrss of any child so far,
    # so each measurement runs in its own short-lived helper process (see main).
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {err.decode(errors='replace')}")
    import resource

    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return wall, peak_mb, out.decode()


def bare_regex_pass(path: Path) -> float:
    line_re = re.compile(r"^(\d{1,2}:\d{2})\t([^\t]*)\t(.*)$")
    start = time.perf_counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            line_re.match(line)
    return time.perf_counter() - start


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "inspect_1m.json")
    ap.add_argument("--measure-one", help=argparse.SUPPRESS)  # internal: one isolated run of a JSON-listed command
    args = ap.parse_args()
    if args.measure_one:
        wall, peak, out = run_timed(json.loads(args.measure_one))
        print(json.dumps({"wall_s": wall, "peak_mb": peak, "stdout": out}))
        return

    with tempfile.TemporaryDirectory() as tmp:
        export = Path(tmp) / "line_1m.txt"
        write_export(export, args.lines)
        size_mb = export.stat().st_size / 1e6
        results = {}
        for mode, extra in (("json", ["--json"]), ("table", [])):
            cmd = [sys.executable, "-m", "finetune", "inspect", *extra, str(export)]
            runs = []
            for _ in range(args.runs):
                helper = subprocess.run(
                    [sys.executable, __file__, "--measure-one", json.dumps(cmd)], capture_output=True, text=True, check=True
                )
                runs.append(json.loads(helper.stdout))
            walls = [r["wall_s"] for r in runs]
            results[mode] = {
                "command": f"python -m finetune inspect {' '.join(extra)} line_1m.txt".replace("  ", " "),
                "wall_s_runs": [round(w, 3) for w in walls],
                "wall_s_median": round(statistics.median(walls), 3),
                "peak_mb_max": round(max(r["peak_mb"] for r in runs), 1),
            }
            if mode == "json":
                results[mode]["output"] = json.loads(runs[0]["stdout"])
        regex_s = min(bare_regex_pass(export) for _ in range(3))

    median = results["json"]["wall_s_median"]
    peak = results["json"]["peak_mb_max"]
    report = {
        "benchmark": "inspect on a synthetic 1M-line LINE export",
        "produced_by": "python bench/inspect_1m.py" + (f" --lines {args.lines}" if args.lines != 1_000_000 else ""),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "device": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "os": platform.platform(),
        },
        "export": {"lines": args.lines, "megabytes": round(size_mb, 1), "generator": "bench/synthetic_line.py seed 0"},
        "results": results,
        "bare_regex_pass_s": round(regex_s, 3),
        "goal": {"wall_s": GOAL_SECONDS, "peak_mb": GOAL_PEAK_MB},
        "meets_goal": median < GOAL_SECONDS and peak < GOAL_PEAK_MB,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_out, args.out)
    print(json.dumps({k: report[k] for k in ("results", "bare_regex_pass_s", "meets_goal")}, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
