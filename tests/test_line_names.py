"""LINE senders are named as LINE's exports name them, by their display name, asked of LINE's profile API while
the message is answered, never while the webhook waits; `[people]` names someone without asking.

Real parts: the LINE platform adapter's webhook served on loopback and sent signed webhooks, a real inbox and
dispatcher, the name cache in SQLite next to the memory file, and the fake LINE API (tests/support/fake_line_api.py, a
real aiohttp server) answering the three profile endpoints, or failing as scripted. The router is a stub that
keeps what it is handed: the name in each message is the name the persona would see and memory would keep.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

import aiohttp
import discord
import pytest
from aiohttp import web
from conftest import ScriptedRouter, answered_by

import adapters.line as line_module
from adapters.discord import DiscordAdapter
from adapters.line import LineAdapter
from bot.daemon import run_daemon
from bot.metrics import BotMetrics
from bot.names import NameCache, NameCacheError
from finetune.config import BotConfig
from tests.support.fake_discord import ALICE, ALICE_ID, BOT_USER, guild_payload, message_payload, parse
from tests.support.fake_line_api import (
    GROUP_MEMBER,
    PROFILE,
    ROOM_MEMBER,
    Fault,
    serving_fake_line,
    sign,
    text_event,
    webhook_bytes,
)

PERSONA = "美咲"
SECRET, TOKEN = "names-channel-secret-1e1e", "names-access-token-2f2f"
SECRET_ENV, TOKEN_ENV = "BUNSHIN_TEST_LINE_SECRET", "BUNSHIN_TEST_LINE_TOKEN"
USER = "U4af4980629" + "0" * 22
OTHER_USER = "U1234567890" + "a" * 22
THIRD_USER = "U0fedcba987" + "b" * 22
GROUP = "C4af4980629" + "1" * 22
ROOM = "R4af4980629" + "2" * 22


@pytest.fixture(autouse=True)
def setup(monkeypatch, caplog):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    caplog.set_level(logging.INFO)


@pytest.fixture
async def fake():
    async with serving_fake_line(TOKEN) as fake:
        yield fake


def make_config(tmp_path, fake, people: dict | None = None, **line) -> BotConfig:
    return BotConfig.from_dict({
        "persona": {"name": PERSONA}, "memory": {"path": str(tmp_path / "memory.sqlite3")}, "people": people or {},
        "line": {"enabled": True, "channel_secret_env": SECRET_ENV, "access_token_env": TOKEN_ENV,
                 "api_host": fake.url, **line},
    }, source="test")


class Line:
    """Sends signed webhooks to the served adapter; `say` returns once what it sent has been answered."""

    def __init__(self, url: str, session: aiohttp.ClientSession, dispatcher, router: ScriptedRouter):
        self.url, self.session, self.dispatcher, self.router = url, session, dispatcher, router

    async def post(self, *events: dict) -> int:
        raw = webhook_bytes(*events)
        async with self.session.post(self.url, data=raw, headers={"X-Line-Signature": sign(raw, SECRET)}) as r:
            return r.status

    async def say(self, *events: dict) -> list[str]:
        """The names the router was handed for `events`."""
        seen = len(self.router.seen)
        assert await self.post(*events) == 200
        await asyncio.wait_for(self.dispatcher.idle(), 15)
        return [m.user_name for m in self.router.seen[seen:]]


@asynccontextmanager
async def serving(config: BotConfig, router: ScriptedRouter | None = None):
    """The LINE platform adapter as the daemon runs it: webhook on loopback, answered through inbox and dispatcher."""
    router = router or ScriptedRouter(lambda message: None)
    adapter = LineAdapter(config, BotMetrics(), PERSONA)
    app = web.Application()
    app.router.add_routes(adapter.web_routes())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stopping = asyncio.Event()
    try:
        async with answered_by(adapter, router) as dispatcher:
            running = asyncio.create_task(adapter.run(dispatcher.accept, stopping))
            try:
                async with aiohttp.ClientSession() as session:
                    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/callback"
                    yield Line(url, session, dispatcher, router)
            finally:
                stopping.set()
                await running
    finally:
        await adapter.close()
        await runner.cleanup()


def placeholder(user_id: str) -> str:
    return f"LINE user {user_id[-4:]}"


# --- the display name, in each kind of chat ---------------------------------------------------------


async def test_senders_are_named_by_their_line_profile_in_a_one_to_one_chat_a_group_and_a_room(tmp_path, fake):
    fake.profiles = {USER: "健太", OTHER_USER: "さくら", THIRD_USER: "ゆい\n ちゃん "}
    async with serving(make_config(tmp_path, fake)) as line:
        assert await line.say(text_event("おはよう", user=USER)) == ["健太"]
        assert await line.say(text_event("やっほー", user=OTHER_USER, group=GROUP)) == ["さくら"]
        assert await line.say(text_event("こんばんは", user=THIRD_USER, room=ROOM)) == ["ゆい ちゃん"]  # one line
        # Known now: the same person elsewhere is not asked about again.
        assert await line.say(text_event("グループでも", user=USER, group=GROUP)) == ["健太"]
    # Each asked where they wrote: a group's or room's member profile needs no friendship with the bot.
    assert [(c["route"], c["path"]) for c in fake.lookups()] == [
        (PROFILE, f"/v2/bot/profile/{USER}"),
        (GROUP_MEMBER, f"/v2/bot/group/{GROUP}/member/{OTHER_USER}"),
        (ROOM_MEMBER, f"/v2/bot/room/{ROOM}/member/{THIRD_USER}")]
    assert all(c["headers"]["Authorization"] == f"Bearer {TOKEN}" and c["status"] == 200 for c in fake.lookups())


async def test_the_webhook_does_not_wait_for_the_lookup_and_the_answer_waits_for_it(tmp_path, fake):
    fake.profiles = {USER: "健太"}
    fake.script[PROFILE] = [Fault(200, hang_s=1.0)]  # a slow LINE: answered within the API timeout, late
    async with serving(make_config(tmp_path, fake, api_timeout_s=5.0)) as line:
        started = time.monotonic()
        assert await line.post(text_event("もしもし", user=USER)) == 200
        assert time.monotonic() - started < 0.5  # LINE waits 2 s for the webhook's answer, not for a name
        await asyncio.wait_for(line.dispatcher.idle(), 15)
    assert [m.user_name for m in line.router.seen] == ["健太"]
    assert len(fake.lookups()) == 1


async def test_a_sender_without_a_user_id_keeps_the_placeholder_and_is_not_looked_up(tmp_path, fake):
    event = text_event("だれでしょう", user=USER, group=GROUP)
    del event["source"]["userId"]  # a member who has not agreed to share their profile
    async with serving(make_config(tmp_path, fake)) as line:
        assert await line.say(event) == ["LINE user"]
    assert fake.lookups() == []


async def test_a_person_named_like_the_persona_is_told_apart_from_it(tmp_path, fake):
    fake.profiles = {USER: PERSONA}  # the persona's real self, trying the clone
    async with serving(make_config(tmp_path, fake)) as line:
        assert await line.say(text_event("わたしだよ", user=USER)) == [f"{PERSONA} (user)"]


# --- failures, retries, refreshes --------------------------------------------------------------------


@pytest.mark.parametrize("fault", [Fault(500), Fault(429, retry_after="1"), Fault(200, hang_s=1.0), "not found"],
                         ids=["500", "429", "timeout", "404"])
async def test_a_failed_lookup_falls_back_and_is_asked_again_only_after_the_retry_interval(tmp_path, fake, caplog,
                                                                                            monkeypatch, fault):
    monkeypatch.setattr(line_module, "NAME_RETRY_S", 1.5)
    if fault != "not found":  # else: not in fake.profiles, as when the user has blocked the bot
        fake.profiles = {USER: "健太"}
        fake.script[PROFILE] = [fault]
    async with serving(make_config(tmp_path, fake, api_timeout_s=0.3)) as line:
        assert await line.say(text_event("一つ目", user=USER)) == [placeholder(USER)]
        failed_at = time.monotonic()
        assert await line.say(text_event("二つ目", user=USER)) == [placeholder(USER)]
        assert len(fake.lookups()) == 1  # not asked again on every message
        assert time.monotonic() - failed_at < 1.5, "too slow to tell a retry from none"
        fake.profiles = {USER: "健太"}
        await asyncio.sleep(1.6 - (time.monotonic() - failed_at))
        assert await line.say(text_event("三つ目", user=USER)) == ["健太"]
    assert len(fake.lookups()) == 2
    assert f"LINE profile lookup for {USER} failed" in caplog.text
    assert "健太" not in caplog.text  # names are private: logs name people by id


async def test_a_failed_refresh_keeps_the_name_found_before_and_a_new_name_is_taken_up(tmp_path, fake, monkeypatch):
    monkeypatch.setattr(line_module, "NAME_REFRESH_S", 0.0)  # every message asks again
    monkeypatch.setattr(line_module, "NAME_RETRY_S", 0.0)
    fake.profiles = {USER: "健太"}
    async with serving(make_config(tmp_path, fake)) as line:
        assert await line.say(text_event("一つ目", user=USER)) == ["健太"]
        fake.script[PROFILE] = [Fault(503)]
        assert await line.say(text_event("二つ目", user=USER)) == ["健太"]  # not the placeholder
        fake.profiles = {USER: "けんた🍣"}  # renamed themselves
        assert await line.say(text_event("三つ目", user=USER)) == ["けんた🍣"]
    assert [c["status"] for c in fake.lookups()] == [200, 503, 200]


async def test_names_survive_a_restart(tmp_path, fake):
    fake.profiles = {USER: "健太", OTHER_USER: "さくら"}
    config = make_config(tmp_path, fake)
    async with serving(config) as line:
        assert await line.say(text_event("またね", user=USER), text_event("ばいばい", user=OTHER_USER, group=GROUP)) == [
            "健太", "さくら"]
    assert len(fake.lookups()) == 2
    assert (tmp_path / "memory.names.sqlite3").is_file()
    async with serving(config) as line:  # a second run on the same files
        assert await line.say(text_event("ただいま", user=USER), text_event("おかえり", user=OTHER_USER, group=GROUP)) == [
            "健太", "さくら"]
    assert len(fake.lookups()) == 2  # no profile call: the names came from the file


def test_the_name_cache_lives_next_to_the_memory_file_and_refuses_a_file_not_its_own(tmp_path):
    assert NameCache.path_for("data/bunshin-memory.sqlite3") == "data/bunshin-memory.names.sqlite3"
    assert NameCache.path_for(":memory:") == ":memory:"
    (tmp_path / "other.sqlite3").write_bytes(b"not a database at all, just bytes " * 100)
    with pytest.raises(NameCacheError, match=r"other\.sqlite3: cannot open the name cache: .* \(delete it"):
        NameCache(tmp_path / "other.sqlite3")


async def test_a_name_cache_that_cannot_be_opened_stops_the_daemon_before_the_model_loads(tmp_path, fake):
    (tmp_path / "memory.names.sqlite3").write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(SystemExit) as stopped:
        await run_daemon(make_config(tmp_path, fake), stop=asyncio.Event())
    assert str(stopped.value).startswith(f"error: {tmp_path / 'memory.names.sqlite3'}: cannot open the name cache: ")


# --- [people] ----------------------------------------------------------------------------------------


async def test_people_names_a_line_id_and_a_discord_id_alike_and_the_line_id_is_not_looked_up(tmp_path, fake,
                                                                                               monkeypatch):
    monkeypatch.setenv("DISCORD_BOT_TOKEN", "test-token")
    fake.profiles = {USER: "けんちゃん", OTHER_USER: "さくら"}
    config = make_config(tmp_path, fake, people={f"line:{USER}": "健太", f"discord:{ALICE_ID}": "健太"})
    router = ScriptedRouter(lambda message: None)
    async with serving(config, router) as line:
        assert await line.say(text_event("LINEから", user=USER, group=GROUP)) == ["健太"]
        assert await line.say(text_event("こっちも", user=USER)) == ["健太"]
        assert fake.lookups() == []  # mapped: LINE's profile is never asked
        assert await line.say(text_event("わたしは？", user=OTHER_USER, group=GROUP)) == ["さくら"]  # others still are
        assert [c["path"] for c in fake.lookups()] == [f"/v2/bot/group/{GROUP}/member/{OTHER_USER}"]

    # The same friend on Discord: discord.py's own objects, from a gateway payload, through the same kind of path.
    # An unaddressed message: handed to the router, nothing sent, so no Discord server is needed.
    on_discord = DiscordAdapter(config, BotMetrics(), PERSONA)
    state = on_discord.client._connection
    state.user = discord.ClientUser(state=state, data=BOT_USER)  # as READY sets it
    state._add_guild_from_data(guild_payload())  # as GUILD_CREATE adds it
    try:
        async with answered_by(on_discord, router) as dispatcher:
            message = parse(on_discord, message_payload("Discordから", author=ALICE))
            await on_discord.on_message(message, dispatcher.accept)
            await asyncio.wait_for(dispatcher.idle(), 15)
    finally:
        await on_discord.client.close()
    assert [(m.platform, m.user_name) for m in router.seen if m.text.endswith("から")] == [("line", "健太"),
                                                                                        ("discord", "健太")]
