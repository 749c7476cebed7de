"""Micro-benchmarks: what one LINE event costs the daemon, part by part, and cheaper ways to do each part.

Each case runs `--repeat` times (default 5) in this process; the figure is CPU microseconds per operation
(time.process_time, so time spent waiting on another process is not counted), given as min / median / max
over the repeats. The API-call cases talk to the fake LINE API (tests/support/fake_line_api.py) served by another
process on loopback, so only the client's CPU is measured; they run `concurrency` calls at once, as the
daemon does under load.

    python bench/line_event_cost.py [--repeat 5] [--out bench/results/line_event_cost.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bot, and the tests' own fake LINE API (tests.support)

from tests.support.fake_line_api import sign, text_event, webhook_bytes  # noqa: E402

SECRET, TOKEN = "bench-channel-secret-0f1e2d3c4b5a", "bench-access-token-a1b2c3d4e5f6a7b8"
USER = "U" + "0" * 28 + "1234"
REPLY_TEXT = "うんうん、メッセージ1234"


def cpu_us_per_op(fn, n: int, repeat: int) -> dict:
    """fn() run n times, `repeat` times over: CPU µs per call, min/median/max over the repeats."""
    fn()  # warm
    per = []
    for _ in range(repeat):
        started = time.process_time()
        for _ in range(n):
            fn()
        per.append((time.process_time() - started) / n * 1e6)
    return {"min": round(min(per), 2), "median": round(statistics.median(per), 2), "max": round(max(per), 2), "n": n}


# --- the webhook's side: signature, parsing, the SDK's models ------------------------------------------


def direct_parse(body: bytes) -> list[tuple]:
    """What the adapter takes from a webhook, read straight from the dict (the checks parse_events makes:
    a text message event, a user/group/room source with an id, strings that are UTF-8, a sane timestamp)."""
    payload = json.loads(body.decode("utf-8"))
    out = []
    for raw in payload.get("events", ()):
        if not isinstance(raw, dict) or raw.get("type") != "message":
            continue
        message, source = raw.get("message"), raw.get("source")
        if not isinstance(message, dict) or message.get("type") != "text" or not isinstance(source, dict):
            continue
        kind = source.get("type")
        chat = source.get({"user": "userId", "group": "groupId", "room": "roomId"}.get(kind, ""), None)
        text, event_id, stamp = message.get("text"), raw.get("webhookEventId"), raw.get("timestamp")
        if not (isinstance(chat, str) and chat and isinstance(text, str) and isinstance(event_id, str) and event_id
                and isinstance(stamp, int) and 0 <= stamp < 2**53):
            continue
        out.append((event_id, kind, chat, source.get("userId"), raw.get("replyToken"), text, stamp,
                    message.get("mention")))
    return out


def webhook_cases(repeat: int) -> dict:
    from linebot.v3.webhooks import Event

    from adapters.line import parse_events, verify_signature

    event = text_event("メッセージ1234", user=USER)
    body = webhook_bytes(event)
    signature = sign(body, SECRET)
    secret = SECRET.encode()
    raw = json.loads(body)["events"][0]
    n = 20000
    assert len(direct_parse(body)) == 1 and len(parse_events(body)) == 1
    return {
        "body_bytes": len(body),
        "verify_signature (HMAC-SHA256, base64, compare_digest)": cpu_us_per_op(
            lambda: verify_signature(body, signature, secret), n, repeat),
        "hmac.digest only (no base64 / object)": cpu_us_per_op(
            lambda: hmac.compare_digest(base64.b64encode(hmac.digest(secret, body, hashlib.sha256)), signature.encode()),
            n, repeat),
        "json.loads of the body": cpu_us_per_op(lambda: json.loads(body.decode("utf-8")), n, repeat),
        "Event.from_dict (SDK, pydantic v1) of one event": cpu_us_per_op(lambda: Event.from_dict(raw), n // 4, repeat),
        "parse_events (adapter: json + dict reads + checks)": cpu_us_per_op(lambda: parse_events(body), n, repeat),
        "direct_parse (json + dict reads + the same checks)": cpu_us_per_op(lambda: direct_parse(body), n, repeat),
    }


# --- SQLite: per-event statements as the daemon runs them, and batched -----------------------------------


def sqlite_cases(repeat: int, work: Path) -> dict:
    from bot.inbox import Inbox
    from bot.memory import ConversationMemory
    from bot.messages import IncomingMessage

    counter = iter(range(10**9))
    memory = ConversationMemory(work / "memory.sqlite3", keep=80)
    chats = [f"line:U{i:032d}" for i in range(2000)]

    def memory_event():  # what the router does for an answered event: user turn, recent, reply turn
        chat = chats[next(counter) % len(chats)]
        memory.append(chat, "LINE user 1234", "メッセージ1234")
        memory.recent(chat, 20)
        memory.append(chat, "美咲", REPLY_TEXT)

    def inbox_events(alone: bool):
        """The inbox's three writes for one event (accept, attempt, finish), each awaited until committed
        (fsync'd): one event at a time, or 20 events' writes at once (what group commit does under load)."""
        inbox = Inbox(work / f"inbox-{next(counter)}.sqlite3")

        def message() -> IncomingMessage:
            return IncomingMessage("line", "U1", "U1", "LINE user", "メッセージ1234", True,
                                   event_id=f"E{next(counter):025d}", delivery={"reply_token": "t", "event_ms": 1})

        async def one():
            (entry,) = await inbox.accept([message()])
            await inbox.attempt(entry, "reply", REPLY_TEXT)
            inbox.finish(entry, "replied")

        async def run(n: int):
            if alone:
                for _ in range(n):
                    await one()
            else:
                for _ in range(n // 20):
                    await asyncio.gather(*(one() for _ in range(20)))

        def timed(n: int) -> float:
            started = time.process_time()  # all threads: the writer's CPU counts too
            asyncio.run(run(n))
            return (time.process_time() - started) / n * 1e6

        timed(100)
        per = [timed(1000) for _ in range(repeat)]
        inbox.close()
        return {"min": round(min(per), 2), "median": round(statistics.median(per), 2), "max": round(max(per), 2),
                "n": 1000}

    stamp_now = lambda: datetime.now().astimezone().isoformat()  # noqa: E731 - as ConversationMemory.append stamps
    result = {
        "inbox: accept + attempt + finish, one event at a time (2 fsync'd commits, the finish lingers)": inbox_events(alone=True),
        "inbox: the same, 20 events at once (group commit)": inbox_events(alone=False),
        "memory: append + recent(20) + append (one answered event)": cpu_us_per_op(memory_event, 3000, repeat),
        "datetime.now().astimezone().isoformat() (per append)": cpu_us_per_op(stamp_now, 20000, repeat),
    }
    memory.close()
    return result


# --- logging ---------------------------------------------------------------------------------------------


def logging_cases(repeat: int) -> dict:
    log = logging.getLogger("bench.line_event_cost")
    log.propagate = False
    stream = open(os.devnull, "w")  # noqa: SIM115 - closed below
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    line = lambda: log.info("replied to line:%s (%d message(s))", USER, 1)  # noqa: E731
    result = {"one INFO line, formatted and written (stream to /dev/null)": cpu_us_per_op(line, 20000, repeat)}
    log.setLevel(logging.WARNING)
    result["one INFO call with the logger at WARNING (dropped)"] = cpu_us_per_op(line, 50000, repeat)
    log.removeHandler(handler)
    stream.close()
    return result


# --- the SDK's request building ---------------------------------------------------------------------------


def sdk_build_cases(repeat: int) -> dict:
    from linebot.v3.messaging import AsyncApiClient, Configuration, ReplyMessageRequest, TextMessage

    from adapters.line import split_reply

    async def make_client():  # the SDK's client opens an aiohttp session: it needs a running loop
        return AsyncApiClient(Configuration(host="http://127.0.0.1:9", access_token=TOKEN))

    loop = asyncio.new_event_loop()
    client = loop.run_until_complete(make_client())

    def sdk_body():
        request = ReplyMessageRequest(reply_token="0" * 32, messages=[TextMessage(text=p) for p in split_reply(REPLY_TEXT)])
        return json.dumps(client.sanitize_for_serialization(request))

    def plain_body():
        return json.dumps({"replyToken": "0" * 32, "messages": [{"type": "text", "text": p} for p in split_reply(REPLY_TEXT)]},
                          ensure_ascii=False).encode()

    result = {
        "split_reply (short text)": cpu_us_per_op(lambda: split_reply(REPLY_TEXT), 50000, repeat),
        "SDK models: ReplyMessageRequest(TextMessage) + sanitize + json.dumps": cpu_us_per_op(sdk_body, 5000, repeat),
        "plain dict + json.dumps": cpu_us_per_op(plain_body, 50000, repeat),
    }
    loop.run_until_complete(client.close())
    loop.close()
    return result


# --- API calls against the fake in another process ---------------------------------------------------------


def _start_fake(work: Path) -> tuple[subprocess.Popen, str]:
    port_file = work / "fake.port"
    spec = {"faults": 0.0}
    cores = os.sched_getaffinity(0)
    others = set(range(os.cpu_count() or 1)) - cores or cores
    fake = subprocess.Popen([sys.executable, str(REPO / "bench" / "line_load.py"), "--serve-fake", json.dumps(spec),
                             "--port-file", str(port_file)], cwd=REPO, preexec_fn=lambda: os.sched_setaffinity(0, others))
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if fake.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("error: the fake LINE API did not start")
        time.sleep(0.05)
    return fake, f"http://127.0.0.1:{port_file.read_text()}"


async def _calls(call, total: int, concurrency: int) -> float:
    """CPU µs per call for `total` calls, `concurrency` at a time."""
    await call(0)  # connect, warm
    started = time.process_time()
    slots = asyncio.Semaphore(concurrency)

    async def one(i):
        async with slots:
            await call(i)

    await asyncio.gather(*(one(i) for i in range(total)))
    return (time.process_time() - started) / total * 1e6


def api_cases(repeat: int, work: Path, total: int = 2000, concurrency: int = 8) -> dict:
    import aiohttp
    from linebot.v3.messaging import (
        AsyncApiClient,
        AsyncMessagingApi,
        Configuration,
        ReplyMessageRequest,
        ShowLoadingAnimationRequest,
        TextMessage,
    )

    fake, url = _start_fake(work)
    timeout = aiohttp.ClientTimeout(total=5)
    try:
        async def run_all() -> dict:
            sdk_client = AsyncApiClient(Configuration(host=url, access_token=TOKEN))
            sdk = AsyncMessagingApi(sdk_client)
            quiet_client = AsyncApiClient(Configuration(host=url, access_token=TOKEN))
            # The same SDK with its session replaced by one that does not read the environment per request.
            await quiet_client.rest_client.pool_manager.close()
            quiet_client.rest_client.pool_manager = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100), trust_env=False)
            quiet = AsyncMessagingApi(quiet_client)
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100), timeout=timeout,
                                            headers={"Authorization": f"Bearer {TOKEN}"})
            tokens = iter(range(10**9))
            from adapters.line_api import LineApi
            from bot.metrics import BotMetrics

            adapter_api = LineApi(url, TOKEN, 5.0, BotMetrics())
            adapter_api.open()

            async def adapter_reply(i):
                result = await adapter_api.reply(USER, f"t{next(tokens):031d}", [{"type": "text", "text": REPLY_TEXT}],
                                                 "reply")
                if result.outcome != "sent":
                    raise RuntimeError(result)

            def sdk_reply(api):
                async def call(i):
                    request = ReplyMessageRequest(reply_token=f"t{next(tokens):031d}", messages=[TextMessage(text=REPLY_TEXT)])
                    await api.reply_message(request, _request_timeout=timeout)
                return call

            async def plain_reply(i):
                body = {"replyToken": f"t{next(tokens):031d}", "messages": [{"type": "text", "text": REPLY_TEXT}]}
                async with session.post(f"{url}/v2/bot/message/reply", json=body) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(response.status)

            async def sdk_loading(i):
                await sdk.show_loading_animation(ShowLoadingAnimationRequest(chat_id=USER, loading_seconds=20),
                                                 _request_timeout=timeout)

            async def plain_loading(i):
                async with session.post(f"{url}/v2/bot/chat/loading/start",
                                        json={"chatId": USER, "loadingSeconds": 20}) as response:
                    await response.read()

            cases = {
                "reply: adapters.line_api.LineApi, as the adapter uses it now": adapter_reply,
                "reply: SDK AsyncMessagingApi.reply_message (as the adapter used it to fba3476: trust_env=True, pool of cpu_count*5)": sdk_reply(sdk),
                "reply: SDK with its session replaced (trust_env=False, pool 100)": sdk_reply(quiet),
                "reply: shared aiohttp.ClientSession, JSON POST": plain_reply,
                "loading animation: SDK show_loading_animation": sdk_loading,
                "loading animation: shared aiohttp.ClientSession, JSON POST": plain_loading,
            }
            out = {}
            for name, call in cases.items():
                per = [await _calls(call, total, concurrency) for _ in range(repeat)]
                out[name] = {"min": round(min(per), 1), "median": round(statistics.median(per), 1),
                             "max": round(max(per), 1), "n": total, "concurrency": concurrency}
            await session.close()
            await adapter_api.close()
            await sdk_client.close()
            await quiet_client.close()
            return out

        return asyncio.run(run_all())
    finally:
        fake.send_signal(signal.SIGTERM)
        fake.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", nargs="+", choices=["webhook", "sqlite", "logging", "sdk_build", "api"])
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # the fake's process gets the other cores
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in [("webhook", lambda: webhook_cases(a.repeat)), ("sqlite", lambda: sqlite_cases(a.repeat, Path(tmp))),
                          ("logging", lambda: logging_cases(a.repeat)), ("sdk_build", lambda: sdk_build_cases(a.repeat)),
                          ("api", lambda: api_cases(a.repeat, Path(tmp)))]:
            if a.only and name not in a.only:
                continue
            results[name] = run()
            print(json.dumps({name: results[name]}, ensure_ascii=False, indent=1), flush=True)
    if a.out:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({
            "benchmark": "CPU µs per operation of one LINE event's parts, and cheaper alternatives (min/median/max over repeats)",
            "produced_by": "python bench/line_event_cost.py " + " ".join(sys.argv[1:]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": commit,
            "machine": {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
                        "python": platform.python_version()},
            "results": results,
        }, ensure_ascii=False, indent=2) + "\n")


if __name__ == "__main__":
    main()
