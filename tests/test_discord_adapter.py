"""The Discord platform adapter, driven by discord.py's own objects parsed from gateway payloads as Discord
sends them, talking to a fake Discord (REST and gateway) on 127.0.0.1 that records what the bot sent
(tests/support/fake_discord.py, the `fake_discord` fixture).

Messages go the bot's real way: into a real inbox (SQLite) and through the real dispatcher, which calls
the platform adapter's deliver. The router is a stub here: it records the messages it is handed and
returns a scripted reply.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import pytest

from adapters.discord import DiscordAdapter, DiscordStartError, split_message
from bot.dispatcher import Dispatcher
from bot.inbox import Inbox
from bot.metrics import BotMetrics
from finetune.config import BotConfig, ConfigError
from tests.support.fake_discord import (
    ALICE_ID,
    BOB,
    BOB_ID,
    BOT_ID,
    BOT_USER,
    CHANNEL_ID,
    DM_ID,
    GUILD_ID,
    MESSAGE_CONTENT_INTENT,
    OTHER_BOT,
    OTHER_CHANNEL_ID,
    OTHER_GUILD_ID,
    TIMESTAMP,
    TOKEN_ENV,
    bot_for,
    deliver,
    guild_payload,
    message_payload,
    parse,
)


class StubRouter:
    """Stands in for Router.answer: records what it is handed, answers addressed messages with `reply`."""

    def __init__(self, reply: str = "こんにちは"):
        self.reply = reply
        self.seen = []
        self.answered = asyncio.Event()

    async def answer(self, message, key=None, again=False):
        self.seen.append(message)
        if message.addressed:
            self.answered.set()
            return self.reply
        return None


def make_config(people: dict[str, str] | None = None, **discord_keys) -> BotConfig:
    return BotConfig.from_dict({"persona": {"name": "美咲"}, "discord": {"enabled": True, **discord_keys},
                                "people": people or {}}, source="test.toml")


@pytest.fixture
async def connect(fake_discord):
    """An adapter logged in to the fake over REST, with the test guild in its cache (as after GUILD_CREATE)."""
    adapters = []

    async def make(people: dict[str, str] | None = None, **discord_keys) -> DiscordAdapter:
        adapter = DiscordAdapter(make_config(people, **discord_keys), BotMetrics(), "美咲")
        await adapter.client.login("test-token")
        adapter.client._connection._add_guild_from_data(guild_payload())
        adapters.append(adapter)
        return adapter

    yield make
    for adapter in adapters:
        await adapter.client.close()


# --- when to answer ---------------------------------------------------------------------------


async def test_mention_is_answered_as_a_reply_with_the_mention_stripped(connect, fake_discord):
    adapter, router = await connect(), StubRouter("やっほー")
    payload = message_payload(f"<@{BOT_ID}> hello <@{BOB_ID}>, see <#{OTHER_CHANNEL_ID}>", mentions=[BOT_USER, BOB])
    await deliver(adapter, router, payload)

    (incoming,) = router.seen
    assert incoming.addressed and incoming.platform == "discord"
    assert incoming.text == "hello @bob, see #random"  # people by account name, as the exports name them
    assert (incoming.chat_id, incoming.user_id, incoming.user_name) == (str(CHANNEL_ID), str(ALICE_ID), "alice")
    assert fake_discord.requests[-2][:2] == ("POST", f"/channels/{CHANNEL_ID}/typing")
    (sent,) = fake_discord.posts("messages")
    assert sent["content"] == "やっほー"
    assert sent["message_reference"]["message_id"] == int(payload["id"])
    assert sent["allowed_mentions"]["parse"] == []


async def test_plain_guild_message_is_remembered_not_answered(connect, fake_discord):
    adapter, router = await connect(), StubRouter()
    await deliver(adapter, router, message_payload("just chatting"))

    (incoming,) = router.seen
    assert not incoming.addressed and incoming.text == "just chatting"
    assert fake_discord.posts("messages") == [] and fake_discord.posts("typing") == []


async def test_dm_is_answered(connect, fake_discord):
    adapter, router = await connect(), StubRouter()
    await deliver(adapter, router, message_payload("おはよう", channel_id=DM_ID, guild_id=None))

    (incoming,) = router.seen
    assert incoming.addressed and incoming.chat_id == str(DM_ID) and incoming.text == "おはよう"
    assert [path for method, path, _ in fake_discord.requests if method == "POST"] == [
        f"/channels/{DM_ID}/typing", f"/channels/{DM_ID}/messages"]


async def test_reply_to_the_bot_is_answered_with_the_replied_message_as_context(connect, fake_discord):
    adapter, router = await connect(), StubRouter()
    earlier = message_payload("昨日のカレー美味しかった", author=BOT_USER)  # not sent by this process: not in memory
    await deliver(adapter, router, message_payload("どこの店？", replying_to=earlier, mentions=[BOT_USER]))

    context, question = router.seen
    assert (context.text, context.user_name, context.addressed) == ("昨日のカレー美味しかった", "美咲", False)
    assert (question.text, question.addressed) == ("どこの店？", True)
    assert len(fake_discord.posts("messages")) == 1


async def test_replied_message_already_remembered_is_not_handed_over_twice(connect, fake_discord):
    adapter, router = await connect(), StubRouter()
    first = message_payload("明日ひま？", author=BOB)
    await deliver(adapter, router, first)
    await deliver(adapter, router, message_payload(f"<@{BOT_ID}> どう思う？", replying_to=first, mentions=[BOT_USER]))
    assert [(m.text, m.addressed) for m in router.seen] == [("明日ひま？", False), ("どう思う？", True)]

    # A reply to a human's message the bot never saw brings that message in first.
    unseen = message_payload("映画いこう", author=BOB)
    await deliver(adapter, router, message_payload(f"<@{BOT_ID}> 行く？", replying_to=unseen, mentions=[BOT_USER]))
    assert [(m.user_name, m.text, m.addressed) for m in router.seen[2:]] == [("bob", "映画いこう", False), ("alice", "行く？", True)]


async def test_people_are_named_by_account_name_not_by_server_nickname_or_global_name(connect, fake_discord):
    """DiscordChatExporter's exports, which the persona was trained on, name people by `name` (the username)."""
    adapter, router = await connect(), StubRouter()
    nicks = {str(ALICE_ID): "アリス姫", str(BOB_ID): "ボブ隊長"}
    earlier = message_payload("明日ひま？", author=BOB, nicks=nicks)
    question = message_payload(f"<@{BOT_ID}> <@{BOB_ID}> に聞いて", replying_to=earlier, mentions=[BOT_USER, BOB],
                               nicks=nicks)
    parsed = parse(adapter, question)
    # discord.py sees all three names: the nickname is what the server shows.
    assert (parsed.author.nick, parsed.author.global_name, parsed.author.name) == ("アリス姫", "Alice", "alice")
    assert parsed.author.display_name == "アリス姫"
    await adapter.on_message(parsed, bot_for(adapter, router).accept)
    await bot_for(adapter, router).idle()
    assert [(m.user_name, m.text) for m in router.seen] == [("bob", "明日ひま？"), ("alice", "@bob に聞いて")]


