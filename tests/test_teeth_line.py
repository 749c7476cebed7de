"""Tests written against the mutants `make mutants` left alive in adapters/line_api.py and adapters/line.py
(docs/mutation.md): what each call to LINE's API sends and logs, and the retry policy's whole range.

LINE's API is a real aiohttp server on loopback that answers as told and records what it was sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from adapters import line, line_api
from adapters.line import LineAdapter
from adapters.line_api import LineApi, RetryPolicy
from bot.messages import InboxEntry, IncomingMessage
from bot.metrics import BotMetrics
from finetune.config import BotConfig
from tests.support.fake_line_api import (
    LOADING,
    PROFILE,
    PUSH,
    REPLY,
    Fault,
    serving_fake_line,
    sign,
    text_event,
    webhook_bytes,
)

USER = "U" + "a" * 32
GROUP = "C" + "b" * 32


@asynccontextmanager
async def line_answering(status: int = 200, body: dict | None = None, headers: dict | None = None, handler=None,
                         timeout_s: float = 5.0):
    """A LINE API on loopback that answers every request with `status` and `body` (or as `handler` does);
    yields (api, requests seen). The raw path is kept as sent (percent-escapes and all)."""
    seen: list[dict] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append({"path": request.path, "raw_path": request.raw_path, "method": request.method,
                     "headers": dict(request.headers), "body": await request.read()})
        if handler is not None:
            return await handler(request)
        return web.json_response(body or {}, status=status, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with on_loopback(app) as url:
        api = LineApi(url, "token-for-tests", timeout_s, BotMetrics())
        api.open()
        try:
            yield api, seen
        finally:
            await api.close()


@asynccontextmanager
async def on_loopback(app: web.Application):
    """`app` served on a free port of 127.0.0.1; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()


