"""Whatever arrives at the LINE webhook gets a result or a clear 4xx, never a 500 or an exception in the
background: property-based fuzzing of the body parser, then of the real webhook over HTTP; and the
signature is checked before a byte of the body is parsed."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request

import pytest
from aiohttp import web
from conftest import ScriptedRouter, answered_by
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adapters.line as line_module
from adapters.line import LineAdapter, TextEvent, WebhookRejected, parse_events
from bot.metrics import BotMetrics
from finetune.config import BotConfig
from tests.support.fake_line_api import serving_fake_line, sign, text_event, webhook_bytes

SECRET, TOKEN = "fuzz-channel-secret-3c3c", "fuzz-access-token-4d4d"
USER = "U" + "7" * 32

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
EVENT_KEYS = ["type", "mode", "timestamp", "source", "webhookEventId", "deliveryContext", "replyToken", "message"]
FIELD_PATHS = [(k,) for k in EVENT_KEYS] + [("source", "type"), ("source", "userId"), ("source", "groupId"),
                                              ("message", "type"), ("message", "text"), ("message", "id"),
                                              ("message", "mention"), ("message", "quoteToken")]
# What LINE never sends but JSON can carry: unpaired surrogates, huge or negative numbers, control characters.
# The empty list and dict are built fresh for each draw: sampled_from would hand out one shared object, which a
# mutation could then put inside itself (json.dumps: "Circular reference detected").
odd_values = json_values | st.sampled_from(["\ud800", "a\udfffb", 10**400, -1, 2**63, 1e308, "\x00", ""]) | st.builds(list) | st.builds(dict)


@st.composite
def mutated_events(draw) -> dict:
    """A valid text message event with some fields replaced, removed, or given odd values."""
    event = text_event(draw(st.text(max_size=30)), user=USER)
    for path in draw(st.lists(st.sampled_from(FIELD_PATHS), max_size=4)):
        target = event
        for key in path[:-1]:
            target = target.get(key) if isinstance(target.get(key), dict) else {}
        if draw(st.booleans()):
            target.pop(path[-1], None)
        else:
            target[path[-1]] = draw(odd_values)
    return event


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(odd_values, min_size=2, max_size=8))
def test_odd_values_never_hand_out_one_mutable_object_twice(values):
    """A shared [] or {} could be put inside itself by a mutation, and the body would fail to serialize at random."""
    mutable = [id(v) for v in values if isinstance(v, (list, dict))]
    assert len(mutable) == len(set(mutable))


def as_json(value) -> bytes:
    # ASCII with \\uXXXX escapes: unpaired surrogates travel inside valid UTF-8 JSON, as anyone could send them.
    return json.dumps(value).encode("ascii")

bodies = st.one_of(
    st.binary(max_size=200),  # anything at all, invalid UTF-8 included
    json_values.map(as_json),
    st.lists(mutated_events(), max_size=4).map(lambda events: as_json({"destination": "U0", "events": events})),
    st.lists(json_values, max_size=3).map(lambda events: as_json({"events": events})),
    st.builds(lambda prefix, cut: webhook_bytes(text_event("ok", user=USER))[:cut] + prefix,
              st.binary(max_size=4), st.integers(0, 400)),  # cut short, with bytes after
)


def check_parsed(body: bytes) -> int:
    """parse_events' contract: a list of answerable events with sane values, or WebhookRejected(400)."""
    try:
        events = parse_events(body)
    except WebhookRejected as exc:
        assert exc.status == 400 and exc.reason
        return 400
    for event in events:
        assert isinstance(event, TextEvent) and event.kind in ("user", "group", "room") and event.chat_id
        for text in (event.event_id, event.text, event.chat_id, event.user_id, event.reply_token or ""):
            assert isinstance(text, str)
            text.encode("utf-8")  # storable in SQLite
        assert 0 <= event.timestamp_ms < 2**53
        assert all(type(i) is int and type(n) is int for i, n in event.self_mentions)
    return 200