async def test_people_names_a_discord_user_and_the_bot_keeps_the_persona_name(connect, fake_discord):
    adapter = await connect(people={f"discord:{ALICE_ID}": "健太", f"discord:{BOB_ID}": "美咲",
                                    f"discord:{BOT_ID}": "ボット"})
    router = StubRouter()
    earlier = message_payload("昨日のカレー美味しかった", author=BOT_USER)
    await deliver(adapter, router, message_payload(f"<@{BOT_ID}> <@{BOB_ID}> もそう言ってた", replying_to=earlier,
                                                   mentions=[BOT_USER, BOB]))
    await deliver(adapter, router, message_payload("ほんとに？", author=BOB))
    # The bot's own message is the persona's whatever [people] says; a person named like the persona is told apart.
    assert [(m.user_name, m.text) for m in router.seen] == [
        ("美咲", "昨日のカレー美味しかった"), ("健太", "@美咲 (user) もそう言ってた"), ("美咲 (user)", "ほんとに？")]


async def test_bots_are_not_answered_and_its_own_messages_not_handed_over(connect, fake_discord):
    adapter, router = await connect(), StubRouter()
    await deliver(adapter, router, message_payload(f"<@{BOT_ID}> ping", author=OTHER_BOT, mentions=[BOT_USER]))
    await deliver(adapter, router, message_payload("my own reply", author=BOT_USER))
    assert [(m.user_name, m.addressed) for m in router.seen] == [("helper", False)]
    assert fake_discord.posts("messages") == []

    chatty = await connect(answer_bots=True)
    await deliver(chatty, router, message_payload(f"<@{BOT_ID}> ping", author=OTHER_BOT, mentions=[BOT_USER]))
    await deliver(chatty, router, message_payload(f"<@{BOT_ID}> me", author=BOT_USER, mentions=[BOT_USER]))
    assert router.seen[-1].addressed and router.seen[-1].user_name == "helper"
    assert len(fake_discord.posts("messages")) == 1