def test_backoff_jitter_spans_the_whole_upper_half_of_each_step(monkeypatch):
    """Equal jitter: half the step fixed, the other half drawn; after a 429, up to half a base step on top of
    Retry-After. The draw's bounds are checked at both ends (the policy's range, not only that it stays inside)."""
    policy = RetryPolicy(base_s=0.5, max_s=4.0)
    monkeypatch.setattr(line_api.random, "uniform", lambda low, high: high)
    assert [policy.wait_before_retry(n, None) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert policy.wait_before_retry(1, 3.0) == 3.25
    monkeypatch.setattr(line_api.random, "uniform", lambda low, high: low)
    assert [policy.wait_before_retry(n, None) for n in (1, 2, 3, 4, 5)] == [0.25, 0.5, 1.0, 2.0, 2.0]
    assert policy.wait_before_retry(1, 3.0) == 3.0


@pytest.mark.parametrize("call, what", [
    (lambda api: api.reply(USER, "reply-token-1", [{"type": "text", "text": "x"}], "reply to event 1"),
     "reply to event 1"),
    (lambda api: api.push(GROUP, [{"type": "text", "text": "x"}], "retry-key-1", "push for event 2"), "push for event 2"),
    (lambda api: api.show_loading(USER, 20), "loading animation"),
])
async def test_a_refused_call_is_logged_naming_the_call_the_chat_and_lines_reason(call, what, caplog):
    caplog.set_level(logging.WARNING, logger="bunshin.line")
    async with line_answering(400, {"message": "The request body has 1 error(s)"}) as (api, seen):
        attempt = await call(api)
    assert attempt.outcome == "refused" and attempt.status == 400
    [record] = [r for r in caplog.records if r.name == "bunshin.line"]
    chat = GROUP if "push" in what else USER
    assert record.getMessage() == f"LINE {what} for {chat} failed: HTTP 400 Bad Request The request body has 1 error(s)"


async def test_each_call_posts_lines_json_to_its_own_path():
    async with line_answering(200) as (api, seen):
        await api.reply(USER, "reply-token-1", [{"type": "text", "text": "返事"}], "reply")
        await api.push(GROUP, [{"type": "text", "text": "返事"}], "retry-key-1", "push")
        await api.show_loading(USER, 20)
    assert [r["path"] for r in seen] == [line_api.REPLY, line_api.PUSH, line_api.LOADING]
    bodies = [json.loads(r["body"]) for r in seen]
    assert bodies == [{"replyToken": "reply-token-1", "messages": [{"type": "text", "text": "返事"}]},
                      {"to": GROUP, "messages": [{"type": "text", "text": "返事"}]},
                      {"chatId": USER, "loadingSeconds": 20}]
    assert "返事".encode() in seen[0]["body"]  # UTF-8 as it is, not \u escapes: LINE counts characters either way
    assert [r["headers"].get("X-Line-Retry-Key") for r in seen] == [None, "retry-key-1", None]
    assert all(r["headers"]["Authorization"] == "Bearer token-for-tests" for r in seen)
    assert all(r["headers"]["Content-Type"] == "application/json" for r in seen)


def line_api_errors(api: LineApi) -> float:
    return api.metrics.registry.get_sample_value("bunshin_errors_total", {"kind": "line_api"}) or 0.0


@pytest.mark.parametrize("status, outcome", [(200, "sent"), (299, "sent"), (300, "unknown"), (400, "refused"),
                                             (409, "conflict"), (429, "throttled"), (500, "unknown")])
async def test_each_answer_is_classified_with_its_status_and_every_failure_counted(status, outcome):
    async with line_answering(status) as (api, seen):
        attempt = await api.push(GROUP, [{"type": "text", "text": "x"}], "retry-key-1", "push")
        assert (attempt.outcome, attempt.status) == (outcome, status)
        assert line_api_errors(api) == (0 if outcome == "sent" else 1)


async def test_a_connection_refused_is_unsent_counted_and_logged(caplog):
    caplog.set_level(logging.WARNING, logger="bunshin.line")
    async with line_answering(200) as (api, seen):
        host = api.host
    # The server is gone: nothing listens on its port now.
    api = LineApi(host, "token-for-tests", 5.0, BotMetrics())
    api.open()
    try:
        attempt = await api.reply(USER, "reply-token-1", [{"type": "text", "text": "x"}], "reply to event 1")
    finally:
        await api.close()
    assert (attempt.outcome, attempt.status, attempt.retriable) == ("unsent", None, True)
    assert line_api_errors(api) == 1
    assert [r.getMessage() for r in caplog.records if r.name == "bunshin.line"] == [
        f"LINE reply to event 1 for {USER} failed: ClientConnectorError"]


async def test_lines_reason_is_logged_cut_to_200_characters_and_a_body_without_one_adds_nothing(caplog):
    caplog.set_level(logging.WARNING, logger="bunshin.line")
    long_reason = "The property, 'to', in the request body is invalid " * 8  # LINE's words, over 200 characters
    async with line_answering(400, {"message": long_reason}) as (api, seen):
        await api.push(GROUP, [{"type": "text", "text": "x"}], "retry-key-1", "push")
    async with line_answering(400, {"details": []}) as (api, seen):
        await api.push(GROUP, [{"type": "text", "text": "x"}], "retry-key-2", "push")
    first, second = [r.getMessage() for r in caplog.records if r.name == "bunshin.line"]
    assert first == f"LINE push for {GROUP} failed: HTTP 400 Bad Request {long_reason[:200]}"
    assert second == f"LINE push for {GROUP} failed: HTTP 400 Bad Request "


async def test_calls_go_through_the_proxy_the_environment_names(monkeypatch):
    """HTTPS_PROXY / HTTP_PROXY are read once, when the client is made (a server behind a corporate proxy):
    here LINE's host does not resolve, so only a call through the proxy on loopback can arrive."""
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    async with line_answering(200) as (proxy, seen):
        monkeypatch.setenv("HTTP_PROXY", proxy.host)
        # A trailing slash in [line] api_host is dropped, and only it (the host's own last letter stays).
        api = LineApi("http://api.line.invalidX/", "token-for-tests", 5.0, BotMetrics())
        api.open()
        try:
            attempt = await api.show_loading(USER, 20)
            name = await api.display_name("user", USER, USER)
        finally:
            await api.close()
    assert attempt.outcome == "sent" and name is None  # the proxy's answer, {}, holds no displayName
    # A proxy is sent the whole URL (the host as yarl normalises it: lower case).
    host = "http://api.line.invalidx"
    assert [r["raw_path"] for r in seen] == [host + line_api.LOADING, f"{host}/v2/bot/profile/{USER}"]
    assert [r["headers"]["Host"] for r in seen] == ["api.line.invalidx", "api.line.invalidx"]


def test_loggable_cuts_to_40_characters_and_writes_anything_else_as_ascii():
    assert line_api.loggable("U" * 50) == "U" * 40
    assert line_api.loggable("x" * 50, 45) == "x" * 45
    assert line_api.loggable("名前\nfoo") == "??\nfoo"
    assert line_api.loggable(None) == "None"


async def test_a_profile_lookup_puts_each_id_in_one_path_segment_whatever_it_holds():
    """The adapter asks only for ids shaped as LINE's; the client still quotes each whole, so an id could never
    reach another endpoint of the API (a `/` in it is %2F, not a new segment)."""
    async with line_answering(200, {"displayName": "翔太"}) as (api, seen):
        assert await api.display_name("group", "C1/../../message/push", "U2/x") == "翔太"
        assert await api.display_name("room", "R3", "U4") == "翔太"
    assert [r["raw_path"] for r in seen] == ["/v2/bot/group/C1%2F..%2F..%2Fmessage%2Fpush/member/U2%2Fx",
                                            "/v2/bot/room/R3/member/U4"]
    assert [r["method"] for r in seen] == ["GET", "GET"]
    assert all(r["headers"]["Authorization"] == "Bearer token-for-tests" for r in seen)


@pytest.mark.parametrize("answer", [{"displayName": 17}, {"displayName": None}, {"displayName": " \n "}, ["x"], {}])
async def test_a_profile_without_a_name_in_text_is_no_name_counted_and_logged(answer, caplog):
    caplog.set_level(logging.WARNING, logger="bunshin.line")

    async def handler(request):
        return web.json_response(answer)

    async with line_answering(handler=handler) as (api, seen):
        assert await api.display_name("user", USER, USER) is None
        assert line_api_errors(api) == 1
    assert [r.getMessage() for r in caplog.records if r.name == "bunshin.line"] == [
        f"LINE profile lookup for {USER} failed: the answer holds no displayName"]


async def test_a_refused_profile_lookup_is_counted_and_logged_with_lines_reason(caplog):
    caplog.set_level(logging.WARNING, logger="bunshin.line")
    async with line_answering(404, {"message": "Not found"}) as (api, seen):
        assert await api.display_name("user", USER, USER) is None
        assert line_api_errors(api) == 1
    assert [r.getMessage() for r in caplog.records if r.name == "bunshin.line"] == [
        f"LINE profile lookup for {USER} failed: HTTP 404 Not Found Not found"]


async def test_a_profile_lookup_is_bounded_as_a_whole_not_only_each_read():
    """The reply waits for the name, so a lookup that trickles its answer (every read quick, the whole slow) is
    given up after [line] api_timeout_s, as a hung one is."""
    async def trickle(request):
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for byte in json.dumps({"displayName": "翔太"}).encode():
            await response.write(bytes([byte]))
            await asyncio.sleep(0.05)
        return response

    async with line_answering(handler=trickle, timeout_s=0.3) as (api, seen):
        began = time.monotonic()
        assert await api.display_name("user", USER, USER) is None
        assert time.monotonic() - began < 0.6
        assert line_api_errors(api) == 1


async def test_a_connect_that_never_finishes_is_unsent_after_the_timeout(caplog):
    """[line] api_timeout_s bounds connecting. A full listen backlog: the handshake never completes, so the
    request never left: `unsent`, safe to retry with the same reply token. Counted."""
    caplog.set_level(logging.WARNING, logger="bunshin.line")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    waiting = []
    for _ in range(3):  # fill the backlog: further SYNs are dropped
        client = socket.socket()
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port))
        waiting.append(client)
    api = LineApi(f"http://127.0.0.1:{port}", "token-for-tests", 0.3, BotMetrics())
    api.open()
    try:
        began = time.monotonic()
        attempt = await asyncio.wait_for(api.push(GROUP, [{"type": "text", "text": "x"}], "key", "push"), 5)
        assert attempt.outcome == "unsent" and time.monotonic() - began < 2
        assert line_api_errors(api) == 1
    finally:
        await api.close()
        for sock in [listener, *waiting]:
            sock.close()
    assert [r.getMessage() for r in caplog.records if r.name == "bunshin.line"] == [
        f"LINE push for {GROUP} failed: ConnectionTimeoutError"]