@settings(max_examples=1500, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_the_parser_answers_every_body_with_events_or_a_400(body):
    check_parsed(body)


def test_what_the_parser_refuses_and_why():
    assert check_parsed(webhook_bytes()) == 200
    cases = {
        b"\xff\xfe{}": "not UTF-8 (invalid byte at offset 0)",
        b"{not json": "not JSON (Expecting property name enclosed in double quotes at line 1 column 2)",
        b"[" * 100_000: "nested too deeply",
        b'{"events": [], "n": ' + b"1" * 5_000 + b"}": "a number with too many digits",  # a ValueError in json
        b"": "body is empty",
        b"[]": 'no "events" list',
        b'{"events": {}}': 'no "events" list',
        '{"events": []}'.encode("utf-16"): "not UTF-8",  # json.loads(bytes) alone would have taken it
    }
    for body, why in cases.items():
        with pytest.raises(WebhookRejected) as exc:
            parse_events(body)
        assert exc.value.status == 400 and why in exc.value.reason
    bad_id = text_event("hi", user=USER, event_id="\ud800")
    huge_time = {**text_event("hi", user=USER), "timestamp": 10**400}
    lone_text = text_event("\udc00", user=USER)
    assert parse_events(as_json({"events": [bad_id, huge_time, lone_text]})) == []


# --- the webhook over HTTP ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def webhook_url(tmp_path_factory):
    """The real adapter and a fake LINE API, served from a thread's event loop for synchronous hypothesis tests;
    yields (url, errors): errors are the adapter's log records at ERROR, background tasks' included."""
    folder = tmp_path_factory.mktemp("fuzz")
    errors: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append
    logging.getLogger("bunshin.line").addHandler(handler)
    ready, stop = threading.Event(), None
    found: dict = {}

    async def serve():
        nonlocal stop
        stop = asyncio.Event()
        async with serving_fake_line(TOKEN) as fake:
            os.environ["BUNSHIN_FUZZ_SECRET"], os.environ["BUNSHIN_FUZZ_TOKEN"] = SECRET, TOKEN
            config = BotConfig.from_dict({"persona": {"name": "美咲"}, "memory": {"path": str(folder / "m.sqlite3")},
                                          "line": {"enabled": True, "channel_secret_env": "BUNSHIN_FUZZ_SECRET",
                                                   "access_token_env": "BUNSHIN_FUZZ_TOKEN", "api_host": fake.url}})
            adapter = LineAdapter(config, BotMetrics(), "美咲")
            app = web.Application()
            app.router.add_routes(adapter.web_routes())
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()

            async with answered_by(adapter, ScriptedRouter(lambda message: "はい")) as dispatcher:
                running = asyncio.create_task(adapter.run(dispatcher.accept, stop))
                found["url"] = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/callback"
                found["fake"] = fake
                ready.set()
                await running
            await adapter.close()
            await runner.cleanup()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(30)
    yield found["url"], errors, found["fake"]
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)
    logging.getLogger("bunshin.line").removeHandler(handler)