async def test_everyone_is_not_a_mention_unless_configured(connect, fake_discord):
    adapter, router = await connect(), StubRouter()
    await deliver(adapter, router, message_payload("@everyone lunch?", mention_everyone=True))
    assert not router.seen[-1].addressed and fake_discord.posts("messages") == []

    adapter = await connect(answer_everyone=True)
    await deliver(adapter, router, message_payload("@here lunch?", mention_everyone=True))
    assert router.seen[-1].addressed and len(fake_discord.posts("messages")) == 1


async def test_allowlists(connect, fake_discord):
    router = StubRouter()
    adapter = await connect(allow_channels=[str(CHANNEL_ID)], allow_users=[str(ALICE_ID)])
    await deliver(adapter, router, message_payload(f"<@{BOT_ID}> hi", channel_id=OTHER_CHANNEL_ID, mentions=[BOT_USER]))
    await deliver(adapter, router, message_payload(f"<@{BOT_ID}> hi", author=BOB, mentions=[BOT_USER]))
    assert router.seen == []  # outside the lists: not answered, not remembered
    await deliver(adapter, router, message_payload(f"<@{BOT_ID}> hi", mentions=[BOT_USER]))
    await deliver(adapter, router, message_payload("dm", channel_id=DM_ID, guild_id=None))  # a DM: allow_users decides
    assert [m.chat_id for m in router.seen] == [str(CHANNEL_ID), str(DM_ID)]

    adapter = await connect(allow_guilds=[str(OTHER_GUILD_ID)])
    await deliver(adapter, router, message_payload(f"<@{BOT_ID}> hi", mentions=[BOT_USER]))
    assert len(router.seen) == 2
    assert len(fake_discord.posts("messages")) == 2


def test_allowlist_ids_must_be_digit_strings():
    with pytest.raises(ConfigError, match=r"\[discord\] allow_users\[0\]: must be a Discord id"):
        make_config(allow_users=["alice"])
    with pytest.raises(ConfigError, match=r"\[discord\] allow_guilds\[0\]: expected a string"):
        make_config(allow_guilds=[GUILD_ID])


# --- delivery ------------------------------------------------------------------------------------


async def test_long_answer_is_split_into_messages_of_at_most_2000(connect, fake_discord):
    paragraph = "これは長い返事の一部です。" * 25  # 325 characters
    adapter, router = await connect(), StubRouter("\n\n".join([paragraph] * 13)[:4500])
    payload = message_payload(f"<@{BOT_ID}> 長く話して", mentions=[BOT_USER])
    await deliver(adapter, router, payload)

    sent = fake_discord.posts("messages")
    assert len(sent) == 3
    assert all(len(body["content"]) <= 2000 for body in sent)
    assert sent[0]["message_reference"]["message_id"] == int(payload["id"])
    assert "message_reference" not in sent[1] and "message_reference" not in sent[2]
    assert all(body["content"].endswith("。") for body in sent[:2])  # cut between sentences


async def test_mentions_in_the_answer_never_ping(connect, fake_discord):
    adapter, router = await connect(), StubRouter(f"@everyone @here <@{BOB_ID}> 集合！")
    await deliver(adapter, router, message_payload(f"<@{BOT_ID}> みんな呼んで", mentions=[BOT_USER]))
    (sent,) = fake_discord.posts("messages")
    assert sent["content"].startswith("@everyone")
    # parse: [] pings nobody; without replied_user: true the author of the question is not pinged either.
    assert sent["allowed_mentions"] == {"parse": []}