async def test_an_answer_that_does_not_come_in_time_is_unknown_and_counted(caplog):
    """LINE took the request and did not answer within [line] api_timeout_s: it may have been delivered."""
    caplog.set_level(logging.WARNING, logger="bunshin.line")

    async def silent(request):
        await asyncio.sleep(3)
        return web.json_response({})

    async with line_answering(handler=silent, timeout_s=0.3) as (api, seen):
        attempt = await asyncio.wait_for(api.push(GROUP, [{"type": "text", "text": "x"}], "key", "push"), 5)
        assert attempt.outcome == "unknown" and attempt.retriable
        assert line_api_errors(api) == 1
    assert [r.getMessage() for r in caplog.records if r.name == "bunshin.line"] == [
        f"LINE push for {GROUP} failed: SocketTimeoutError"]


async def test_an_answer_that_is_not_json_adds_nothing_to_the_log_line(caplog):
    caplog.set_level(logging.WARNING, logger="bunshin.line")

    async def gateway(request):
        return web.Response(status=502, text="<html>bad gateway</html>", content_type="text/html")

    async with line_answering(handler=gateway) as (api, seen):
        attempt = await api.push(GROUP, [{"type": "text", "text": "x"}], "key", "push")
    assert attempt.outcome == "unknown"
    assert [r.getMessage() for r in caplog.records if r.name == "bunshin.line"] == [
        f"LINE push for {GROUP} failed: HTTP 502 Bad Gateway "]


async def test_at_most_64_calls_are_open_at_once_the_rest_wait_for_a_connection():
    """A burst of replies shares the pool of CONNECTIONS; the 65th waits for one (it does not fail, and LINE's
    API does not see more connections from one bot than that)."""
    open_now, most, release = 0, 0, asyncio.Event()

    async def hold(request):
        nonlocal open_now, most
        open_now += 1
        most = max(most, open_now)
        await release.wait()
        open_now -= 1
        return web.json_response({})

    async with line_answering(handler=hold) as (api, seen):
        calls = [asyncio.create_task(api.push(GROUP, [{"type": "text", "text": "x"}], f"key-{i}", "push"))
                 for i in range(line_api.CONNECTIONS + 6)]
        try:
            while len(seen) < line_api.CONNECTIONS:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # time for any call beyond the pool to arrive, were it let through
            assert most == line_api.CONNECTIONS
        finally:
            release.set()
        attempts = await asyncio.gather(*calls)
    assert [a.outcome for a in attempts] == ["sent"] * (line_api.CONNECTIONS + 6)


async def test_the_proxy_is_read_once_when_the_client_starts(monkeypatch):
    """A proxy set in the environment after start is not used (the client does not read it on each call)."""
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    async with line_answering(200) as (api, seen):
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
        attempt = await api.show_loading(USER, 20)
    assert attempt.outcome == "sent" and len(seen) == 1


async def test_close_closes_the_session_and_is_safe_before_open():
    await LineApi("http://127.0.0.1:9", "token-for-tests", 1.0, BotMetrics()).close()  # never opened
    async with line_answering(200) as (api, seen):
        await api.push(GROUP, [{"type": "text", "text": "x"}], "key", "push")
    assert api._session.closed