def post(url: str, body: bytes, signature: str | None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json", **({"X-Line-Signature": signature} if signature else {})}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(bodies)
def test_the_webhook_answers_every_signed_body_with_200_or_a_clear_400(webhook_url, body):
    url, errors, _ = webhook_url
    status, text = post(url, body, sign(body, SECRET))
    assert status == check_parsed(body), text
    if status == 400:
        assert text.startswith("body ")


def test_background_handling_of_fuzzed_events_raised_nothing(webhook_url):
    """Runs after the fuzzing: every accepted event was handled (the fake got its reply) and nothing was logged
    at ERROR by the adapter, background tasks included."""
    url, errors, fake = webhook_url
    sentinel = text_event("最後", user="U" + "8" * 32)
    assert post(url, webhook_bytes(sentinel), sign(webhook_bytes(sentinel), SECRET))[0] == 200
    deadline = time.monotonic() + 10
    while not fake.replies_to(sentinel["replyToken"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.replies_to(sentinel["replyToken"])
    assert [r.getMessage() for r in errors] == []


def test_the_signature_is_checked_before_the_body_is_parsed(webhook_url, monkeypatch):
    url, _, _ = webhook_url
    parsed = []
    monkeypatch.setattr(line_module, "parse_events", lambda body: parsed.append(body) or [])
    garbage = b"\xff not json, not utf-8"
    assert post(url, garbage, None) == (400, "missing X-Line-Signature")
    assert post(url, garbage, sign(garbage, "someone else's secret")) == (401, "invalid X-Line-Signature")
    assert post(url, garbage, "not base64 at all!") == (401, "invalid X-Line-Signature")
    assert parsed == []
    assert post(url, garbage, sign(garbage, SECRET))[0] == 200 and parsed == [garbage]


def test_a_signature_header_of_any_bytes_is_401_and_a_body_that_does_not_decode_400(webhook_url):
    """What once could be a 500 (the shared bot/http_input.py reads both): a signature that is not UTF-8, a gzip
    body that is not gzip."""
    url, _, _ = webhook_url
    body = webhook_bytes()
    # urllib sends a str header as latin-1: these are the raw bytes ff fe and a lone surrogate's CESU-8 form.
    for signature in ("\xff\xfe", sign(body, SECRET) + "\xe9", "\xed\xa0\x80"):
        assert post(url, body, signature) == (401, "invalid X-Line-Signature")
    request = urllib.request.Request(url, data=b"not gzip", method="POST",
                                     headers={"Content-Encoding": "gzip", "X-Line-Signature": sign(body, SECRET)})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)  # noqa: S310 - loopback
    assert refused.value.code == 400 and refused.value.read().decode().startswith("body is unreadable")


def test_bodies_over_the_cap_are_refused_before_reading_or_verifying(webhook_url):
    url, _, _ = webhook_url
    huge = b" " * (line_module.MAX_BODY_BYTES + 1)
    assert post(url, huge, None)[0] == 413
    assert post(url, huge, sign(huge, SECRET))[0] == 413
    just_fits = webhook_bytes() + b" " * (line_module.MAX_BODY_BYTES - len(webhook_bytes()))
    assert post(url, just_fits, sign(just_fits, SECRET))[0] == 200


def test_events_serialised_by_lines_own_sdk_read_as_the_sdk_reads_them():
    """The parser against what LINE's official SDK (line-bot-sdk, a dev dependency) writes and reads: the SDK
    builds each event and serialises it; our parse_events and the SDK's Event.from_dict must agree on every field
    the bot uses, and non-text messages are skipped by both."""
    from linebot.v3.webhooks import (
        AllMentionee,
        ContentProvider,
        DeliveryContext,
        Event,
        GroupSource,
        ImageMessageContent,
        Mention,
        MessageEvent,
        RoomSource,
        TextMessageContent,
        UserMentionee,
        UserSource,
    )

    def event(source, message, event_id: str) -> dict:
        built = MessageEvent(type="message", mode="active", timestamp=1462629479859, source=source,
                             webhook_event_id=event_id, delivery_context=DeliveryContext(is_redelivery=False),
                             reply_token=f"token-{event_id}", message=message)
        return json.loads(built.to_json())

    mention = Mention(mentionees=[UserMentionee(type="user", index=3, length=3, user_id="Ubot", is_self=True),
                                  UserMentionee(type="user", index=0, length=1, user_id=USER, is_self=False),
                                  AllMentionee(type="all", index=0, length=1)])
    raw = [
        event(UserSource(type="user", user_id=USER), TextMessageContent(type="text", id="1", text="Hello, world",
                                                                        quote_token="q"), "E1"),
        event(GroupSource(type="group", group_id="C" + "1" * 32, user_id=USER),
              TextMessageContent(type="text", id="2", text="😀 @美咲 元気？", quote_token="q", mention=mention), "E2"),
        event(GroupSource(type="group", group_id="C" + "2" * 32),  # a member who does not share a profile
              TextMessageContent(type="text", id="3", text="だれ？", quote_token="q"), "E3"),
        event(RoomSource(type="room", room_id="R" + "3" * 32, user_id=USER),
              TextMessageContent(type="text", id="4", text="部屋", quote_token="q"), "E4"),
        event(UserSource(type="user", user_id=USER), ImageMessageContent(
            type="image", id="5", quote_token="q", content_provider=ContentProvider(type="line")), "E5"),
    ]
    ours = parse_events(as_json({"destination": "U0", "events": raw}))
    theirs = [e for e in map(Event.from_dict, raw) if isinstance(e.message, TextMessageContent)]
    assert [e.event_id for e in ours] == [e.webhook_event_id for e in theirs] == ["E1", "E2", "E3", "E4"]
    for mine, sdk in zip(ours, theirs, strict=True):
        source = sdk.source
        assert (mine.kind, mine.chat_id) == (source.type, getattr(source, f"{source.type}_id"))
        assert mine.user_id == (getattr(source, "user_id", None) or "")
        assert (mine.text, mine.timestamp_ms, mine.reply_token) == (sdk.message.text, sdk.timestamp, sdk.reply_token)
        sdk_self = tuple((m.index, m.length) for m in (sdk.message.mention.mentionees if sdk.message.mention else ())
                         if getattr(m, "is_self", False))
        assert mine.self_mentions == sdk_self
    assert ours[1].self_mentions == ((3, 3),)
