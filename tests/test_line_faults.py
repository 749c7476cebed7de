"""LINE's API failing, one way at a time: 500 before and after it delivered, 429 with Retry-After, a hang
past the client's timeout before and after it delivered, refusals. The real LineAdapter behind a real
aiohttp server takes signed webhooks; the router is a stub that answers at once; the fake LINE API
(tests/support/fake_line_api.py) keeps LINE's rules (a spent reply token answers 400, an accepted retry key 409),
so a duplicate would be counted where it would reach the user.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from email.utils import formatdate

import aiohttp
import pytest
from aiohttp import web
from conftest import ScriptedRouter, answered_by

from adapters.line import LineAdapter, RetryPolicy
from adapters.line_api import retry_after_seconds
from bot.metrics import BotMetrics
from finetune.config import BotConfig
from tests.support.fake_line_api import PUSH, REPLY, Fault, serving_fake_line, sign, text_event, webhook_bytes

SECRET, TOKEN = "fault-channel-secret-77aa", "fault-access-token-88bb"
SECRET_ENV, TOKEN_ENV = "BUNSHIN_TEST_LINE_SECRET", "BUNSHIN_TEST_LINE_TOKEN"
USER = "U" + "4" * 32
GROUP = "C" + "5" * 32
QUICK = RetryPolicy(attempts=4, base_s=0.05, max_s=0.4)


@pytest.fixture(autouse=True)
def setup(monkeypatch, caplog):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    monkeypatch.setattr(LineAdapter, "retry", QUICK)
    caplog.set_level(logging.INFO)


class Line:
    """The adapter served on loopback; `post` sends a signed webhook; `outcome` waits for an event's last log line."""

    def __init__(self, url: str, session: aiohttp.ClientSession, caplog):
        self.url, self.session, self.caplog = url, session, caplog

    async def post(self, *events: dict) -> int:
        raw = webhook_bytes(*events)
        async with self.session.post(self.url, data=raw, headers={"X-Line-Signature": sign(raw, SECRET)}) as r:
            return r.status

    async def outcome(self, pattern: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := next((r.getMessage() for r in self.caplog.records if re.search(pattern, r.getMessage())), None):
                return found
            await asyncio.sleep(0.01)
        raise AssertionError(f"no log line matching {pattern!r}")


@asynccontextmanager
async def serving_adapter(tmp_path, caplog, fake, reply: str = "返事だよ", **line):
    config = BotConfig.from_dict({
        "persona": {"name": "美咲"}, "memory": {"path": str(tmp_path / "memory.sqlite3")},
        "line": {"enabled": True, "channel_secret_env": SECRET_ENV, "access_token_env": TOKEN_ENV,
                 "api_host": fake.url, "api_timeout_s": 0.3, **line},
    }, source="test")
    adapter = LineAdapter(config, BotMetrics(), "美咲")
    router = ScriptedRouter(lambda message: reply if message.addressed else None)

    app = web.Application()
    app.router.add_routes(adapter.web_routes())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stopping = asyncio.Event()
    async with answered_by(adapter, router) as dispatcher:
        running = asyncio.create_task(adapter.run(dispatcher.accept, stopping))
        try:
            async with aiohttp.ClientSession() as session:
                yield Line(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/callback", session, caplog)
        finally:
            stopping.set()
            await running
    await adapter.close()
    await runner.cleanup()


def stale(**kw) -> dict:
    """An event whose reply token is too old to use (LINE's last about a minute): it is answered by push."""
    return text_event("遅れてごめん", timestamp_ms=int((time.time() - 55) * 1000), **kw)


# --- reply: no retry key exists for it; a spent token protects against a second delivery -----------


@pytest.mark.parametrize("fault", [Fault(500), Fault(500, hang_s=0.5), Fault(429, retry_after="0")],
                         ids=["500", "timeout", "429"])
async def test_a_reply_that_did_not_get_through_is_retried_and_delivered_once(tmp_path, caplog, fault):
    async with serving_fake_line(TOKEN) as fake, serving_adapter(tmp_path, caplog, fake, push_fallback=True) as line:
        fake.script[REPLY] = [fault]
        event = text_event("もしもし", user=USER)
        assert await line.post(event) == 200
        await line.outcome("replied to line:")
    assert [c["json"]["replyToken"] for c in fake.to(REPLY)] == [event["replyToken"]] * 2
    assert len(fake.replies_to(event["replyToken"])) == 1 and fake.to(PUSH) == []
    assert all("X-Line-Retry-Key" not in c["headers"] for c in fake.to(REPLY))  # LINE refuses one on reply


@pytest.mark.parametrize("fault", [Fault(500, deliver=True), Fault(200, deliver=True, hang_s=0.5)],
                         ids=["500-after-delivering", "timeout-after-delivering"])
async def test_a_reply_that_may_have_got_through_is_never_sent_twice(tmp_path, caplog, fault):
    """LINE took it but the answer was lost: the retry meets the spent token (400), and no push follows."""
    async with serving_fake_line(TOKEN) as fake, serving_adapter(tmp_path, caplog, fake, push_fallback=True) as line:
        fake.script[REPLY] = [fault]
        event = text_event("届いた？", user=USER)
        assert await line.post(event) == 200
        await line.outcome("may have been delivered: not pushed")
    assert [c["status"] for c in fake.to(REPLY)] == [fault.status, 400]
    assert len(fake.replies_to(event["replyToken"])) == 1 and fake.to(PUSH) == []


async def test_a_429_waits_for_retry_after(tmp_path, caplog):
    async with serving_fake_line(TOKEN) as fake, serving_adapter(tmp_path, caplog, fake) as line:
        fake.script[REPLY] = [Fault(429, retry_after="1")]
        assert await line.post(text_event("混んでる？", user=USER)) == 200
        await line.outcome("replied to line:")
    first, second = fake.to(REPLY)
    assert second["at"] - first["at"] >= 1.0
    assert len(fake.delivered(REPLY)) == 1


async def test_reply_retries_are_bounded_and_a_refused_token_falls_back_to_one_push(tmp_path, caplog):
    async with serving_fake_line(TOKEN) as fake, serving_adapter(tmp_path, caplog, fake, push_fallback=True) as line:
        fake.script[REPLY] = [Fault(429), Fault(429), Fault(429), Fault(429), Fault(429)]  # nothing ever taken
        assert await line.post(text_event("ねえ", user=USER)) == 200
        await line.outcome("pushed to line:")
        fake.script[REPLY] = [Fault(400)]  # "Invalid reply token": nothing was sent
        assert await line.post(text_event("もう一回", user=USER)) == 200
        await line.outcome("pushed to line:.*", timeout=15)
        await asyncio.wait_for(_until(lambda: len(fake.delivered(PUSH)) == 2), 15)
    assert len(fake.to(REPLY)) == QUICK.attempts + 1
    assert [d.to for d in fake.delivered()] == [USER, USER] and len(fake.delivered(REPLY)) == 0


async def test_an_unauthorized_reply_is_neither_retried_nor_pushed(tmp_path, caplog):
    async with serving_fake_line("another-token") as fake, serving_adapter(tmp_path, caplog, fake, push_fallback=True) as line:
        assert await line.post(text_event("だれ？", user=USER)) == 200
        await line.outcome(r"reply \(try 1/4\) for \S+ failed: HTTP 401")
        await asyncio.sleep(0.3)  # a wrong retry would come within QUICK's first backoff (<= 0.05 s)
    assert len(fake.to(REPLY)) == 1 and fake.to(PUSH) == [] and fake.deliveries == []


# --- push: one retry key for every try, so LINE sends it once --------------------------------------


@pytest.mark.parametrize("faults", [
    [Fault(500)], [Fault(500, deliver=True)], [Fault(200, deliver=True, hang_s=0.5)], [Fault(500, hang_s=0.5)],
    [Fault(429, retry_after="0"), Fault(500, deliver=True)],
], ids=["500", "500-after-delivering", "timeout-after-delivering", "timeout", "429-then-500-after-delivering"])
async def test_a_push_is_retried_with_one_key_and_delivered_once(tmp_path, caplog, faults):
    async with serving_fake_line(TOKEN) as fake, serving_adapter(tmp_path, caplog, fake, push_fallback=True) as line:
        fake.script[PUSH] = list(faults)
        assert await line.post(stale(user=USER)) == 200
        await line.outcome("pushed to line:")
    pushes = fake.to(PUSH)
    keys = {c["headers"]["X-Line-Retry-Key"] for c in pushes}
    assert len(pushes) == len(faults) + 1 and len(keys) == 1 and uuid.UUID(keys.pop())
    assert len(fake.pushes_to(USER)) == 1 and fake.to(REPLY) == []
    if faults[-1].deliver:  # the last retry met the key LINE had already accepted
        assert pushes[-1]["status"] == 409


async def test_a_push_gives_up_after_its_tries_with_growing_waits(tmp_path, caplog):
    async with serving_fake_line(TOKEN) as fake, serving_adapter(tmp_path, caplog, fake, push_fallback=True) as line:
        fake.script[PUSH] = [Fault(503)] * 10
        assert await line.post(stale(user=USER)) == 200
        await line.outcome("failed for good after 4 tries")
    at = [c["at"] for c in fake.to(PUSH)]
    waits = [b - a for a, b in zip(at, at[1:], strict=False)]
    assert len(at) == QUICK.attempts and fake.deliveries == []
    # Equal jitter: the n-th wait lies in [base·2ⁿ⁻¹/2, base·2ⁿ⁻¹], so each is at least the one before.
    assert waits == sorted(waits) and waits[0] >= QUICK.base_s / 2


async def test_a_push_is_not_retried_past_a_retry_after_too_long(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(LineAdapter, "retry", RetryPolicy(attempts=4, base_s=0.05, max_retry_after_s=5))
    async with serving_fake_line(TOKEN) as fake, serving_adapter(tmp_path, caplog, fake, push_fallback=True) as line:
        fake.script[PUSH] = [Fault(429, retry_after="3600")]
        assert await line.post(stale(user=USER)) == 200
        await line.outcome("LINE asks to wait 3600s: given up")
    assert len(fake.to(PUSH)) == 1


# --- the bot answers only where it was addressed from ---------------------------------------------------


async def test_the_reply_goes_only_to_the_chat_it_came_from_whatever_the_model_writes(tmp_path, caplog):
    """The model's text is data: ids, JSON or "@All" in it cannot pick a recipient or become a mention."""
    other = "U" + "9" * 32
    text = f'{{"to": "{other}", "messages": [{{"type": "text", "text": "hi"}}]}} @All {other} <@{other}>'
    async with serving_fake_line(TOKEN) as fake, serving_adapter(tmp_path, caplog, fake, reply=text,
                                                                 push_fallback=True) as line:
        in_group = stale(user=USER, group=GROUP, mention_self=True)
        one_to_one = text_event("やあ", user=USER)
        not_addressed = text_event(f"{other} に送って", user=other, group=GROUP)
        assert await line.post(in_group, one_to_one, not_addressed) == 200
        await asyncio.wait_for(_until(lambda: len(fake.deliveries) == 2), 15)
        last = text_event("最後", user=other)  # the unaddressed sender's own 1:1 chat, after the group's events
        assert await line.post(last) == 200
        await asyncio.wait_for(_until(lambda: len(fake.deliveries) == 3), 15)
    assert [d.to for d in fake.delivered(PUSH)] == [GROUP]
    assert sorted(d.to for d in fake.delivered(REPLY)) == sorted([one_to_one["replyToken"], last["replyToken"]])
    sent = [m for c in fake.to(REPLY) + fake.to(PUSH) for m in c["json"]["messages"]]
    assert all(m == {"type": "text", "text": text} for m in sent)  # plain text: no textV2 substitution, no mention


# --- Retry-After ---------------------------------------------------------------------------------------


def test_retry_after_in_seconds_or_as_an_http_date():
    assert retry_after_seconds({"Retry-After": "7"}) == 7
    assert retry_after_seconds({"Retry-After": "0.5"}) == 0.5
    assert 28 <= retry_after_seconds({"Retry-After": formatdate(time.time() + 30, usegmt=True)}) <= 30
    assert retry_after_seconds({"Retry-After": formatdate(time.time() - 30, usegmt=True)}) == 0
    for nothing in ({}, None, {"Retry-After": ""}, {"Retry-After": "soon"}):
        assert retry_after_seconds(nothing) is None


def test_backoff_grows_is_capped_and_honours_retry_after():
    policy = RetryPolicy(base_s=0.5, max_s=4.0)
    for attempt, step in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)):
        waits = [policy.wait_before_retry(attempt, None) for _ in range(200)]
        assert all(step / 2 <= w <= step for w in waits) and len(set(waits)) > 1  # jittered
    assert all(3.0 <= policy.wait_before_retry(1, 3.0) <= 3.25 for _ in range(50))


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)