# --------------------------------------------------------------------------- LineAdapter.deliver, outcome by outcome

SECRET_ENV, TOKEN_ENV = "BUNSHIN_TEETH_LINE_SECRET", "BUNSHIN_TEETH_LINE_TOKEN"
ACCESS_TOKEN = "teeth-access-token"
QUICK = RetryPolicy(attempts=3, base_s=0.01, max_s=0.02, max_retry_after_s=1.0)


@asynccontextmanager
async def adapter_and_fake(tmp_path, monkeypatch, queue: dict | None = None, **line):
    """A LineAdapter (its client open, as run() opens it) in front of the fake LINE API of tests/support."""
    monkeypatch.setenv(SECRET_ENV, "teeth-secret")
    monkeypatch.setenv(TOKEN_ENV, ACCESS_TOKEN)
    monkeypatch.setattr(LineAdapter, "retry", QUICK)
    async with serving_fake_line(ACCESS_TOKEN) as fake:
        config = BotConfig.from_dict({
            "persona": {"name": "美咲"}, "memory": {"path": str(tmp_path / "memory.sqlite3")}, "queue": queue or {},
            "line": {"enabled": True, "channel_secret_env": SECRET_ENV, "access_token_env": TOKEN_ENV,
                     "api_host": fake.url, "api_timeout_s": 0.5, **line},
        }, source="test")
        adapter = LineAdapter(config, BotMetrics(), "美咲")
        stopping = asyncio.Event()
        running = asyncio.create_task(adapter.run(lambda messages: None, stopping))
        await asyncio.sleep(0)
        try:
            yield adapter, fake
        finally:
            stopping.set()
            await running
            await adapter.close()


def entry(token: str | None = "reply-token-1", *, age_s: float = 0.0, attempts=(), chat: str = USER) -> InboxEntry:
    at = time.time() - age_s
    message = IncomingMessage(platform="line", chat_id=chat, user_id=USER, user_name="LINE user aaaa", text="やあ",
                              addressed=True, event_id="01TEETHEVENT", received_at=at,
                              delivery={"kind": "user", "reply_token": token, "event_ms": int(at * 1000)})
    return InboxEntry(7, message, attempts=[(method, time.time() - ago) for method, ago in attempts])


class Attempts(list):
    """record_attempt as the dispatcher passes it: each method named before its first try."""

    async def __call__(self, method: str) -> None:
        self.append(method)


async def deliver(adapter, inbox_entry, reply: str = "返事だよ") -> tuple[str, list[str]]:
    recorded = Attempts()
    outcome = await adapter.deliver(inbox_entry, reply, recorded)
    return outcome, list(recorded)


async def test_a_fresh_token_is_replied_with_and_the_attempt_recorded_as_reply_first(tmp_path, monkeypatch):
    async with adapter_and_fake(tmp_path, monkeypatch) as (adapter, fake):
        assert await deliver(adapter, entry()) == ("replied", ["reply"])
        assert [d.texts for d in fake.replies_to("reply-token-1")] == [["返事だよ"]]
        assert [c["json"]["replyToken"] for c in fake.to(REPLY)] == ["reply-token-1"]


async def test_a_reply_that_keeps_failing_is_tried_exactly_attempts_times(tmp_path, monkeypatch):
    async with adapter_and_fake(tmp_path, monkeypatch, unknown_outcome="drop") as (adapter, fake):
        fake.script[REPLY] = [Fault(500)] * 5
        assert await deliver(adapter, entry()) == ("unknown_dropped", ["reply"])
        assert len(fake.to(REPLY)) == QUICK.attempts
        fake.script[PUSH] = [Fault(500)] * 5
        pushed = entry(chat=GROUP, attempts=[("push", 60)])
        assert await deliver(adapter, pushed) == ("failed", ["push"])
        assert len(fake.to(PUSH)) == QUICK.attempts


@pytest.mark.parametrize("policy, expected", [("push", ("unknown_pushed", ["reply", "push"])),
                                               ("drop", ("unknown_dropped", ["reply"]))])
async def test_an_unknown_outcome_follows_the_unknown_outcome_setting(tmp_path, monkeypatch, policy, expected, caplog):
    caplog.set_level(logging.WARNING, logger="bunshin.line")
    async with adapter_and_fake(tmp_path, monkeypatch, unknown_outcome=policy) as (adapter, fake):
        fake.script[REPLY] = [Fault(500)] * 5  # every try answered 500: each may have got through
        assert await deliver(adapter, entry()) == expected
        assert [d.path for d in fake.delivered()] == ([PUSH] if policy == "push" else [])
    warning = next(r.getMessage() for r in caplog.records if "outcome unknown" in r.getMessage())
    assert "line:" + USER in warning and "event 01TEETHEVENT" in warning and "inbox entry 7" in warning


async def test_an_unknown_outcome_whose_push_fails_is_failed_not_pushed(tmp_path, monkeypatch):
    async with adapter_and_fake(tmp_path, monkeypatch, unknown_outcome="push") as (adapter, fake):
        fake.script[REPLY] = [Fault(500)] * 5
        fake.script[PUSH] = [Fault(403)]
        assert await deliver(adapter, entry()) == ("failed", ["reply", "push"])


