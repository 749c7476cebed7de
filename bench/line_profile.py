"""Where the daemon's CPU goes per LINE event: py-spy's collapsed stacks sorted into parts.

bench/line_load.py --profile DIR records the daemon with py-spy (`--format raw --threads`: one line per
distinct stack, `thread (tid): name;frame;frame ... count`). Waiting (the event loop in epoll, the
executor's threads and the worker thread blocked on their queues, the fixed-latency generator's sleep)
is taken out; each remaining sample goes to the first part in PARTS whose test matches its stack. Each
part's share of the samples is turned into microseconds per event with the daemon's CPU time for the run
(utime + stime from /proc, in the run's result JSON), so the table adds up to what the daemon used.

    python bench/line_profile.py /tmp/prof/load-run1.txt --run-json /tmp/load.json [--out bench/results/line_profile.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


def _has(*needles: str):
    return lambda frames, text: any(n in text for n in needles)


def _leaf_in(*needles: str):
    return lambda frames, text: any(n in frames[-1] for n in needles)


# Waiting, not working: the sample's innermost frame.
IDLE = [
    _leaf_in("EpollSelector.select (selectors.py"),
    _leaf_in("_worker (concurrent/futures/thread.py:81)"),  # an executor thread waiting for work
    _leaf_in("FixedLatencyBackend.generate"),  # time.sleep standing in for the model
    _leaf_in("Worker._step_forever (bot/worker.py"),  # the worker thread blocked on its inbox
    _leaf_in("Condition.wait (threading.py", "Event.wait (threading.py", "Thread.join"),
]

# (part, test): the first part whose test matches a sample's stack takes it. Order matters: logging and
# the executor's proxy/netrc lookups are taken out before the calls they happen in.
PARTS = [
    ("logging (format + write the line)", _has("logging/__init__.py")),
    ("aiohttp trust_env: proxy + .netrc lookup per request (executor threads)",
     _has("get_env_proxy_for_url", "_get_netrc_auth", "netrc_from_env", "proxies_from_env")),
    ("executor thread hand-off (to_thread / run_in_executor)",
     _has("concurrent/futures/thread.py", "asyncio/threads.py", "BaseEventLoop.run_in_executor")),
    ("signature (HMAC-SHA256 + base64)", _has("verify_signature")),
    ("SDK Event.from_dict (pydantic v1 webhook models)", _has("Event.from_dict", "linebot/v3/webhooks/models")),
    ("JSON parse of the webhook body", _has("parse_events")),
    ("SQLite: seen webhookEventIds (INSERT per event)", _has("SeenEvents.first_time")),
    ("SQLite: conversation memory (append + recent)", _has("ConversationMemory.")),
    ("SDK: building the request (pydantic models, sanitize, serialize)",
     _has("TextMessage", "ReplyMessageRequest", "PushMessageRequest", "ShowLoadingAnimationRequest",
          "param_serialize", "sanitize_for_serialization", "_serialize (linebot", "validate_arguments",
          "pydantic/v1/decorator.py", "ApiClient.__init__", "to_dict (linebot", "to_json (linebot")),
    ("SDK: reading the response (deserialize into models)",
     _has("response_deserialize", "deserialize (linebot", "_ApiClient__deserialize", "linebot/v3/messaging/models")),
    ("aiohttp client (LINE API requests: connect, write, read)",
     _has("aiohttp/client.py", "aiohttp/client_reqrep.py", "aiohttp/connector.py", "aiohttp/client_proto.py",
          "aiohttp/http_writer.py", "linebot/v3/messaging/async_rest.py")),
    ("SDK: the rest of a call (api_client, messaging api)", _has("linebot/")),
    ("aiohttp server (parse request, route, respond)", _has("aiohttp/")),
    ("prometheus metrics", _has("prometheus_client/")),
    ("router (limits, turns) and worker hand-off", _has("bot/router.py", "bot/worker.py", "bot/steppers.py")),
    ("LINE adapter's own code (webhook, _answer, split_reply)", _has("adapters/line.py")),
    ("asyncio (loop, tasks, futures, callbacks)", _has("asyncio/", "selectors.py")),
    ("other", lambda frames, text: True),
]


def read_stacks(path: Path) -> Counter:
    stacks: Counter = Counter()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[stack] += int(count)
    return stacks


def breakdown(stacks: Counter, cpu_s: float, events: int) -> dict:
    parts: Counter = Counter()
    threads: Counter = Counter()
    idle = 0
    for stack, n in stacks.items():
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1] if frames[0].startswith("thread (") else "?"
        thread = "executor" if thread.startswith("asyncio_") else thread
        if any(test(frames, stack) for test in IDLE):
            idle += n
            continue
        threads[thread] += n
        parts[next(name for name, test in PARTS if test(frames, stack))] += n
    busy = sum(parts.values())
    us = cpu_s * 1e6 / events if events else float("nan")
    return {
        "samples": {"busy": busy, "idle_taken_out": idle},
        "daemon_cpu_s": cpu_s, "events": events, "us_per_event_total": round(us, 1),
        "busy_samples_by_thread": dict(threads.most_common()),
        "parts": [{"part": name, "share": round(n / busy, 4), "us_per_event": round(us * n / busy, 1)}
                  for name, n in parts.most_common()],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stacks", type=Path, nargs="+", help="py-spy raw files (bench/line_load.py --profile)")
    ap.add_argument("--run-json", type=Path, required=True, help="bench/line_load.py's result for the same runs")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    report = json.loads(a.run_json.read_text())
    runs = {(s["scenario"], r["run"]): r for s in report["scenarios"] for r in s["per_run"]}
    results = []
    for path in a.stacks:
        scenario, _, run = path.stem.rpartition("-run")
        r = runs[(scenario, int(run))]
        b = breakdown(read_stacks(path), r["daemon_cpu"]["seconds"], r["events_sent"])
        results.append({"file": path.name, "scenario": scenario, "run": int(run),
                        "webhook_p99_ms": r["webhook_latency_ms"]["p99"], "answered": r["answered"], **b})
        print(f"\n{path.name}: {b['us_per_event_total']} us of daemon CPU per event ({r['events_sent']} events, "
              f"{b['daemon_cpu_s']} s; {b['samples']['busy']} busy samples)")
        for p in b["parts"]:
            print(f"  {p['us_per_event']:8.1f} us  {p['share']:6.1%}  {p['part']}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"produced_by": "python bench/line_profile.py " + " ".join(sys.argv[1:]),
                                     "profiles": results}, ensure_ascii=False, indent=2) + "\n")


if __name__ == "__main__":
    main()