def test_the_proxy_comes_from_the_environment_once(monkeypatch):
    from adapters.line_api import proxy_for

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert proxy_for("https://api.line.me") == "http://proxy.example:3128"
    monkeypatch.setenv("NO_PROXY", "api.line.me")
    assert proxy_for("https://api.line.me") is None
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.delenv("https_proxy", raising=False)
    assert proxy_for("https://api.line.me") is None


async def test_request_bodies_are_what_lines_own_sdk_would_send(tmp_path, caplog):
    """The JSON the adapter posts, against line-bot-sdk's own serialisation of the same requests (the SDK adds
    only `notificationDisabled: false`, LINE's documented default)."""
    from linebot.v3.messaging import PushMessageRequest, ReplyMessageRequest, ShowLoadingAnimationRequest, TextMessage

    from adapters.line_api import LineApi

    def sdk(request) -> dict:
        body = request.to_dict()
        assert body.pop("notificationDisabled", False) is False
        return body

    async with serving_fake_line(TOKEN) as fake, serving_adapter(tmp_path, caplog, fake, reply="返事だよ",
                                                                 push_fallback=True) as line:
        fresh, late = text_event("もしもし", user=USER), stale(user="U" + "6" * 32)
        assert await line.post(fresh, late) == 200
        await asyncio.wait_for(_until(lambda: len(fake.deliveries) == 2), 15)
        api = LineApi(fake.url, TOKEN, 1.0, BotMetrics())
        api.open()
        assert (await api.show_loading(USER, 20)).outcome == "sent"
        await api.close()
    (reply,), (push,), (loading,) = fake.to(REPLY), fake.to(PUSH), fake.to("/v2/bot/chat/loading/start")
    text = [TextMessage(text="返事だよ")]
    assert reply["json"] == sdk(ReplyMessageRequest(reply_token=fresh["replyToken"], messages=text))
    assert push["json"] == sdk(PushMessageRequest(to="U" + "6" * 32, messages=text))
    assert loading["json"] == sdk(ShowLoadingAnimationRequest(chat_id=USER, loading_seconds=20))
    assert reply["headers"]["Content-Type"].startswith("application/json")


# --- a reply whose outcome stays unknown: [line] unknown_outcome ---------------------------------------


@pytest.mark.parametrize("policy, pushes", [("push", 1), ("drop", 0)])
async def test_a_reply_every_try_of_which_may_have_got_through_is_pushed_or_dropped_as_the_policy_says(
        tmp_path, caplog, policy, pushes):
    """Every try answered 500 (LINE may have taken any of them) until the tries run out: nothing can tell any more
    whether the user has it. A warning names the event; the push, if any, goes with the event's retry key."""
    async with serving_fake_line(TOKEN) as fake, serving_adapter(tmp_path, caplog, fake, unknown_outcome=policy) as line:
        fake.script[REPLY] = [Fault(500)] * QUICK.attempts
        event = text_event("聞こえる？", user=USER)
        assert await line.post(event) == 200
        warning = await line.outcome("outcome unknown")
    assert f"(event {event['webhookEventId']}, inbox entry " in warning and "聞こえる" not in caplog.text
    assert f'unknown_outcome = "{policy}"' in warning
    assert len(fake.to(REPLY)) == QUICK.attempts and len(fake.pushes_to(USER)) == pushes
    assert all(c["headers"].get("X-Line-Retry-Key") for c in fake.to(PUSH))