async def test_role_everyone_and_user_mentions_never_ping_in_any_part(connect, fake_discord):
    role_id = GUILD_ID + 7
    guild = guild_payload()
    guild["roles"].append({"id": str(role_id), "name": "mods", "permissions": "0", "position": 1, "color": 0,
                           "hoist": False, "managed": False, "mentionable": True, "flags": 0})
    adapter = await connect()
    adapter.client._connection._add_guild_from_data(guild)
    ping = f"<@&{role_id}> @everyone @here <@{ALICE_ID}> <@!{BOB_ID}> "
    router = StubRouter(ping + "見て。" * 1400)  # three messages: every one must be mute
    question = message_payload(f"<@{BOT_ID}> <@&{role_id}> 呼んで", mentions=[BOT_USER])
    question["mention_roles"] = [str(role_id)]
    await deliver(adapter, router, question)
    sent = fake_discord.posts("messages")
    assert len(sent) == 3 and f"<@&{role_id}>" in sent[0]["content"]
    assert all(body["allowed_mentions"] == {"parse": []} for body in sent)  # no roles, users, everyone, replied_user
    # The client's own default too, for any send that does not pass allowed_mentions.
    assert adapter.client.allowed_mentions.to_dict() == {"parse": []}


async def test_failed_send_is_logged_and_the_next_message_answered(connect, fake_discord, caplog):
    adapter, router = await connect(), StubRouter()
    fake_discord.fail_messages = 403
    with caplog.at_level(logging.ERROR, logger="bunshin.discord"):
        await deliver(adapter, router, message_payload(f"<@{BOT_ID}> one", mentions=[BOT_USER]))
    assert f"could not send a reply in channel {CHANNEL_ID}" in caplog.text and "Missing Permissions" in caplog.text

    fake_discord.fail_messages = None
    await deliver(adapter, router, message_payload(f"<@{BOT_ID}> two", mentions=[BOT_USER]))
    assert [body["content"] for body in fake_discord.posts("messages")] == ["こんにちは", "こんにちは"]
    assert [path for method, path, _ in fake_discord.requests if method == "POST"] == [
        f"/channels/{CHANNEL_ID}/typing", f"/channels/{CHANNEL_ID}/messages"] * 2


async def test_a_server_error_on_send_is_logged_and_the_bot_goes_on(connect, fake_discord, caplog):
    adapter, router = await connect(), StubRouter()
    fake_discord.message_outcomes = [503]  # discord.py raises DiscordServerError at once for a 503
    with caplog.at_level(logging.ERROR, logger="bunshin.discord"):
        await deliver(adapter, router, message_payload(f"<@{BOT_ID}> one", mentions=[BOT_USER]))
    assert "could not send a reply in channel" in caplog.text and "DiscordServerError" in caplog.text
    assert "Service Unavailable" in caplog.text
    await deliver(adapter, router, message_payload(f"<@{BOT_ID}> two", mentions=[BOT_USER]))
    assert len(fake_discord.posts("messages")) == 2  # one refused, one sent: nothing sent twice


async def test_a_send_whose_answer_is_lost_is_not_sent_again(connect, fake_discord, caplog):
    adapter, router = await connect(), StubRouter("届いた？")
    fake_discord.message_outcomes = ["drop"]  # Discord got it (it went out), the connection died before the answer
    with caplog.at_level(logging.ERROR, logger="bunshin.discord"):
        await deliver(adapter, router, message_payload(f"<@{BOT_ID}> one", mentions=[BOT_USER]))
    assert "could not send a reply in channel" in caplog.text
    assert [body["content"] for body in fake_discord.posts("messages")] == ["届いた？"]  # exactly once
    await deliver(adapter, router, message_payload(f"<@{BOT_ID}> two", mentions=[BOT_USER]))
    assert [body["content"] for body in fake_discord.posts("messages")] == ["届いた？", "届いた？"]


