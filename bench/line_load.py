"""Benchmark: the LINE webhook under load and under a faulty LINE API.

The daemon runs as its own process (`run_daemon` with a fixed-latency generator behind the worker,
logging at INFO to a file); this process sends signed webhooks to it over loopback on an open-loop
schedule and serves the fake LINE API (tests/fake_line_api.py), which counts every message it
accepts. Scenarios:

- load: 200 events/s for 60 s; a worker that manages 160/s (batches of 16, 100 ms each), so the queue
  fills and sheds load with "busy" replies; two users over the rate limit.
- faults: 200 events/s for 30 s; 20% of first tries and 10% of second tries to LINE fail (500 before and
  after delivering, 429 with Retry-After, hangs past the client timeout before and after delivering);
  20% of events have stale reply tokens and go out by push.

Goals (issue 8): every event answered exactly once at the fake API (zero lost, zero duplicated), webhook
p99 under 50 ms, memory flat (RSS growth over the last 3/4 of a run under 16 MiB), per-user rate limits
held.

    python bench/line_load.py            # writes bench/results/line_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the fake LINE API and the load plan are the tests' own

PERSONA = "美咲"
SECRET, TOKEN = "bench-channel-secret-0f1e2d3c4b5a", "bench-access-token-a1b2c3d4e5f6a7b8"
SECRET_ENV, TOKEN_ENV = "BUNSHIN_BENCH_LINE_SECRET", "BUNSHIN_BENCH_LINE_TOKEN"
PER_MINUTE, BURST = 10.0, 5
GOAL_P99_MS = 50.0
GOAL_RSS_GROWTH_MIB = 16.0

SCENARIOS = {
    "load": {"rate": 200, "duration_s": 60, "latency_s": 0.1, "max_batch": 16, "max_queue": 64,
             "stale_fraction": 0.0, "faults": 0.0},
    "faults": {"rate": 200, "duration_s": 30, "latency_s": 0.05, "max_batch": 16, "max_queue": 256,
               "stale_fraction": 0.2, "faults": 0.2},
}
API_TIMEOUT_S = 1.0


# --- the daemon's process ------------------------------------------------------------------------


def serve_daemon(config_json: str, latency_s: float) -> int:
    """`run_daemon` as `python -m bot` runs it (logging to stderr at the configured level), with the
    fixed-latency backend in place of a model."""
    import logging

    from webhook_load import FixedLatencyBackend

    from bot.config import BotConfig
    from bot.daemon import run_daemon

    config = BotConfig.from_dict(json.loads(config_json), source="bench")
    logging.basicConfig(level=config.logging.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    return asyncio.run(run_daemon(config, backend=FixedLatencyBackend(PERSONA, latency_s)))


# --- this process: the fake API, the sender, the counting ---------------------------------------------


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


async def run_scenario(name: str, spec: dict, work: Path) -> dict:
    from fake_line_api import serving_fake_line
    from webhook_load import plan_events, send_at_rate, summarize, transient_faults, wait_until_answered

    async with serving_fake_line(TOKEN) as fake:
        if spec["faults"]:
            fake.fault_for = transient_faults(random.Random(8), api_timeout_s=API_TIMEOUT_S,
                                              first_try_share=spec["faults"])
        config = {
            "persona": {"name": PERSONA},
            "memory": {"path": str(work / "memory.sqlite3")},
            "server": {"port": 0},
            "queue": {"max_size": spec["max_queue"], "max_batch": spec["max_batch"], "batch_wait_ms": 5.0},
            "limits": {"messages_per_minute": PER_MINUTE, "burst": BURST},
            "line": {"enabled": True, "channel_secret_env": SECRET_ENV, "access_token_env": TOKEN_ENV,
                     "api_host": fake.url, "push_fallback": True, "api_timeout_s": API_TIMEOUT_S},
            "logging": {"level": "INFO"},
        }
        log_path = work / "daemon.log"
        with open(log_path, "w") as log_file:
            daemon = subprocess.Popen(
                [sys.executable, __file__, "--serve-daemon", json.dumps(config), "--latency", str(spec["latency_s"])],
                cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
                env={**os.environ, SECRET_ENV: SECRET, TOKEN_ENV: TOKEN, "PYTHONUNBUFFERED": "1"})
        try:
            port = await _serving_port(daemon, log_path)
            events = plan_events(spec["rate"], spec["duration_s"], chatty_users=2, chatty_rate=2.0,
                                 stale_fraction=spec["stale_fraction"], seed=8)
            samples: list[tuple[float, float]] = []
            sampling = asyncio.create_task(_sample_rss(daemon.pid, samples))
            sent = await send_at_rate(f"http://127.0.0.1:{port}/callback", events, SECRET, max_in_flight=256)
            settle_s = await wait_until_answered(sent.accepted, fake, quiet_s=10)
            sampling.cancel()
            rss_end = rss_mib(daemon.pid)
        finally:
            daemon.send_signal(signal.SIGTERM)
            exit_code = daemon.wait(timeout=60)
        summary = summarize(sent, events, fake, burst=BURST, per_minute=PER_MINUTE)
    log_text = log_path.read_text(encoding="utf-8", errors="replace")
    in_run = [rss for t, rss in samples if t <= sent.wall_s]
    quarter = next((rss for t, rss in samples if t >= sent.wall_s / 4), in_run[0])
    last_three_quarters = [rss for t, rss in samples if sent.wall_s / 4 <= t <= sent.wall_s]
    return {
        "scenario": name,
        "settings": {**spec, "api_timeout_s": API_TIMEOUT_S, "rate_limit": {"per_minute": PER_MINUTE, "burst": BURST}},
        **summary,
        "settle_after_sending_s": round(settle_s, 2),
        "rss_mib": {
            "start": round(samples[0][1], 1), "at_quarter": round(quarter, 1), "end": round(rss_end, 1),
            "peak": round(max(rss for _, rss in samples), 1),
            "growth_over_last_three_quarters": round(max(last_three_quarters) - quarter, 1),
            "samples_every_s": 0.5, "samples": len(samples),
        },
        "daemon": {"exit_code": exit_code, "log_lines": log_text.count("\n"),
                   "log_errors": len(re.findall(r" ERROR ", log_text)),
                   "secrets_in_log": SECRET in log_text or TOKEN in log_text},
    }


async def _serving_port(daemon: subprocess.Popen, log_path: Path) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"error: the daemon exited with {daemon.returncode}:\n{log_path.read_text()}")
        text = log_path.read_text(encoding="utf-8", errors="replace")
        port = re.search(r"127\.0\.0\.1:(\d+)/healthz", text)
        if port and "serving as" in text:
            return int(port.group(1))
        await asyncio.sleep(0.05)
    raise SystemExit(f"error: the daemon did not start serving within 60 s; its log: {log_path}")


async def _sample_rss(pid: int, samples: list) -> None:
    started = time.monotonic()
    while True:
        samples.append((time.monotonic() - started, rss_mib(pid)))
        await asyncio.sleep(0.5)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def meets_goals(r: dict) -> dict:
    return {
        "zero_lost": r["lost"] == 0,
        "zero_duplicates": r["duplicates"] == 0 and r["push_retry_keys_delivered_twice"] == 0,
        "every_webhook_200": r["webhook_statuses"] == {"200": r["events_sent"]},
        "p99_under_50ms": r["webhook_latency_ms"]["p99"] < GOAL_P99_MS,
        "rss_flat": r["rss_mib"]["growth_over_last_three_quarters"] < GOAL_RSS_GROWTH_MIB,
        "rate_limits_held": r["rate_limit"]["holds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=list(SCENARIOS), nargs="+", default=list(SCENARIOS))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "line_load.json")
    ap.add_argument("--serve-daemon", metavar="CONFIG_JSON", help=argparse.SUPPRESS)
    ap.add_argument("--latency", type=float, default=0.1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_daemon:
        sys.exit(serve_daemon(a.serve_daemon, a.latency))

    results = []
    for name in a.scenario:
        with tempfile.TemporaryDirectory() as tmp:
            r = asyncio.run(run_scenario(name, SCENARIOS[name], Path(tmp)))
        r["meets_goals"] = meets_goals(r)
        print(json.dumps({k: r[k] for k in ("scenario", "events_sent", "answered", "duplicates", "lost",
                                            "answers_by_kind", "webhook_latency_ms", "rss_mib", "meets_goals")},
                         ensure_ascii=False), flush=True)
        results.append(r)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    report = {
        "benchmark": "LINE webhook under load and LINE API faults: exactly-once delivery, webhook latency, daemon RSS",
        "produced_by": "python bench/line_load.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "machine": machine(),
        "setup": "daemon = run_daemon in its own process (real router, SQLite memory, worker, LINE adapter, aiohttp "
                 "server, INFO logging to a file) with a fixed-latency generator behind the worker; this process = "
                 "open-loop sender (signed webhooks, one event each, at most 256 in flight) + fake LINE API "
                 "(real aiohttp server on 127.0.0.1 keeping reply-token and X-Line-Retry-Key rules)",
        "goals": {"lost": 0, "duplicates": 0, "webhook_p99_ms_below": GOAL_P99_MS,
                  "rss_growth_over_last_three_quarters_mib_below": GOAL_RSS_GROWTH_MIB,
                  "rate_limit": "no user over burst + per_minute over its sending span (+1)"},
        "scenarios": results,
        "meets_goals": all(all(r["meets_goals"].values()) for r in results),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"meets_goals": report["meets_goals"]}))


if __name__ == "__main__":
    main()