async def test_a_token_refused_on_a_first_try_was_never_used_and_is_pushed_or_dropped(tmp_path, monkeypatch):
    async with adapter_and_fake(tmp_path, monkeypatch, push_fallback=True) as (adapter, fake):
        fake.spent_tokens.add("reply-token-1")  # LINE's "Invalid reply token": expired, and not by us
        assert await deliver(adapter, entry()) == ("replied", ["reply", "push"])
        assert [d.texts for d in fake.pushes_to(USER)] == [["返事だよ"]]
    async with adapter_and_fake(tmp_path, monkeypatch, push_fallback=False) as (adapter, fake):
        fake.spent_tokens.add("reply-token-1")
        assert await deliver(adapter, entry()) == ("dropped", ["reply"])
        assert fake.delivered() == []


async def test_a_token_refused_after_a_try_before_a_restart_may_have_been_delivered(tmp_path, monkeypatch):
    async with adapter_and_fake(tmp_path, monkeypatch, push_fallback=True) as (adapter, fake):
        fake.spent_tokens.add("reply-token-1")  # spent by the try the last run made
        assert await deliver(adapter, entry(attempts=[("reply", 5)])) == ("maybe_delivered", ["reply"])
        assert fake.delivered() == []


async def test_a_refusal_other_than_the_token_fails_without_a_push(tmp_path, monkeypatch):
    async with adapter_and_fake(tmp_path, monkeypatch, push_fallback=True) as (adapter, fake):
        fake.script[REPLY] = [Fault(403)]
        assert await deliver(adapter, entry()) == ("failed", ["reply"])
        assert fake.to(PUSH) == []


async def test_a_push_answered_409_was_accepted_before_and_is_replied(tmp_path, monkeypatch):
    async with adapter_and_fake(tmp_path, monkeypatch) as (adapter, fake):
        pushed = entry(chat=GROUP, attempts=[("push", 30)])
        fake.accepted_keys.add(str(uuid.uuid5(line.PUSH_KEYS, pushed.key)))
        assert await deliver(adapter, pushed) == ("replied", ["push"])
        assert fake.delivered() == []


async def test_a_push_told_to_wait_longer_than_max_retry_after_gives_up(tmp_path, monkeypatch):
    async with adapter_and_fake(tmp_path, monkeypatch) as (adapter, fake):
        fake.script[PUSH] = [Fault(429, retry_after="30")] * 3
        pushed = entry(chat=GROUP, attempts=[("push", 30)])
        began = time.monotonic()
        assert await deliver(adapter, pushed) == ("failed", ["push"])
        assert len(fake.to(PUSH)) == 1 and time.monotonic() - began < 1


async def test_an_empty_reply_is_quiet_and_calls_nothing(tmp_path, monkeypatch):
    async with adapter_and_fake(tmp_path, monkeypatch) as (adapter, fake):
        assert await deliver(adapter, entry(), reply="  \n ") == ("quiet", [])
        assert fake.calls == []


@pytest.mark.parametrize("policy, expected", [("drop", ("unknown_dropped", [])),
                                               ("push", ("unknown_pushed", ["push"]))])
async def test_a_push_tried_over_a_day_ago_is_no_longer_guarded_by_its_retry_key(tmp_path, monkeypatch, policy,
                                                                                  expected):
    async with adapter_and_fake(tmp_path, monkeypatch, unknown_outcome=policy) as (adapter, fake):
        old = entry(chat=GROUP, attempts=[("push", line.RETRY_KEY_LIFE_S + 60)])
        assert await deliver(adapter, old) == expected
        assert [d.texts for d in fake.pushes_to(GROUP)] == ([["返事だよ"]] if policy == "push" else [])


async def test_a_push_tried_within_the_day_is_tried_again_with_the_same_key(tmp_path, monkeypatch):
    async with adapter_and_fake(tmp_path, monkeypatch) as (adapter, fake):
        pushed = entry(chat=GROUP, attempts=[("push", line.RETRY_KEY_LIFE_S - 60)])
        assert await deliver(adapter, pushed) == ("replied", ["push"])
        [call] = fake.to(PUSH)
        assert call["headers"]["X-Line-Retry-Key"] == str(uuid.uuid5(line.PUSH_KEYS, pushed.key))
        assert call["json"] == {"to": GROUP, "messages": [{"type": "text", "text": "返事だよ"}]}


async def test_no_retry_is_made_when_its_wait_would_outlive_the_token(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="bunshin.line")
    async with adapter_and_fake(tmp_path, monkeypatch, unknown_outcome="drop") as (adapter, fake):
        monkeypatch.setattr(LineAdapter, "retry", RetryPolicy(attempts=3, base_s=2.0, max_s=2.0))  # waits 1 to 2 s
        fake.script[REPLY] = [Fault(500)] * 3
        assert await deliver(adapter, entry(age_s=49.0)) == ("unknown_dropped", ["reply"])  # 50 s of token margin
        assert len(fake.to(REPLY)) == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "bunshin.line"]
    assert f"LINE reply (try 1/3) for {USER} failed: HTTP 500 Internal Server Error fake failure" in messages
    assert f"reply to line:{USER} (event 01TEETHEVENT, inbox entry 7): no retry, the token would be stale" in messages


