"""The LINE path under load and under a faulty LINE API, a few seconds of each: the real daemon (router,
limits, SQLite memory, worker) with a fixed-latency generator behind the worker, signed webhooks over
loopback HTTP, and the fake LINE API counting what it delivered. bench/line_load.py is the full run
(200 events a second for 60 s, in separate processes); this one keeps CI honest about the same claims.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from contextlib import asynccontextmanager

import aiohttp
import pytest

from adapters.line import LineAdapter, RetryPolicy
from bot.daemon import run_daemon
from finetune.config import BotConfig
from tests.support.fake_line_api import PUSH, REPLY, Delivery, FakeLineApi, FakeLineMirror, serving_fake_line
from tests.support.webhook_load import (
    FixedLatencyBackend,
    PlannedEvent,
    SendResult,
    attribute_answers,
    plan_events,
    push_retry_key,
    send_at_rate,
    summarize,
    transient_faults,
    wait_until_answered,
)

PERSONA = "美咲"
SECRET, TOKEN = "load-channel-secret-5d1c0ffee", "load-access-token-9b8a7c6d5e4f"
SECRET_ENV, TOKEN_ENV = "BUNSHIN_TEST_LINE_SECRET", "BUNSHIN_TEST_LINE_TOKEN"
PER_MINUTE, BURST = 10.0, 5


@pytest.fixture(autouse=True)
def secrets_in_env(monkeypatch, caplog):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    caplog.set_level(logging.INFO)


@asynccontextmanager
async def serving_daemon(tmp_path, caplog, fake, backend, *, queue: dict, line: dict):
    config = BotConfig.from_dict({
        "persona": {"name": PERSONA},
        "memory": {"path": str(tmp_path / "memory.sqlite3")},
        "server": {"port": 0},
        "queue": queue,
        "limits": {"messages_per_minute": PER_MINUTE, "burst": BURST},
        "line": {"enabled": True, "channel_secret_env": SECRET_ENV, "access_token_env": TOKEN_ENV,
                 "api_host": fake.url, **line},
    }, source="test")
    stop = asyncio.Event()
    daemon = asyncio.create_task(run_daemon(config, stop=stop, backend=backend))
    try:
        port = None
        while port is None:  # the daemon logs its port, then "serving" once the worker runs
            assert not daemon.done(), daemon.result()
            if any("serving as" in r.getMessage() for r in caplog.records):
                port = next(m.group(1) for r in caplog.records
                            if (m := re.search(r"127\.0\.0\.1:(\d+)/healthz", r.getMessage())))
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}/callback"
    finally:
        stop.set()
        assert await asyncio.wait_for(daemon, 30) == 0


async def test_a_burst_over_capacity_is_answered_exactly_once_with_busy_replies_and_limits_held(tmp_path, caplog):
    # 100 events a second for 3 s against a worker that manages 80: the queue (16) fills and sheds load.
    backend = FixedLatencyBackend(PERSONA, latency_s=0.05)
    events = plan_events(100, 3.0, chatty_users=2, chatty_rate=5.0)
    async with serving_fake_line(TOKEN) as fake:
        async with serving_daemon(tmp_path, caplog, fake, backend, line={},
                                  queue={"max_size": 16, "max_batch": 4, "batch_wait_ms": 5.0}) as url:
            sent = await send_at_rate(url, events, SECRET)
            await wait_until_answered(sent.accepted, fake)
        summary = summarize(sent, events, fake, burst=BURST, per_minute=PER_MINUTE)

    assert summary["webhook_statuses"] == {"200": len(events)}  # no 5xx, no timeout, nothing refused
    assert (summary["lost"], summary["duplicates"]) == (0, 0), summary
    assert summary["answered_exactly_once"] == len(events)
    kinds = summary["answers_by_kind"]
    assert kinds["busy"] > 0 and kinds["reply"] > 0, kinds  # shed, not queued without bound
    assert max(backend.batches) <= 4
    limits = summary["rate_limit"]
    assert limits["chatty_users"] == 2 and limits["holds"], limits
    assert all(n > 0 for n in limits["refused_per_user"].values()), limits
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


async def test_a_faulty_line_api_loses_and_doubles_nothing(tmp_path, caplog, monkeypatch):
    # Half the first tries fail (500 before/after delivering, 429 + Retry-After, hangs before/after
    # delivering), a quarter of second tries; a third of the events have stale tokens and go by push.
    monkeypatch.setattr(LineAdapter, "retry", RetryPolicy(attempts=4, base_s=0.05, max_s=0.2))
    backend = FixedLatencyBackend(PERSONA, latency_s=0.01)
    events = plan_events(60, 2.0, chatty_users=0, stale_fraction=0.3, seed=1)
    async with serving_fake_line(TOKEN) as fake:
        fake.fault_for = transient_faults(random.Random(1), api_timeout_s=0.3, first_try_share=0.5)
        async with serving_daemon(tmp_path, caplog, fake, backend, line={"push_fallback": True, "api_timeout_s": 0.3},
                                  queue={"max_size": 256, "max_batch": 8}) as url:
            sent = await send_at_rate(url, events, SECRET)
            await wait_until_answered(sent.accepted, fake)
        summary = summarize(sent, events, fake, burst=BURST, per_minute=PER_MINUTE)
        statuses = summary["api_calls_by_status"]
        retried_keys = {c["headers"]["X-Line-Retry-Key"] for c in fake.to("/v2/bot/message/push")
                        if fake.tries[c["headers"]["X-Line-Retry-Key"]] > 1}

    assert summary["webhook_statuses"] == {"200": len(events)}
    assert (summary["lost"], summary["duplicates"], summary["push_retry_keys_delivered_twice"]) == (0, 0, 0), summary
    assert summary["by_push"] > 0 and summary["by_reply"] > 0
    # The faults happened, and the retries they caused were refused by LINE's own rules, not sent twice:
    # 400 for a spent reply token, 409 for an accepted retry key.
    assert statuses.get("500", 0) > 0 and statuses.get("429", 0) > 0 and statuses.get("no answer", 0) == 0
    assert retried_keys and statuses.get("409", 0) > 0, statuses
    assert any("may have been delivered: not pushed" in r.getMessage() for r in caplog.records)
    timeouts = [r for r in caplog.records if "failed: " in r.getMessage() and "Timeout" in r.getMessage()]
    assert timeouts, "some tries hung past the API timeout"


def test_the_count_names_each_push_for_its_event_or_says_it_cannot():
    # u1 sends two events, u2 one. A push to u1 is u1's event's only by the retry key derived from that
    # event; a push to u2 is u2's event's (its only one); a keyless push to u1 belongs to neither.
    a, b, c = (PlannedEvent(i, "reply", user, f"tok{i}", f"m{i}", f"EV{i}") for i, user in enumerate(["u1", "u1", "u2"]))
    fake = FakeLineApi("t")
    fake.deliveries += [Delivery(REPLY, "tok0", None, ["r0"]), Delivery(PUSH, "u1", push_retry_key("EV1"), ["p1"]),
                        Delivery(PUSH, "u2", "any-key", ["p2"])]
    answers, unattributed = attribute_answers([a, b, c], fake)
    assert answers == [[["r0"]], [["p1"]], [["p2"]]] and unattributed == 0

    fake.deliveries += [Delivery(PUSH, "u1", None, ["?"]), Delivery(PUSH, "u1", push_retry_key("EV0"), ["again"])]
    answers, unattributed = attribute_answers([a, b, c], fake)
    assert answers[0] == [["r0"], ["again"]] and unattributed == 1  # a duplicate for `a`, one push unplaced

    sent = SendResult(accepted=[a, b, c], latencies_s=[0.001] * 3, lags_s=[0.0] * 3)
    sent.statuses[200] = 3
    summary = summarize(sent, [a, b, c], fake, burst=5, per_minute=10)
    assert (summary["answered"], summary["duplicates"], summary["pushes_unattributed"]) == (3, 1, 1)
    assert SendResult.from_json(sent.to_json([a, b, c]), [a, b, c]).accepted == [a, b, c]


async def test_a_mirror_in_another_process_sees_what_the_fake_delivered():
    async with serving_fake_line("t", control=True) as fake, aiohttp.ClientSession() as session:
        fake.latency_s = 0.05
        headers = {"Authorization": "Bearer t"}
        reply = session.post(f"{fake.url}{REPLY}", headers=headers,
                             json={"replyToken": "tok", "messages": [{"type": "text", "text": "hi"}]})
        push = session.post(f"{fake.url}{PUSH}", headers={**headers, "X-Line-Retry-Key": push_retry_key("EV")},
                            json={"to": "u1", "messages": [{"type": "text", "text": "yo"}]})
        mirror = FakeLineMirror(fake.url)
        sending = asyncio.gather(*(asyncio.create_task(_status(r)) for r in (reply, push)))
        await asyncio.sleep(0.01)
        await mirror.refresh(session)  # both calls still open: none taken yet, nothing delivered
        assert (mirror.calls, mirror.deliveries, mirror.in_flight) == ([], [], 2)
        assert await sending == [200, 200]
        await mirror.refresh(session)
    assert [(d.path, d.to, d.texts) for d in mirror.deliveries] == [(REPLY, "tok", ["hi"]), (PUSH, "u1", ["yo"])]
    assert [c["status"] for c in mirror.calls] == [200, 200] and mirror.in_flight == 0
    assert mirror.delivered(PUSH)[0].retry_key == push_retry_key("EV")


async def _status(request) -> int:
    async with request as response:
        return response.status
