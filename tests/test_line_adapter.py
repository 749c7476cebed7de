"""The LINE adapter end to end: the real daemon and tiny model, real signed webhooks over loopback
HTTP, and a fake LINE API (a real aiohttp server) that records what the SDK's client sends it."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import adapters.line as line_module
from adapters.line import MAX_BODY_BYTES, split_reply, strip_self_mention, utf16_units
from bot.daemon import run_daemon
from bot.router import RATE_LIMIT_REPLY
from finetune.config import BotConfig
from finetune.tiny_model import build_tiny_model
from tests.support.fake_line_api import LOADING, PROFILE, PUSH, REPLY, Fault, serving_fake_line, webhook
from tests.support.fake_line_api import sign as line_sign
from tests.support.fake_line_api import text_event as line_text_event

PERSONA = "美咲"
SECRET = "test-channel-secret-0123456789abcdef"
TOKEN = "test-access-token-abcdefghijklmnopqrstuvwxyz"
SECRET_ENV = "BUNSHIN_TEST_LINE_SECRET"
TOKEN_ENV = "BUNSHIN_TEST_LINE_TOKEN"
USER = "U4af4980629" + "0" * 22
OTHER_USER = "U1234567890" + "a" * 22
GROUP = "C4af4980629" + "1" * 22
OTHER_GROUP = "C4af4980629" + "2" * 22


# --- the far side: the fake LINE API on loopback (tests/support/fake_line_api.py) --------------


@pytest.fixture
async def fake_line():
    async with serving_fake_line(TOKEN) as fake:
        yield fake


def replies_to(fake, token: str) -> list[dict]:
    """The reply calls with `token` that LINE accepted."""
    return [c for c in fake.to(REPLY) if c["json"]["replyToken"] == token and c.get("status") == 200]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("line") / "tiny")


@pytest.fixture(autouse=True)
def secrets_in_env(monkeypatch, caplog):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    caplog.set_level(logging.INFO)


# --- the near side: the daemon, and webhooks as LINE signs them --------------------------------


class Bot:
    def __init__(self, url: str, session: aiohttp.ClientSession):
        self.url = url
        self.session = session

    async def post(self, body, signature: str | None = "sign", headers=None) -> aiohttp.ClientResponse:
        raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json", **(headers or {})}
        if signature == "sign":
            signature = sign(raw)
        if signature is not None:
            headers["X-Line-Signature"] = signature
        async with self.session.post(self.url + "/callback", data=raw, headers=headers) as response:
            await response.read()
            return response


def sign(raw: bytes, secret: str = SECRET) -> str:
    return line_sign(raw, secret)


def text_event(text: str, *, user: str = USER, **kw) -> dict:
    return line_text_event(text, user=user, other_user=OTHER_USER, **kw)


async def wait_for(condition, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def logged(caplog, pattern: str, since: int = 0):
    return next((m.group(0) for r in caplog.records[since:] if (m := re.search(pattern, r.getMessage()))), None)


@asynccontextmanager
async def running_bot(folder: Path, tiny: Path, fake, caplog, limits=None, generation=None, **line):
    config = BotConfig.from_dict({
        "limits": limits or {},
        "model": {"base": str(tiny), "device": "cpu"},
        "persona": {"name": PERSONA},
        "generation": generation or {"max_new_tokens": 8, "temperature": 0.0},
        "memory": {"path": str(folder / "memory.sqlite3")},
        "server": {"port": 0},
        "line": {"enabled": True, "channel_secret_env": SECRET_ENV, "access_token_env": TOKEN_ENV,
                 "api_host": fake.url, **line},
    }, source="test")
    since = len(caplog.records)
    stop = asyncio.Event()
    daemon = asyncio.create_task(run_daemon(config, stop=stop))
    try:
        port = await wait_for(lambda: daemon.done() and daemon.result() or
                              logged(caplog, r"(?<=127\.0\.0\.1:)\d+(?=/healthz)", since), what="the daemon's port")
        await wait_for(lambda: logged(caplog, "serving as", since), what="serving")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            yield Bot(f"http://127.0.0.1:{port}", session)
    finally:
        stop.set()
        assert await asyncio.wait_for(daemon, 60) == 0


async def healthy(bot: Bot) -> bool:
    async with bot.session.get(bot.url + "/healthz") as response:
        return response.status == 200 and (await response.json())["phase"] == "serving"


def remembered(folder: Path, chat_key: str) -> list[str]:
    with sqlite3.connect(folder / "memory.sqlite3") as db:
        return [t for (t,) in db.execute("SELECT text FROM turns WHERE chat_key = ? ORDER BY id", (chat_key,))]


# --- the webhook, end to end --------------------------------------------------------------------


async def test_a_one_to_one_message_is_answered_with_its_reply_token(tmp_path, tiny, fake_line, caplog, monkeypatch):
    monkeypatch.setattr(line_module, "LOADING_AFTER_S", 0.0)  # every reply is "slow": the animation is shown
    async with running_bot(tmp_path, tiny, fake_line, caplog) as bot:
        event = text_event("ひみつの話なんだけど")
        started = time.monotonic()
        response = await bot.post(webhook(event))
        assert response.status == 200 and time.monotonic() - started < 1.5  # answered before the generation
        (reply,) = await wait_for(lambda: replies_to(fake_line, event["replyToken"]), what="the reply")
        messages = reply["json"]["messages"]
        assert 1 <= len(messages) <= 5 and all(m["type"] == "text" and m["text"].strip() for m in messages)
        assert reply["headers"]["Authorization"] == f"Bearer {TOKEN}"
        # The loading animation was started for this 1:1 chat before the reply went out.
        (loading,) = fake_line.to(LOADING)
        assert fake_line.calls.index(loading) < fake_line.calls.index(reply)
        assert loading["json"]["chatId"] == USER and loading["json"]["loadingSeconds"] in range(5, 61, 5)
        assert remembered(tmp_path, f"line:{USER}")[0] == "ひみつの話なんだけど"
    # The log tells the operator what happened, never what was said, nor a secret.
    assert "replied to line:" in caplog.text
    for private in ("ひみつの話", SECRET, TOKEN, messages[0]["text"]):
        assert private not in caplog.text


async def test_a_quick_answer_needs_no_loading_animation(tmp_path, tiny, fake_line, caplog, monkeypatch):
    monkeypatch.setattr(line_module, "LOADING_AFTER_S", 2.0)
    async with running_bot(tmp_path, tiny, fake_line, caplog, limits={"burst": 1, "messages_per_minute": 1.0}) as bot:
        quick = text_event("はやい？")  # 8 tokens of the tiny model: milliseconds
        assert (await bot.post(webhook(quick))).status == 200
        await wait_for(lambda: replies_to(fake_line, quick["replyToken"]), what="the quick reply")
        too_fast = text_event("もう一回")  # over the rate limit: answered at once, without the model
        assert (await bot.post(webhook(too_fast))).status == 200
        await wait_for(lambda: replies_to(fake_line, too_fast["replyToken"]), what="the rate-limit answer")
        await asyncio.sleep(2.5)  # past the threshold: a forgotten timer would have fired by now
    assert fake_line.to(LOADING) == [] and len(fake_line.to(REPLY)) == 2


async def test_a_slow_answer_shows_the_loading_animation_before_the_reply(tmp_path, tiny, fake_line, caplog, monkeypatch):
    monkeypatch.setattr(line_module, "LOADING_AFTER_S", 0.05)
    async with running_bot(tmp_path, tiny, fake_line, caplog,
                           generation={"max_new_tokens": 300, "temperature": 0.0, "repetition_penalty": 1.0}) as bot:
        slow = text_event("ゆっくりでいいよ")
        assert (await bot.post(webhook(slow))).status == 200
        (reply,) = await wait_for(lambda: replies_to(fake_line, slow["replyToken"]), what="the slow reply")
    (loading,) = fake_line.to(LOADING)
    assert fake_line.calls.index(loading) < fake_line.calls.index(reply)


async def test_an_empty_events_list_is_a_connectivity_check(tmp_path, tiny, fake_line, caplog):
    async with running_bot(tmp_path, tiny, fake_line, caplog) as bot:
        assert (await bot.post(webhook())).status == 200
        await asyncio.sleep(0.2)
    assert fake_line.calls == []


async def test_in_a_group_only_a_mention_of_the_bot_is_answered(tmp_path, tiny, fake_line, caplog):
    plain = text_event("今日の夕飯なに？", group=GROUP)
    by_name = text_event(f"{PERSONA}はどう思う？", group=GROUP)
    someone_else = text_event("@健太 どう？", group=GROUP, mention_self=False)
    the_bot = text_event("@美咲 どう？", group=GROUP, mention_self=True)
    async with running_bot(tmp_path, tiny, fake_line, caplog) as bot:
        # One body: a chat's events are handled in order, so once the last is answered the others are done.
        assert (await bot.post(webhook(plain, by_name, someone_else, the_bot))).status == 200
        await wait_for(lambda: replies_to(fake_line, the_bot["replyToken"]), what="the reply to the mention")
        assert len(fake_line.to(REPLY)) == 1
        assert fake_line.to(LOADING) == []  # the animation exists for 1:1 chats only
        # The unanswered messages are still remembered: the next question is often about them. The bot's own
        # @mention is not part of what was said (as on Discord); someone else's stays.
        assert remembered(tmp_path, f"line:{GROUP}")[:4] == ["今日の夕飯なに？", f"{PERSONA}はどう思う？", "@健太 どう？",
                                                             "どう？"]


async def test_call_by_name_answers_the_persona_name_in_a_group(tmp_path, tiny, fake_line, caplog):
    called = text_event(f"ねえ{PERSONA}、元気？", group=GROUP)
    async with running_bot(tmp_path, tiny, fake_line, caplog, call_by_name=True) as bot:
        assert (await bot.post(webhook(text_event("元気？", group=GROUP), called))).status == 200
        await wait_for(lambda: replies_to(fake_line, called["replyToken"]), what="the reply to the name")
        assert len(fake_line.to(REPLY)) == 1


async def test_a_redelivered_event_is_answered_once_even_across_a_restart(tmp_path, tiny, fake_line, caplog):
    event = text_event("届いてる？")
    again = {**event, "deliveryContext": {"isRedelivery": True}}

    async def answered_after(bot, *bodies) -> None:
        for body in bodies:
            assert (await bot.post(body)).status == 200
        sentinel = text_event("次の話")  # same chat, posted last: answered after anything posted before it
        assert (await bot.post(webhook(sentinel))).status == 200
        await wait_for(lambda: replies_to(fake_line, sentinel["replyToken"]), what="the sentinel's reply")

    async with running_bot(tmp_path, tiny, fake_line, caplog) as bot:
        await answered_after(bot, webhook(event, event), webhook(again))
        assert len(replies_to(fake_line, event["replyToken"])) == 1
    async with running_bot(tmp_path, tiny, fake_line, caplog) as bot:
        await answered_after(bot, webhook(again))
    assert len(replies_to(fake_line, event["replyToken"])) == 1
    assert remembered(tmp_path, f"line:{USER}").count("届いてる？") == 1
    assert "delivered again" in caplog.text
    assert (tmp_path / "memory.inbox.sqlite3").is_file()


def speakers(folder: Path, chat_key: str) -> list[str]:
    with sqlite3.connect(folder / "memory.sqlite3") as db:
        return [s for (s,) in db.execute("SELECT speaker FROM turns WHERE chat_key = ? ORDER BY id", (chat_key,))]


async def test_the_bot_remembers_senders_by_their_line_display_name_also_after_a_restart(tmp_path, tiny, fake_line,
                                                                                          caplog):
    """The persona learned people by their LINE display names (LINE's exports use them): memory keeps the
    sender's, the persona's own for its replies, and a restart finds the name on disk instead of asking again."""
    fake_line.profiles = {USER: "健太"}

    async def answered_in_a_run_of_its_own(text: str) -> None:
        async with running_bot(tmp_path, tiny, fake_line, caplog) as bot:
            event = text_event(text)
            assert (await bot.post(webhook(event))).status == 200
            await wait_for(lambda: replies_to(fake_line, event["replyToken"]), what="the reply")

    await answered_in_a_run_of_its_own("久しぶり")
    assert speakers(tmp_path, f"line:{USER}") == ["健太", PERSONA]
    await answered_in_a_run_of_its_own("また来たよ")  # the second run: the same files
    assert speakers(tmp_path, f"line:{USER}") == ["健太", PERSONA, "健太", PERSONA]
    assert len(fake_line.to(PROFILE)) == 1
    assert (tmp_path / "memory.names.sqlite3").is_file()


async def test_forged_or_missing_signatures_are_refused_and_nothing_is_processed(tmp_path, tiny, fake_line, caplog):
    async with running_bot(tmp_path, tiny, fake_line, caplog) as bot:
        body = json.dumps(webhook(text_event("偽物"))).encode()
        assert (await bot.post(body, signature=None)).status == 400
        assert (await bot.post(body, signature=sign(body, "someone-elses-secret"))).status == 401
        assert (await bot.post(body, signature=sign(body + b" "))).status == 401  # tampered after signing
        assert (await bot.post(body, signature="not base64 at all ✓")).status == 401
        await asyncio.sleep(0.3)
        assert fake_line.calls == [] and remembered(tmp_path, f"line:{USER}") == []
        assert await healthy(bot)


async def test_bad_bodies_get_a_clear_answer_and_the_daemon_keeps_serving(tmp_path, tiny, fake_line, caplog):
    async with running_bot(tmp_path, tiny, fake_line, caplog) as bot:
        assert (await bot.post(b"{not json")).status == 400
        assert (await bot.post(b"\xff\xfe not utf-8")).status == 400
        assert (await bot.post([])).status == 400
        assert (await bot.post({"destination": "U1", "events": "nope"})).status == 400
        huge = b'{"events": [], "pad": "' + b"x" * MAX_BODY_BYTES + b'"}'
        assert (await bot.post(huge)).status == 413
        assert (await bot.post(huge, signature=None)).status == 413  # the size is checked before anything else

        async def chunked():  # no Content-Length: the cap holds while reading
            for start in range(0, len(huge), 256 * 1024):
                yield huge[start:start + 256 * 1024]

        async with bot.session.post(bot.url + "/callback", data=chunked(), headers={"X-Line-Signature": sign(huge)}) as r:
            assert r.status == 413 and "Content-Length" not in r.request_info.headers
        no_source = text_event("a")
        del no_source["source"]
        no_timestamp = text_event("b")
        del no_timestamp["timestamp"]
        no_text = text_event("c")
        del no_text["message"]["text"]
        weird_source = text_event("d")
        weird_source["source"] = {"type": "user"}  # no userId
        ignored = [
            {"type": "follow", "mode": "active", "timestamp": 1, "source": {"type": "user", "userId": USER},
             "webhookEventId": "01F", "deliveryContext": {"isRedelivery": False}, "replyToken": "r-follow"},
            {"type": "brand-new-kind", "webhookEventId": "01G"},
            {**text_event("e"), "message": {"type": "sticker", "id": "1", "packageId": "1", "stickerId": "2",
                                            "stickerResourceType": "STATIC", "quoteToken": "q"}},
            {**text_event("f"), "message": {"type": "brand-new-message"}},
            no_source, no_timestamp, no_text, weird_source, "not an object", None, 42,
        ]
        assert (await bot.post(webhook(*ignored))).status == 200
        sentinel = text_event("まだいる？")
        assert (await bot.post(webhook(sentinel))).status == 200
        await wait_for(lambda: replies_to(fake_line, sentinel["replyToken"]), what="the sentinel's reply")
        assert len(fake_line.to(REPLY)) == 1
        assert await healthy(bot)
    assert "Traceback" not in caplog.text and not any(r.levelno >= logging.ERROR for r in caplog.records)


async def test_a_stale_reply_token_falls_back_to_push_when_enabled(tmp_path, tiny, fake_line, caplog):
    fake_line.script[PUSH] = [Fault(500)]  # the first push fails: retried with the same retry key
    one_to_one = text_event("遅くてもいいよ")
    in_group = text_event("@美咲 遅くてもいいよ", group=GROUP, mention_self=True)
    async with running_bot(tmp_path, tiny, fake_line, caplog, reply_token_margin_s=0.0, push_fallback=True) as bot:
        assert (await bot.post(webhook(one_to_one, in_group))).status == 200
        await wait_for(lambda: {c["json"]["to"] for c in fake_line.to(PUSH)} == {USER, GROUP}
                       and len(fake_line.to(PUSH)) == 3, what="the pushes")
    assert fake_line.to(REPLY) == []
    pushes = fake_line.to(PUSH)
    keys = [c["headers"]["X-Line-Retry-Key"] for c in pushes]
    assert all(uuid.UUID(k) for k in keys) and len(set(keys)) == 2  # the retry kept its key
    assert all(1 <= len(c["json"]["messages"]) <= 5 for c in pushes)
    assert logged(caplog, r"push \(try 1/4\) for \S+ failed: HTTP 500")


async def test_a_stale_reply_token_is_dropped_with_a_log_line_when_push_is_off(tmp_path, tiny, fake_line, caplog):
    async with running_bot(tmp_path, tiny, fake_line, caplog, reply_token_margin_s=0.0) as bot:
        assert (await bot.post(webhook(text_event("遅い？")))).status == 200
        await wait_for(lambda: logged(caplog, "reply token stale .* reply dropped"), what="the drop's log line")
    assert fake_line.to(REPLY) == [] and fake_line.to(PUSH) == []


async def test_a_reply_answered_500_is_retried_and_delivered_once(tmp_path, tiny, fake_line, caplog):
    fake_line.script[REPLY] = [Fault(500, deliver=True)]  # LINE took it, but said it failed
    async with running_bot(tmp_path, tiny, fake_line, caplog, push_fallback=True) as bot:
        event = text_event("一回だけ")
        assert (await bot.post(webhook(event))).status == 200
        await wait_for(lambda: logged(caplog, "may have been delivered: not pushed"), what="the outcome's log line")
    # The retry met the spent token: one message reached the user, and no push doubled it.
    assert [c["status"] for c in fake_line.to(REPLY)] == [500, 400] and fake_line.to(PUSH) == []
    assert len(fake_line.replies_to(event["replyToken"])) == 1


async def test_a_refused_reply_token_falls_back_to_push(tmp_path, tiny, fake_line, caplog):
    fake_line.script[REPLY] = [Fault(400)]  # "Invalid reply token": nothing was sent
    async with running_bot(tmp_path, tiny, fake_line, caplog, push_fallback=True) as bot:
        assert (await bot.post(webhook(text_event("届く？")))).status == 200
        await wait_for(lambda: fake_line.to(PUSH), what="the push")
    assert len(fake_line.to(REPLY)) == 1


async def test_a_hanging_line_api_times_out_and_the_bot_goes_on(tmp_path, tiny, fake_line, caplog):
    fake_line.script[REPLY] = [Fault(500, hang_s=3)] * 4
    async with running_bot(tmp_path, tiny, fake_line, caplog, api_timeout_s=0.3) as bot:
        assert (await bot.post(webhook(text_event("待つよ")))).status == 200
        await wait_for(lambda: logged(caplog, r"reply \(try 2/4\) for .* failed: .*Timeout"), timeout=10,
                       what="the timeout, then a retry")
        assert await healthy(bot)


async def test_group_senders_without_a_user_id_are_rate_limited_per_group(tmp_path, tiny, fake_line, caplog):
    """LINE leaves userId out for a member who has not agreed to share a profile. Such senders share one bucket
    per group: two messages at once in one group hit the limit, a message in another group does not."""

    def anonymous(text: str, group: str) -> dict:
        event = text_event(text, group=group, mention_self=True)
        del event["source"]["userId"]
        return event

    first, second, elsewhere = anonymous("@美咲 一つ目", GROUP), anonymous("@美咲 二つ目", GROUP), anonymous("@美咲 こっちも", OTHER_GROUP)
    async with running_bot(tmp_path, tiny, fake_line, caplog, limits={"burst": 1, "messages_per_minute": 1.0}) as bot:
        assert (await bot.post(webhook(first, second))).status == 200
        assert (await bot.post(webhook(elsewhere))).status == 200
        await wait_for(lambda: all(replies_to(fake_line, e["replyToken"]) for e in (first, second, elsewhere)),
                       what="three answers")
    text = {e["message"]["text"]: replies_to(fake_line, e["replyToken"])[0]["json"]["messages"][0]["text"]
            for e in (first, second, elsewhere)}
    assert text["@美咲 二つ目"] == RATE_LIMIT_REPLY
    assert text["@美咲 一つ目"] != RATE_LIMIT_REPLY and text["@美咲 こっちも"] != RATE_LIMIT_REPLY
    said = remembered(tmp_path, f"line:{GROUP}")
    assert "一つ目" in said and "二つ目" in said and not any("@美咲" in t for t in said)  # its own mention left out


def test_the_bots_own_mention_is_cut_by_index_and_length_in_utf16_units():
    assert strip_self_mention("@美咲 どう？", [(0, 3)]) == "どう？"
    assert strip_self_mention("ねえ @美咲 どう？", [(3, 3)]) == "ねえ どう？"
    # An emoji before the mention is two UTF-16 units: LINE's index counts both.
    assert strip_self_mention("😀 @美咲 元気？", [(3, 3)]) == "😀 元気？"
    assert strip_self_mention("😀😀@美咲　元気？", [(4, 3)]) == "😀😀元気？"  # an ideographic space too
    assert strip_self_mention("@美咲 と @美咲", [(0, 3), (6, 3)]) == "と"  # both of them


def test_a_mention_span_that_does_not_fit_is_tried_as_code_points_then_left_alone():
    assert strip_self_mention("😀 @美咲 元気？", [(2, 3)]) == "😀 元気？"  # code points
    assert strip_self_mention("おはよう", [(1, 3)]) == "おはよう"  # no "@" there either way
    assert strip_self_mention("@美咲", [(0, 30)]) == "@美咲"  # past the end
    assert strip_self_mention("@美咲 hi", []) == "@美咲 hi"


async def test_only_the_bots_own_mention_is_cut_and_a_bare_mention_still_gets_an_answer(tmp_path, tiny, fake_line, caplog):
    both = text_event("@健太 @美咲 来る？", group=GROUP)
    both["message"]["mention"] = {"mentionees": [
        {"index": 0, "length": 3, "type": "user", "userId": OTHER_USER},
        {"index": 4, "length": 3, "type": "user", "userId": "Ubot", "isSelf": True},
        {"index": 0, "length": 3, "type": "all"}]}  # @All: no isSelf
    bare = text_event("@美咲", group=GROUP, mention_self=True)
    async with running_bot(tmp_path, tiny, fake_line, caplog) as bot:
        assert (await bot.post(webhook(both, bare))).status == 200
        await wait_for(lambda: replies_to(fake_line, both["replyToken"]) and replies_to(fake_line, bare["replyToken"]),
                       what="both answered")
    assert remembered(tmp_path, f"line:{GROUP}")[0] == "@健太 来る？"
    assert "@美咲" in remembered(tmp_path, f"line:{GROUP}")


def test_line_config_defaults():
    line = BotConfig.from_dict({}).line
    assert (line.api_host, line.push_fallback, line.call_by_name) == ("https://api.line.me", False, False)
    assert 0 < line.reply_token_margin_s < 60 and line.api_timeout_s < 300


# --- splitting replies to LINE's limits ---------------------------------------------------------


def test_utf16_units_count_emoji_as_two():
    assert utf16_units("abc") == 3 and utf16_units("あいう") == 3
    assert utf16_units("😀") == 2 and utf16_units("👨‍👩‍👧") == 8  # three people and two joiners


def test_short_replies_are_one_message():
    assert split_reply("おはよう") == ["おはよう"]
    assert split_reply("  \n") == []
    assert split_reply("a" * 5000) == ["a" * 5000]


def test_split_prefers_newline_then_sentence_end_then_space():
    assert split_reply("一行目です\n二行目です", limit=8) == ["一行目です", "二行目です"]
    assert split_reply("はい。そうです。ちがう", limit=9) == ["はい。そうです。", "ちがう"]
    assert split_reply("Yes it is! And so", limit=12) == ["Yes it is!", "And so"]
    assert split_reply("one two three four", limit=10) == ["one two", "three four"]
    assert split_reply("abcdefghij", limit=4) == ["abcd", "efgh", "ij"]


def test_split_counts_utf16_and_never_halves_an_emoji():
    assert split_reply("😀" * 2500) == ["😀" * 2500]  # exactly 5000 units
    pieces = split_reply("a" + "😀" * 2500)
    assert pieces == ["a" + "😀" * 2499, "😀"]
    assert [utf16_units(p) for p in pieces] == [4999, 2]
    assert all(not ("\ud800" <= ch <= "\udfff") for p in pieces for ch in p)


def test_split_caps_at_five_messages_and_marks_the_cut():
    pieces = split_reply("x" * 30000)
    assert len(pieces) == 5 and pieces[-1].endswith("…")
    assert all(utf16_units(p) <= 5000 for p in pieces)
    emoji = split_reply("😀" * 20000)
    assert len(emoji) == 5 and all(utf16_units(p) <= 5000 for p in emoji) and emoji[-1].endswith("…")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab あ😀\n。!.") + ["\u3000"]), max_size=200),
       st.integers(min_value=2, max_value=30), st.integers(min_value=1, max_value=6))
def test_split_always_fits_and_loses_nothing_but_whitespace_at_cuts(text, limit, max_messages):
    pieces = split_reply(text, limit=limit, max_messages=max_messages)
    assert len(pieces) <= max_messages
    assert all(p.strip() and utf16_units(p) <= limit for p in pieces)
    joined, whole = (re.sub(r"\s", "", s) for s in ("".join(pieces), text))
    if joined != whole:  # only a reply cut at the message cap loses text, and says so
        assert len(pieces) == max_messages and joined.endswith("…") and whole.startswith(joined[:-1])