def test_a_reply_is_cut_by_utf16_units_where_only_characters_beyond_the_bmp_count_two():
    # U+FFFF is the last character of one unit, U+10000 the first of two.
    assert line.split_reply("\uffff" * 6, limit=3, max_messages=5) == ["\uffff" * 3] * 2
    assert line.split_reply("\U00010000" * 4, limit=4, max_messages=5) == ["\U00010000" * 2] * 2
    for text in ("\uffff", "\U00010000", "あ\uffff\U0001F431x"):
        assert line.utf16_units(text) == len(text.encode("utf-16-le")) // 2  # as LINE counts a text's length


def test_a_reply_of_exactly_max_messages_pieces_is_whole_and_a_longer_one_ends_in_an_ellipsis_within_the_limit():
    assert line.split_reply("あいうえおかきくけこ\n" * 3, limit=10, max_messages=3) == ["あいうえおかきくけこ"] * 3
    assert line.split_reply("あいうえおかきくけこ\n" * 4, limit=10, max_messages=3) == (
        ["あいうえおかきくけこ"] * 2 + ["あいうえおかきくけ…"])  # the ellipsis takes the last piece's 10th unit


def test_a_refused_webhook_says_its_status_and_reason():
    refused = line.WebhookRejected(401, "bad signature")
    assert (refused.status, refused.reason, str(refused)) == (401, "bad signature", "HTTP 401: bad signature")


@pytest.mark.parametrize("policy, expected", [("drop", ("unknown_dropped", [])),
                                               ("push", ("unknown_pushed", ["push"]))])
async def test_a_reply_tried_before_a_restart_whose_token_is_now_stale_is_an_unknown_outcome(tmp_path, monkeypatch,
                                                                                             caplog, policy, expected):
    caplog.set_level(logging.WARNING, logger="bunshin.line")
    async with adapter_and_fake(tmp_path, monkeypatch, unknown_outcome=policy) as (adapter, fake):
        assert await deliver(adapter, entry(age_s=55, attempts=[("reply", 54)])) == expected
        assert fake.to(REPLY) == []  # the token is not tried again once it is stale
    [warning] = [r.getMessage() for r in caplog.records if "outcome unknown" in r.getMessage()]
    assert "(its reply was tried before a restart and its token is now 55s old)" in warning


async def test_the_warning_of_a_push_past_its_retry_key_says_why(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="bunshin.line")
    async with adapter_and_fake(tmp_path, monkeypatch) as (adapter, fake):
        await deliver(adapter, entry(chat=GROUP, attempts=[("push", line.RETRY_KEY_LIFE_S + 60)]))
    [warning] = [r.getMessage() for r in caplog.records if "outcome unknown" in r.getMessage()]
    assert warning == (f"reply to line:{GROUP} (event 01TEETHEVENT, inbox entry 7): outcome unknown (its push was tried "
                       'over a day ago, when the retry key stopped guarding it): not sent again ([line] unknown_outcome '
                       '= "drop"), so it may never have arrived')


@pytest.mark.parametrize("text, limit, pieces", [
    ("あ\n" + "い" * 20, 10, ["あ\n" + "い" * 8, "い" * 10, "いい"]),  # a newline in the first half is passed over
    ("あ。" + "い" * 20, 10, ["あ。" + "い" * 8, "い" * 10, "いい"]),  # so is a sentence end
    ("あ " + "い" * 20, 10, ["あ " + "い" * 8, "い" * 10, "いい"]),  # and a space
    ("あ\nいう", 3, ["あ", "いう"]),  # a newline at the window's second place, its floor 1, is a cut
    ("あ。いう", 3, ["あ。", "いう"]),  # a sentence end there too
    ("いいいいいい あ あう", 10, ["いいいいいい あ", "あう"]),  # the last space of the window's second half
    # A window of 12: its second half starts at 6. A newline at 5 is in the first half (not a third of it).
    ("あいうえお\nかきくけこさしすせそたち", 12, ["あいうえお\nかきくけこさ", "しすせそたち"]),
    ("あいうえおか\nき\nくけこさしす", 12, ["あいうえおか\nき", "くけこさしす"]),  # the last newline, not the first
    ("あいうえおか。き。くけこさしす", 12, ["あいうえおか。き。", "くけこさしす"]),  # the last sentence end
    ("あいう\u3000えおかきくけこさしすせそ", 12, ["あいう\u3000えおかきくけこさ", "しすせそ"]),  # an ideographic space too
    ("あいうえおか\u3000き\u3000くけこさしす", 12, ["あいうえおか\u3000き", "くけこさしす"]),
    ("あいうえおかき\u3000くけこさしす", 12, ["あいうえおかき", "くけこさしす"]),
    ("あ いう", 3, ["あ", "いう"]),  # a space at the window's second place, its floor 1, is a cut
    ("あいうえおか \nきくけこさしすせ", 12, ["あいうえおか", "きくけこさしすせ"]),  # a piece ends without its spaces
])
def test_a_long_reply_is_cut_at_the_last_boundary_of_the_windows_second_half(text, limit, pieces):
    assert line.split_reply(text, limit=limit, max_messages=5) == pieces


async def test_a_reply_tried_before_a_restart_with_its_token_still_fresh_is_tried_again_and_delivered(tmp_path,
                                                                                                    monkeypatch):
    async with adapter_and_fake(tmp_path, monkeypatch) as (adapter, fake):
        assert await deliver(adapter, entry(age_s=5, attempts=[("reply", 4)])) == ("replied", ["reply"])
        assert [d.texts for d in fake.replies_to("reply-token-1")] == [["返事だよ"]]