async def test_a_failed_part_of_a_long_reply_stops_it_without_resending_the_parts_sent(connect, fake_discord, caplog):
    adapter, router = await connect(), StubRouter("\n\n".join(["これは長い返事の一部です。" * 25] * 13)[:4500])
    fake_discord.message_outcomes = [None, 403]
    with caplog.at_level(logging.ERROR, logger="bunshin.discord"):
        await deliver(adapter, router, message_payload(f"<@{BOT_ID}> 長く話して", mentions=[BOT_USER]))
    assert "could not send part 2 of 3 of a reply" in caplog.text and "Forbidden" in caplog.text
    posted = fake_discord.posts("messages")
    # Part 1 (the answer to the question) once, part 2 refused, part 3 never tried.
    assert len(posted) == 2 and "message_reference" in posted[0] and "message_reference" not in posted[1]
    await deliver(adapter, router, message_payload(f"<@{BOT_ID}> short", mentions=[BOT_USER]))
    assert len(fake_discord.posts("messages")) == 5  # the next reply, all three parts


# --- starting ------------------------------------------------------------------------------------


def test_missing_token_is_a_clear_config_error(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    config = make_config()
    with pytest.raises(ConfigError) as exc:
        config.check_ready()
    assert str(exc.value) == f"test.toml: [discord] token_env: environment variable {TOKEN_ENV} is not set"
    with pytest.raises(ConfigError, match=TOKEN_ENV):
        DiscordAdapter(config, BotMetrics(), "美咲")


async def test_message_content_intent_refused_is_a_clear_error(fake_discord, caplog):
    adapter = DiscordAdapter(make_config(), BotMetrics(), "美咲")
    with caplog.at_level(logging.ERROR, logger="bunshin.discord"), pytest.raises(DiscordStartError) as exc:
        await asyncio.wait_for(adapter.run(bot_for(adapter, StubRouter()).accept, asyncio.Event()), timeout=20)
    assert fake_discord.identify["intents"] & MESSAGE_CONTENT_INTENT  # the intent was asked for
    assert fake_discord.identify["token"] == "test-token"
    for text in (str(exc.value), caplog.text):
        assert "4014" in text and "MESSAGE CONTENT INTENT" in text and "discord.com/developers" in text
    assert adapter.client.is_closed()


async def test_run_answers_gateway_messages_and_returns_when_stopping(fake_discord):
    fake_discord.gateway_mode = "serve"
    fake_discord.events = [message_payload("元気？", channel_id=DM_ID, guild_id=None)]
    adapter, router, stopping = DiscordAdapter(make_config(), BotMetrics(), "美咲"), StubRouter("元気だよ"), asyncio.Event()
    task = asyncio.create_task(adapter.run(bot_for(adapter, router).accept, stopping))
    await asyncio.wait_for(router.answered.wait(), timeout=20)
    for _ in range(100):  # the reply is sent just after the router answers
        if fake_discord.posts("messages"):
            break
        await asyncio.sleep(0.05)
    stopping.set()
    await asyncio.wait_for(task, timeout=10)
    await adapter.close()
    assert [body["content"] for body in fake_discord.posts("messages")] == ["元気だよ"]
    assert router.seen[0].chat_id == str(DM_ID) and adapter.client.is_closed()


async def test_over_the_gateway_a_refused_send_leaves_the_bot_running_for_the_next_message(fake_discord, caplog):
    fake_discord.gateway_mode = "serve"
    fake_discord.events = [message_payload("一つ目", channel_id=DM_ID, guild_id=None),
                           message_payload("二つ目", channel_id=DM_ID, guild_id=None)]
    fake_discord.message_outcomes = [403]
    adapter, router, stopping = DiscordAdapter(make_config(), BotMetrics(), "美咲"), StubRouter("はい"), asyncio.Event()
    task = asyncio.create_task(adapter.run(bot_for(adapter, router).accept, stopping))
    with caplog.at_level(logging.ERROR, logger="bunshin.discord"):
        await fake_discord.wait_for_message_posts(2)
    assert not task.done()  # still connected and serving
    stopping.set()
    await asyncio.wait_for(task, timeout=10)
    await adapter.close()
    assert [m.text for m in router.seen] == ["一つ目", "二つ目"]
    assert len(fake_discord.posts("messages")) == 2  # the refused one was not retried
    assert f"could not send a reply in channel {DM_ID}" in caplog.text and "Forbidden" in caplog.text


# --- splitting -----------------------------------------------------------------------------------


def test_split_keeps_a_code_block_whole_when_it_fits():
    code = "```python\n" + "\n".join(f"print({i})" for i in range(100)) + "\n```"  # about 1,100 characters
    text = "x " * 700 + "\n" + code + "\nおわり"
    pieces = split_message(text)
    assert all(len(p) <= 2000 for p in pieces)
    assert any(code in p for p in pieces)


def test_split_closes_and_reopens_a_code_block_too_long_for_one_message():
    code = "```python\n" + "\n".join(f"value_{i} = {i} * 2" for i in range(300)) + "\n```"
    pieces = split_message("ほら\n" + code)
    assert len(pieces) > 1 and all(len(p) <= 2000 for p in pieces)
    assert all(p.count("```") % 2 == 0 for p in pieces)  # every piece renders as closed code
    assert all(p.startswith("```python\n") for p in pieces[1:])
    assert "".join(pieces).count("value_299 = 299 * 2") == 1


def test_split_short_and_unbroken_text():
    assert split_message("short") == ["short"]
    assert [len(p) for p in split_message("あ" * 4500)] == [2000, 2000, 500]


# --- after a restart -----------------------------------------------------------------------------


async def test_messages_accepted_before_a_restart_are_answered_as_replies_to_them_once(fake_discord, tmp_path, caplog):
    """An earlier run accepted three DMs and died: one not answered yet, one too old to answer now, one whose
    reply it was sending (Discord had taken it). The restart answers the first as a reply to its message id,
    only remembers the second, and sends the third again with the same nonce: Discord returns the message it
    already made instead of a second copy."""
    from dataclasses import replace

    from bot.messages import IncomingMessage

    def dm(message_id: int, text: str) -> IncomingMessage:
        return IncomingMessage("discord", str(DM_ID), str(ALICE_ID), "Alice", text, True, event_id=str(message_id),
                               delivery={"channel_id": str(DM_ID), "message_id": str(message_id), "guild_id": None})

    fresh, stale, half_sent = dm(1500000000000009001, "まだいる？"), dm(1500000000000009002, "昨日の話"), dm(
        1500000000000009003, "返事まだ？")
    stale = replace(stale, received_at=time.time() - 3600)
    path = tmp_path / "inbox.sqlite3"
    earlier = Inbox(path)
    entries = await earlier.accept([fresh, stale, half_sent])
    await earlier.attempt(entries[2], "send", "前の返事")
    earlier.close()
    made_before = {"id": "1500000000000009999", "channel_id": str(DM_ID), "author": BOT_USER, "content": "前の返事",
                   "timestamp": TIMESTAMP, "edited_timestamp": None, "tts": False, "mention_everyone": False,
                   "mentions": [], "mention_roles": [], "attachments": [], "embeds": [], "components": [],
                   "pinned": False, "type": 19, "flags": 0}
    fake_discord.by_nonce[f"{half_sent.event_id}.0"] = made_before  # the earlier run's send reached Discord

    fake_discord.gateway_mode = "serve"
    adapter, router, stopping = DiscordAdapter(make_config(), BotMetrics(), "美咲"), StubRouter("おかえり"), asyncio.Event()
    inbox = Inbox(path)
    dispatcher = Dispatcher(inbox, {"discord": adapter}, BotMetrics())
    dispatcher.recover(inbox.recovered)
    task = asyncio.create_task(adapter.run(dispatcher.accept, stopping))
    with caplog.at_level(logging.INFO):
        dispatcher.start(router)
        await asyncio.wait_for(dispatcher.idle(), 30)
    stopping.set()
    await task
    await adapter.close()
    assert await inbox.counts() == {"replied": 2, "dropped": 1}
    inbox.close()

    posts = fake_discord.posts("messages")
    assert [(p["content"], p["message_reference"]["message_id"], p["nonce"]) for p in posts] == [
        ("おかえり", int(fresh.event_id), f"{fresh.event_id}.0"),
        ("前の返事", int(half_sent.event_id), f"{half_sent.event_id}.0")]  # the stored reply, not a new one
    assert [(m.text, m.addressed) for m in router.seen] == [("まだいる？", True), ("昨日の話", False)]
    assert re.search(r"message 1500000000000009002 in channel \d+ not answered: 36\d\ds old", caplog.text)
