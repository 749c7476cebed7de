"""Benchmark: the LINE webhook under load and under a faulty LINE API, several runs of each.

Four processes, so that what is measured is the daemon: the daemon (`run_daemon` with a fixed-latency
generator behind the worker, logging at INFO to a file), the fake LINE API (tests/support/fake_line_api.py,
counting every message it accepts), the sender (signed webhooks over loopback on an open-loop schedule)
and this one, which starts them, samples the daemon and counts. With two or more cores the daemon gets
core 0 to itself and the others share the rest (`--no-pin` leaves placement to the OS). Every run
starts a fresh daemon and a fresh fake. Scenarios:

- load: 200 events/s for 60 s; a worker that manages 160/s (batches of 16, 100 ms each), so the queue
  fills and sheds load with "busy" replies; two users over the rate limit.
- faults: 200 events/s for 30 s; 20% of first tries and 10% of second tries to LINE fail (500 before and
  after delivering, 429 with Retry-After, hangs past the client timeout before and after delivering);
  20% of events have stale reply tokens and go out by push.

Goals (issues 8 and 12), in every run: every accepted event answered exactly once at the fake (reply, busy,
rate-limited or push; zero lost, zero duplicated, no push that cannot be named to its event), every webhook
200, webhook p99 under 50 ms, memory flat (RSS growth over the last 3/4 of a run under 16 MiB), per-user
rate limits held. The report gives each run and the min/median/max over the runs, with the daemon's CPU
seconds per event (utime+stime from /proc/<pid>/stat, from just before the first webhook to the end).

    python bench/line_load.py                          # 5 runs of each scenario -> bench/results/line_load.json
    python bench/line_load.py --scenario load --runs 3 --out /tmp/load.json
    python bench/line_load.py --scenario load --runs 1 --profile /tmp/prof   # py-spy on the daemon (pip install py-spy)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bot, finetune, and the tests' own fake LINE API and load plan (tests.support)

PERSONA = "美咲"
SECRET, TOKEN = "bench-channel-secret-0f1e2d3c4b5a", "bench-access-token-a1b2c3d4e5f6a7b8"
SECRET_ENV, TOKEN_ENV = "BUNSHIN_BENCH_LINE_SECRET", "BUNSHIN_BENCH_LINE_TOKEN"
PER_MINUTE, BURST = 10.0, 5
GOAL_P99_MS = 50.0
GOAL_RSS_GROWTH_MIB = 16.0
QUIET_S = 10.0  # after sending: waiting ends once every event is answered, or nothing new came for this long

SCENARIOS = {
    "load": {"rate": 200, "duration_s": 60, "latency_s": 0.1, "max_batch": 16, "max_queue": 64,
             "stale_fraction": 0.0, "faults": 0.0},
    "faults": {"rate": 200, "duration_s": 30, "latency_s": 0.05, "max_batch": 16, "max_queue": 256,
               "stale_fraction": 0.2, "faults": 0.2},
}
API_TIMEOUT_S = 1.0
PROFILE_HZ = 173  # not a divisor or multiple of the send rate: samples at 200 Hz lock onto the webhooks' arrival
CLK_TCK = os.sysconf("SC_CLK_TCK")


def plan_for(spec: dict):
    from tests.support.webhook_load import plan_events

    return plan_events(spec["rate"], spec["duration_s"], chatty_users=2, chatty_rate=2.0,
                       stale_fraction=spec["stale_fraction"], seed=8)


# --- the daemon's process ------------------------------------------------------------------------


def serve_daemon(config_json: str, latency_s: float) -> int:
    """`run_daemon` as `python -m bot` runs it (logging to stderr at the configured level), with the
    fixed-latency backend in place of a model."""
    import logging

    from bot.daemon import run_daemon
    from finetune.config import BotConfig
    from tests.support.webhook_load import FixedLatencyBackend

    config = BotConfig.from_dict(json.loads(config_json), source="bench")
    logging.basicConfig(level=config.logging.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    return asyncio.run(run_daemon(config, backend=FixedLatencyBackend(PERSONA, latency_s)))


# --- the fake LINE API's process ----------------------------------------------------------------------


def serve_fake(spec: dict, port_file: Path) -> int:
    """The fake LINE API (with the scenario's faults) until SIGTERM; its port goes to `port_file`."""
    from tests.support.fake_line_api import serving_fake_line
    from tests.support.webhook_load import transient_faults

    async def serve() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with serving_fake_line(TOKEN, control=True) as fake:
            fake.latency_s = spec.get("api_latency_s", 0.0)
            if spec["faults"]:
                fake.fault_for = transient_faults(random.Random(8), api_timeout_s=API_TIMEOUT_S,
                                                  first_try_share=spec["faults"])
            port_file.with_suffix(".tmp").write_text(fake.url.rsplit(":", 1)[1])
            port_file.with_suffix(".tmp").rename(port_file)
            await stop.wait()

    asyncio.run(serve())
    return 0


# --- the sender's process -------------------------------------------------------------------------------


def serve_sender(spec: dict, url: str, out: Path) -> int:
    """Sends the scenario's plan to `url` on its schedule; writes the SendResult to `out`."""
    from tests.support.webhook_load import send_at_rate

    events = plan_for(spec)
    sent = asyncio.run(send_at_rate(url, events, SECRET, max_in_flight=256))
    out.write_text(json.dumps({**sent.to_json(events), "cpu_s": time.process_time()}))
    return 0


# --- this process: start the others, sample the daemon, count ------------------------------------------


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def cpu_s(pid: int, part: str = "both") -> float:
    """utime + stime (or "user" / "system" alone) of a process, all its threads, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    user, system = int(fields[11]), int(fields[12])
    return {"both": user + system, "user": user, "system": system}[part] / CLK_TCK


def machine_busy_s(steal: bool = False) -> float:
    """CPU seconds all cores spent busy (not idle, not iowait) since boot, from /proc/stat; with `steal`, the
    seconds the hypervisor kept this machine's CPUs from running instead."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    if steal:
        return values[7] / CLK_TCK
    return (sum(values[:8]) - values[3] - values[4] - values[7]) / CLK_TCK


class Placement:
    """Which cores each process may run on: the daemon alone on core 0, the rest on the others."""

    def __init__(self, pin: bool):
        cores = sorted(os.sched_getaffinity(0))
        self.pin = pin and len(cores) >= 2
        self.daemon = {cores[0]} if self.pin else set(cores)
        self.others = set(cores[1:]) if self.pin else set(cores)

    def describe(self) -> dict:
        return {"pinned": self.pin, "daemon_cores": sorted(self.daemon), "other_cores": sorted(self.others)}

    def start(self, args: list[str], cores: set[int], **kwargs) -> subprocess.Popen:
        preexec = (lambda: os.sched_setaffinity(0, cores)) if self.pin else None
        return subprocess.Popen(args, cwd=REPO, preexec_fn=preexec, **kwargs)


def _stop(process: subprocess.Popen | None, timeout: float = 60) -> int | None:
    if process is None or process.poll() is not None:
        return None if process is None else process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


async def _wait_for_file(path: Path, process: subprocess.Popen, what: str, limit_s: float = 60) -> str:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text()
        if process.poll() is not None:
            raise SystemExit(f"error: the {what} exited with {process.returncode}")
        await asyncio.sleep(0.05)
    raise SystemExit(f"error: the {what} did not start within {limit_s:.0f} s")


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


async def _sample(pid: int, samples: list) -> None:
    """(seconds since start, RSS MiB, daemon CPU seconds so far) every 0.5 s."""
    started = time.monotonic()
    while True:
        samples.append((time.monotonic() - started, rss_mib(pid), cpu_s(pid)))
        await asyncio.sleep(0.5)


def _me(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


async def run_once(name: str, spec: dict, work: Path, placement: Placement, profile: Path | None, run: int,
                   keep_logs: Path | None = None) -> dict:
    import aiohttp

    from tests.support.fake_line_api import FakeLineMirror
    from tests.support.webhook_load import SendResult, deliveries_per_event, percentile, summarize, wait_until_answered

    events = plan_for(spec)
    spec_json = json.dumps(spec)
    log_path, fake_log = work / "daemon.log", work / "fake.log"
    fake = daemon = sender = spy = None
    try:
        with open(fake_log, "w") as log_file:
            fake = placement.start(_me("--serve-fake", spec_json, "--port-file", str(work / "fake.port")),
                                   placement.others, stdout=log_file, stderr=subprocess.STDOUT)
        fake_url = f"http://127.0.0.1:{await _wait_for_file(work / 'fake.port', fake, 'fake LINE API')}"
        config = {
            "persona": {"name": PERSONA},
            "memory": {"path": str(work / "memory.sqlite3")},
            "server": {"port": 0},
            "queue": {"max_size": spec["max_queue"], "max_batch": spec["max_batch"], "batch_wait_ms": 5.0},
            "limits": {"messages_per_minute": PER_MINUTE, "burst": BURST},
            "line": {"enabled": True, "channel_secret_env": SECRET_ENV, "access_token_env": TOKEN_ENV,
                     "api_host": fake_url, "push_fallback": True, "api_timeout_s": API_TIMEOUT_S},
            "logging": {"level": "INFO"},
        }
        with open(log_path, "w") as log_file:
            daemon = placement.start(_me("--serve-daemon", json.dumps(config), "--latency", str(spec["latency_s"])),
                                     placement.daemon, stdout=log_file, stderr=subprocess.STDOUT,
                                     env={**os.environ, SECRET_ENV: SECRET, TOKEN_ENV: TOKEN, "PYTHONUNBUFFERED": "1"})
        port = await _serving_port(daemon, log_path)
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            spy_out = profile / f"{name}-run{run}.txt"
            spy = placement.start([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record",
                                   "--pid", str(daemon.pid), "--rate", str(PROFILE_HZ), "--threads", "--format", "raw",
                                   "--duration", str(int(spec["duration_s"])), "-o", str(spy_out)],
                                  placement.others, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.sleep(1.0)  # py-spy attaches
        samples: list[tuple[float, float, float]] = []
        cpu_before, busy_before, fake_cpu_before = cpu_s(daemon.pid), machine_busy_s(), cpu_s(fake.pid)
        system_before, steal_before = cpu_s(daemon.pid, "system"), machine_busy_s(steal=True)
        sampling = asyncio.create_task(_sample(daemon.pid, samples))
        sender = placement.start(_me("--serve-sender", spec_json, "--url", f"http://127.0.0.1:{port}/callback",
                                     "--sent-file", str(work / "sent.json")), placement.others)
        while sender.poll() is None:
            await asyncio.sleep(0.2)
        if sender.returncode != 0:
            raise SystemExit(f"error: the sender exited with {sender.returncode}")
        sent_json = json.loads((work / "sent.json").read_text())
        sent, sender_cpu = SendResult.from_json(sent_json, events), sent_json["cpu_s"]
        mirror = FakeLineMirror(fake_url)
        async with aiohttp.ClientSession() as session:
            settle_s = await wait_until_answered(sent.accepted, mirror, quiet_s=QUIET_S, poll_s=0.25, planned=events,
                                                 refresh=lambda: mirror.refresh(session))
            cpu_after, busy_after = cpu_s(daemon.pid), machine_busy_s()
            system_after, steal_after = cpu_s(daemon.pid, "system"), machine_busy_s(steal=True)
            sampling.cancel()
            rss_end = rss_mib(daemon.pid)
            await mirror.refresh(session, final=True)
        fake_cpu = cpu_s(fake.pid) - fake_cpu_before
    finally:
        if spy is not None and spy.poll() is None:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it has on Ctrl-C
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
        exit_code = _stop(daemon)
        _stop(fake)
        if keep_logs is not None and log_path.exists():
            keep_logs.mkdir(parents=True, exist_ok=True)
            shutil.copy(log_path, keep_logs / f"{name}-run{run}.daemon.log")
    summary = summarize(sent, events, mirror, burst=BURST, per_minute=PER_MINUTE)
    log_text = log_path.read_text(encoding="utf-8", errors="replace")
    in_run = [rss for t, rss, _ in samples if t <= sent.wall_s]
    quarter = next((rss for t, rss, _ in samples if t >= sent.wall_s / 4), in_run[0])
    last_three_quarters = [rss for t, rss, _ in samples if sent.wall_s / 4 <= t <= sent.wall_s]
    # When each answer came: its first delivery, from when its webhook went out.
    firsts = deliveries_per_event(sent.accepted, mirror, events)[0]
    index = {e.token: i for i, e in enumerate(events)}
    delays = [ds[0].at - (sent.started_at + e.at_s + sent.lags_s[index[e.token]])
              for e, ds in zip(sent.accepted, firsts, strict=True) if ds]
    last_answer = max((d.at for d in mirror.deliveries), default=sent.started_at)
    cpu_used = cpu_after - cpu_before
    answered = summary["answered"]
    ours = cpu_used + fake_cpu + sender_cpu
    return {
        "scenario": name, "run": run,
        "settings": {**spec, "api_timeout_s": API_TIMEOUT_S, "rate_limit": {"per_minute": PER_MINUTE, "burst": BURST}},
        **summary,
        "settle_after_sending_s": round(settle_s, 2),
        "last_answer_after_schedule_end_s": round(last_answer - sent.started_at - spec["duration_s"], 2),
        "answer_delay_s": {"p50": round(percentile(delays, 50), 3), "p99": round(percentile(delays, 99), 3),
                           "max": round(max(delays, default=float("nan")), 3)},
        "daemon_cpu": {
            "seconds": round(cpu_used, 2),
            "system_seconds": round(system_after - system_before, 2),  # of those, in the kernel (sockets, files)
            "ms_per_event_sent": round(cpu_used / len(events) * 1000, 3),
            "ms_per_event_answered": round(cpu_used / answered * 1000, 3) if answered else None,
            "share_of_a_core": round(cpu_used / (sent.wall_s + settle_s), 3),
            # Share of one core in each 5 s of the run (from the 0.5 s samples).
            "per_5s": _cpu_per_window(samples, 5.0),
        },
        "other_cpu_s": {"fake_line_api": round(fake_cpu, 2), "sender": round(sender_cpu, 2),
                        # Busy CPU on the machine outside these processes (this one, py-spy, anything else
                        # running on it): a large figure means the run shared the machine.
                        "rest_of_machine": round(busy_after - busy_before - ours, 2),
                        "stolen_by_hypervisor": round(steal_after - steal_before, 2)},
        "rss_mib": {
            "start": round(samples[0][1], 1), "at_quarter": round(quarter, 1), "end": round(rss_end, 1),
            "peak": round(max(rss for _, rss, _ in samples), 1),
            "growth_over_last_three_quarters": round(max(last_three_quarters) - quarter, 1),
            "samples_every_s": 0.5, "samples": len(samples),
        },
        "daemon": {"exit_code": exit_code, "log_lines": log_text.count("\n"),
                   "log_lines_per_event": round(log_text.count("\n") / len(events), 2),
                   "log_warnings": len(re.findall(r" WARNING ", log_text)),
                   "log_errors": len(re.findall(r" ERROR ", log_text)),
                   "log_lines_by_kind": _log_kinds(log_text),
                   "secrets_in_log": SECRET in log_text or TOKEN in log_text},
    }


def _log_kinds(text: str, top: int = 10) -> dict:
    """The commonest log lines with ids and numbers blanked out, so lines of one kind count together."""
    kinds = Counter()
    for line in text.splitlines():
        _, _, rest = line.partition(",")  # drop the date and time
        rest = rest.split(" ", 1)[-1]
        kinds[re.sub(r"[0-9A-Za-z_]{12,}|\d+(\.\d+)?", "#", rest)[:120]] += 1
    return dict(kinds.most_common(top))


def _cpu_per_window(samples: list, window_s: float) -> list[float]:
    out, start = [], 0
    for i, (t, _, cpu) in enumerate(samples):
        if t - samples[start][0] >= window_s - 1e-6:
            out.append(round((cpu - samples[start][2]) / (t - samples[start][0]), 2))
            start = i
    return out


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
        "every_push_attributed": r["pushes_unattributed"] == 0,
        "every_webhook_200": r["webhook_statuses"] == {"200": r["events_sent"]},
        "p99_under_50ms": r["webhook_latency_ms"]["p99"] < GOAL_P99_MS,
        "rss_flat": r["rss_mib"]["growth_over_last_three_quarters"] < GOAL_RSS_GROWTH_MIB,
        "rate_limits_held": r["rate_limit"]["holds"],
    }


# What the spread over runs is given for: (label, path into a run's result).
SPREAD = [
    ("webhook_p50_ms", ("webhook_latency_ms", "p50")),
    ("webhook_p99_ms", ("webhook_latency_ms", "p99")),
    ("webhook_max_ms", ("webhook_latency_ms", "max")),
    ("events_accepted", ("events_accepted",)),
    ("answered", ("answered",)),
    ("lost", ("lost",)),
    ("duplicates", ("duplicates",)),
    ("pushes_unattributed", ("pushes_unattributed",)),
    ("busy", ("answers_by_kind", "busy")),
    ("rate_limited", ("answers_by_kind", "rate_limited")),
    ("by_push", ("by_push",)),
    ("daemon_cpu_ms_per_event_sent", ("daemon_cpu", "ms_per_event_sent")),
    ("daemon_cpu_ms_per_event_answered", ("daemon_cpu", "ms_per_event_answered")),
    ("daemon_share_of_a_core", ("daemon_cpu", "share_of_a_core")),
    ("sender_max_lag_ms", ("sender_max_lag_ms",)),
    ("settle_after_sending_s", ("settle_after_sending_s",)),
    ("answer_delay_p99_s", ("answer_delay_s", "p99")),
    ("log_lines_per_event", ("daemon", "log_lines_per_event")),
    ("rss_growth_mib", ("rss_mib", "growth_over_last_three_quarters")),
    ("rest_of_machine_cpu_s", ("other_cpu_s", "rest_of_machine")),
]


def spread(runs: list[dict]) -> dict:
    out = {}
    for label, path in SPREAD:
        values = []
        for r in runs:
            v = r
            for key in path:
                v = v.get(key) if isinstance(v, dict) else None
            if isinstance(v, (int, float)):
                values.append(v)
        if values:
            out[label] = {"min": min(values), "median": round(statistics.median(values), 3), "max": max(values)}
    return out


def _line(r: dict) -> str:
    lat, cpu = r["webhook_latency_ms"], r["daemon_cpu"]
    return (f"{r['scenario']} run {r['run']}: answered {r['answered']}/{r['events_accepted']} (sent {r['events_sent']}), "
            f"lost {r['lost']}, dup {r['duplicates']}, unattributed pushes {r['pushes_unattributed']}, "
            f"busy {r['answers_by_kind']['busy']}, push {r['by_push']}; webhook p50 {lat['p50']} p99 {lat['p99']} "
            f"max {lat['max']} ms; daemon CPU {cpu['ms_per_event_sent']} ms/event ({cpu['share_of_a_core']:.0%} of a core); "
            f"sender lag max {r['sender_max_lag_ms']} ms; settle {r['settle_after_sending_s']} s; "
            f"goals {'met' if all(r['meets_goals'].values()) else 'NOT met: ' + ', '.join(k for k, v in r['meets_goals'].items() if not v)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=list(SCENARIOS), nargs="+", default=list(SCENARIOS))
    ap.add_argument("--runs", type=int, default=5, help="runs of each scenario, each on a fresh daemon (default 5)")
    ap.add_argument("--rate", type=float, help="events a second instead of the scenario's")
    ap.add_argument("--duration", type=float, help="seconds of sending instead of the scenario's")
    ap.add_argument("--api-latency-ms", type=float, help="the fake LINE API answers every call this much later (0)")
    ap.add_argument("--no-pin", action="store_true", help="leave the processes' cores to the OS")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="record the daemon with py-spy (raw collapsed stacks per thread, 173 Hz) into DIR, one file a run")
    ap.add_argument("--logs", type=Path, metavar="DIR", help="keep each run's daemon log in DIR")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "line_load.json")
    ap.add_argument("--serve-daemon", metavar="CONFIG_JSON", help=argparse.SUPPRESS)
    ap.add_argument("--latency", type=float, default=0.1, help=argparse.SUPPRESS)
    ap.add_argument("--serve-fake", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    ap.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--serve-sender", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--sent-file", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_daemon:
        sys.exit(serve_daemon(a.serve_daemon, a.latency))
    if a.serve_fake:
        sys.exit(serve_fake(json.loads(a.serve_fake), a.port_file))
    if a.serve_sender:
        sys.exit(serve_sender(json.loads(a.serve_sender), a.url, a.sent_file))

    placement = Placement(pin=not a.no_pin)
    if placement.pin:
        os.sched_setaffinity(0, placement.others)
    scenarios = []
    for name in a.scenario:
        spec = dict(SCENARIOS[name])
        if a.rate:
            spec["rate"] = a.rate
        if a.duration:
            spec["duration_s"] = a.duration
        if a.api_latency_ms:
            spec["api_latency_s"] = a.api_latency_ms / 1000
        runs = []
        for run in range(1, a.runs + 1):
            with tempfile.TemporaryDirectory() as tmp:
                r = asyncio.run(run_once(name, spec, Path(tmp), placement, a.profile, run, a.logs))
            r["meets_goals"] = meets_goals(r)
            print(_line(r), flush=True)
            runs.append(r)
        every = all(all(r["meets_goals"].values()) for r in runs)
        scenarios.append({"scenario": name, "settings": runs[0]["settings"], "runs": len(runs),
                          "runs_meeting_goals": sum(all(r["meets_goals"].values()) for r in runs),
                          "meets_goals_every_run": every, "spread": spread(runs), "per_run": runs})
        print(json.dumps({"scenario": name, "runs_meeting_goals": scenarios[-1]["runs_meeting_goals"],
                          "of": len(runs), "spread": scenarios[-1]["spread"]}, ensure_ascii=False), flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "bot", "adapters"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    report = {
        "benchmark": "LINE webhook under load and LINE API faults: exactly-once delivery, webhook latency, daemon CPU "
                     "per event, daemon RSS; several runs each",
        "produced_by": "python bench/line_load.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "uncommitted_changes_in_bot_or_adapters": bool(dirty),
        "machine": machine(),
        "placement": placement.describe(),
        "setup": "four processes: daemon = run_daemon (real router, SQLite memory, worker, LINE adapter, aiohttp server, "
                 "INFO logging to a file) with a fixed-latency generator behind the worker; fake LINE API (real aiohttp "
                 "server on 127.0.0.1 keeping reply-token and X-Line-Retry-Key rules); open-loop sender (signed "
                 "webhooks, one event each, at most 256 in flight); this one (starts them, samples the daemon's RSS "
                 "and CPU every 0.5 s, counts at the fake). A fresh daemon and fake for every run.",
        "goals": {"lost": 0, "duplicates": 0, "pushes_unattributed": 0, "webhook_p99_ms_below": GOAL_P99_MS,
                  "rss_growth_over_last_three_quarters_mib_below": GOAL_RSS_GROWTH_MIB,
                  "rate_limit": "no user over burst + per_minute over its sending span (+1)",
                  "runs": "every run"},
        "scenarios": scenarios,
        "meets_goals": all(s["meets_goals_every_run"] for s in scenarios),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"meets_goals": report["meets_goals"], "out": str(a.out)}))


if __name__ == "__main__":
    main()