@pytest.mark.parametrize("token_age, reason", [(0.0, "reply not accepted in time"),
                                               (55.0, "reply token stale after 55.0s")])
async def test_a_reply_that_could_not_be_sent_is_dropped_with_its_reason(tmp_path, monkeypatch, caplog, token_age,
                                                                         reason):
    """A token LINE refused on the first try (never taken), or one past [line] reply_token_margin_s before any try:
    without push_fallback the reply is dropped, and the warning says which."""
    caplog.set_level(logging.WARNING, logger="bunshin.line")
    async with adapter_and_fake(tmp_path, monkeypatch, push_fallback=False) as (adapter, fake):
        fake.spent_tokens.add("reply-token-1")
        assert await deliver(adapter, entry(age_s=token_age)) == ("dropped", ["reply"] if token_age == 0 else [])
    messages = [r.getMessage() for r in caplog.records if r.name == "bunshin.line"]
    assert f"{reason} for line:{USER} (event 01TEETHEVENT, inbox entry 7): reply dropped ([line] push_fallback is off)" \
        in messages


async def test_the_warning_of_a_reply_whose_token_ran_out_between_tries_says_why(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="bunshin.line")
    async with adapter_and_fake(tmp_path, monkeypatch) as (adapter, fake):
        fake.script[REPLY] = [Fault(500)] * 5
        await deliver(adapter, entry())
    [warning] = [r.getMessage() for r in caplog.records if "outcome unknown" in r.getMessage()]
    assert "(its reply may have got through, and its token ran out before a try could tell)" in warning


async def test_a_429s_retry_after_is_waited_out_up_to_max_retry_after(tmp_path, monkeypatch):
    async with adapter_and_fake(tmp_path, monkeypatch) as (adapter, fake):
        fake.script[PUSH] = [Fault(429, retry_after="1")]  # QUICK.max_retry_after_s is 1: waited, not given up
        pushed = entry(chat=GROUP, attempts=[("push", 30)])
        assert await deliver(adapter, pushed) == ("replied", ["push"])
        first, second = fake.to(PUSH)
        assert second["at"] - first["at"] >= 1.0


async def test_a_reply_throttled_on_every_try_was_never_taken_and_is_dropped_as_not_accepted(tmp_path, monkeypatch,
                                                                                            caplog):
    caplog.set_level(logging.WARNING, logger="bunshin.line")
    async with adapter_and_fake(tmp_path, monkeypatch, push_fallback=False) as (adapter, fake):
        fake.script[REPLY] = [Fault(429, retry_after="0")] * 5  # a 429 sends nothing: no try may have got through
        assert await deliver(adapter, entry()) == ("dropped", ["reply"])
        assert len(fake.to(REPLY)) == QUICK.attempts
    messages = [r.getMessage() for r in caplog.records if r.name == "bunshin.line"]
    assert (f"reply not accepted in time for line:{USER} (event 01TEETHEVENT, inbox entry 7): reply dropped "
            "([line] push_fallback is off)") in messages


@pytest.mark.parametrize("deadline_s, seconds", [(3, 5), (12, 15), (15, 15), (61, 60), (600, 60)])
async def test_the_loading_animation_lasts_the_reply_deadline_in_fives_within_5_to_60_seconds(tmp_path, monkeypatch,
                                                                                            deadline_s, seconds):
    monkeypatch.setattr(line, "LOADING_AFTER_S", 0.0)
    async with adapter_and_fake(tmp_path, monkeypatch, queue={"deadline_s": deadline_s}) as (adapter, fake):
        async with adapter.working(entry()):
            for _ in range(500):
                if fake.to(LOADING):
                    break
                await asyncio.sleep(0.01)
    [loading] = fake.to(LOADING)
    assert loading["json"] == {"chatId": USER, "loadingSeconds": seconds}


async def test_a_failed_name_lookup_keeps_the_name_found_before_until_it_is_asked_again(tmp_path, monkeypatch):
    monkeypatch.setattr(line, "NAME_REFRESH_S", 0.0)  # a name found is due for a refresh at once
    message = entry().message
    async with adapter_and_fake(tmp_path, monkeypatch) as (adapter, fake):
        fake.profiles[USER] = "健太"
        assert await adapter.speaker_name(message) == "健太"
        del fake.profiles[USER]  # LINE answers 404 now (the user blocked the bot)
        assert await adapter.speaker_name(message) == "健太"  # the refresh failed: the name known before
        assert await adapter.speaker_name(message) == "健太"  # and for NAME_RETRY_S, without asking
    assert len(fake.to(PROFILE)) == 2


async def test_an_entry_without_lines_timestamp_counts_its_token_as_stale(tmp_path, monkeypatch):
    """A delivery record without event_ms (written by hand, or by an older bunshin): its token's age is unknown, so it
    is taken as stale, never as fresh, and the reply is pushed (with push_fallback on)."""
    stamped = entry()
    del stamped.message.delivery["event_ms"]
    async with adapter_and_fake(tmp_path, monkeypatch, push_fallback=True) as (adapter, fake):
        assert adapter._token_age(stamped.message) > 1e9  # from the epoch
        assert await deliver(adapter, stamped) == ("replied", ["push"])
        assert (len(fake.to(PUSH)), fake.to(REPLY)) == (1, [])


@asynccontextmanager
async def posting_webhooks(adapter: LineAdapter):
    """The adapter's webhook served on loopback; yields post(body) -> (status, text), signed as LINE signs."""
    import aiohttp

    app = web.Application()
    app.router.add_post("/callback", adapter.webhook)

    async def post(body: bytes) -> tuple[int, str]:
        headers = {"X-Line-Signature": sign(body, "teeth-secret")}
        async with session.post(f"{url}/callback", data=body, headers=headers) as answer:
            return answer.status, await answer.text()

    async with on_loopback(app) as url, aiohttp.ClientSession() as session:
        yield post


async def test_the_webhook_answers_ok_takes_each_event_once_and_logs_a_redelivery(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="bunshin.line")
    taken: list[str] = []

    async def accept(messages):  # as the inbox answers: an entry for a new event, None for one taken already
        answers = [None if m.event_id in taken else InboxEntry(len(taken) + i, m) for i, m in enumerate(messages)]
        taken.extend(m.event_id for m in messages)
        return answers

    async with adapter_and_fake(tmp_path, monkeypatch) as (adapter, _):
        adapter._accept = accept
        body = webhook_bytes(text_event("やあ", user=USER, event_id="01FIRSTEVENT"))
        async with posting_webhooks(adapter) as post:
            assert await post(body) == (200, "OK")
            assert not [r for r in caplog.records if "delivered again" in r.getMessage()]
            assert await post(body) == (200, "OK")  # LINE redelivers: answered 200, and not taken twice
    assert [r.getMessage() for r in caplog.records if "delivered again" in r.getMessage()] == [
        "event 01FIRSTEVENT delivered again: already taken"]


async def test_a_webhook_the_inbox_cannot_store_is_a_500_and_one_before_start_a_503(tmp_path, monkeypatch):
    """LINE redelivers what got a 5xx (with redelivery on): a message is never acknowledged and lost."""
    from bot.inbox import InboxError

    async def full_disk(messages):
        raise InboxError("cannot write the inbox: database or disk is full")

    body = webhook_bytes(text_event("やあ", user=USER))
    async with adapter_and_fake(tmp_path, monkeypatch) as (adapter, _):
        adapter._accept = full_disk
        async with posting_webhooks(adapter) as post:
            assert await post(body) == (500, "could not store the events")
            adapter._accept = None  # as before run(), and after close()
            assert await post(body) == (503, "not serving")
            assert await post(b" " * (line.MAX_BODY_BYTES + 1)) == (413, f"body over {line.MAX_BODY_BYTES} bytes")


async def test_a_stale_token_without_push_fallback_is_not_worth_a_reply(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="bunshin.line")
    async with adapter_and_fake(tmp_path, monkeypatch) as (adapter, _):
        assert adapter.can_deliver(entry(age_s=0))
        assert adapter.can_deliver(entry(age_s=55, attempts=[("reply", 54)]))  # tried before a restart: settle it
        assert not adapter.can_deliver(entry(age_s=55))  # nobody would get the reply: it is not made
    async with adapter_and_fake(tmp_path, monkeypatch, push_fallback=True) as (adapter, _):
        assert adapter.can_deliver(entry(age_s=55))
    [dropped] = [r.getMessage() for r in caplog.records if "reply dropped" in r.getMessage()]
    assert dropped.startswith("reply token stale after 55.") and dropped.endswith(
        f"s for line:{USER} (event 01TEETHEVENT, inbox entry 7): reply dropped ([line] push_fallback is off)")


def test_an_event_is_ignored_when_any_of_its_ids_is_no_text_or_its_time_is_out_of_range():
    """Values LINE never sends would fail later (SQLite cannot store a lone surrogate; a time past 2**53 ms loses
    precision as a float): the parser drops the event, and takes every time from 0 to 2**53 - 1."""
    def parsed(*events) -> list[str]:
        return [e.event_id for e in line.parse_events(json.dumps({"events": list(events)}).encode())]

    fine = text_event("やあ", user=USER, group=GROUP, event_id="FINE")
    assert parsed(fine) == ["FINE"]
    assert parsed({**fine, "source": {**fine["source"], "groupId": "C\ud800"}}) == []  # the chat
    assert parsed({**fine, "source": {**fine["source"], "userId": "U\udc00"}}) == []  # the sender
    assert parsed({**fine, "replyToken": "\ud800token"}) == []
    for timestamp, kept in ((0, True), (2**53 - 1, True), (2**53, False), (-1, False)):
        assert parsed({**fine, "timestamp": timestamp}) == (["FINE"] if kept else []), timestamp


async def test_a_webhook_before_run_or_after_close_is_a_503(tmp_path, monkeypatch):
    body = webhook_bytes(text_event("やあ", user=USER))
    async with adapter_and_fake(tmp_path, monkeypatch) as (adapter, _):
        not_started = LineAdapter(adapter.config, BotMetrics(), "美咲")
        async with posting_webhooks(not_started) as post:
            assert await post(body) == (503, "not serving")
        await not_started.close()
        await adapter.close()
        async with posting_webhooks(adapter) as post:
            assert await post(body) == (503, "not serving")
