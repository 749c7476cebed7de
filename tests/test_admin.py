"""Admin commands: only the users in [limits] admins may wipe a chat's memory.

Real parts: the config parsed as from TOML, the real Router on a real SQLite file, and the Discord adapter
driven by discord.py objects built from gateway payloads, talking to the loopback fake Discord.
"""

from __future__ import annotations

import logging

import pytest

from adapters.discord import DiscordAdapter
from bot.memory import ConversationMemory
from bot.messages import IncomingMessage
from bot.metrics import BotMetrics
from bot.router import NOT_ADMIN_REPLY, RESET_REPLY, Router
from finetune.config import BotConfig, ConfigError
from tests.support.fake_discord import (
    ALICE_ID,
    BOB,
    BOT_ID,
    BOT_USER,
    CHANNEL_ID,
    deliver,
    guild_payload,
    message_payload,
)


class NoWorker:
    """Reset commands never reach the model: any call here is a bug."""

    async def submit(self, *args, **kwargs):
        raise AssertionError("a reset command must not be sent to the model")


def make_router(tmp_path, admins=()):
    config = BotConfig.from_dict({"persona": {"name": "美咲"}, "memory": {"path": str(tmp_path / "m.sqlite3")},
                                  "limits": {"admins": list(admins)}}, source="test.toml")
    memory = ConversationMemory(config.memory.path)
    return Router(config, memory, NoWorker(), BotMetrics(), "美咲"), memory


def said(text: str, user: str, *, platform: str = "discord", chat: str = "c1") -> IncomingMessage:
    return IncomingMessage(platform, chat, user, f"name-{user}", text, addressed=True)


def heard(text: str, user: str, chat: str = "c1") -> IncomingMessage:
    return IncomingMessage("discord", chat, user, f"name-{user}", text, addressed=False)


def test_admins_must_be_platform_keys():
    with pytest.raises(ConfigError, match=r"test.toml: \[limits\] admins\[0\]: must be \"platform:id\""):
        BotConfig.from_dict({"limits": {"admins": ["1234"]}}, source="test.toml")
    config = BotConfig.from_dict({"limits": {"admins": ["discord:1234", "line:Uabc"]}})
    assert config.is_admin("discord:1234") and config.is_admin("line:Uabc") and config.is_admin("console:local")
    assert not config.is_admin("discord:999") and not config.is_admin("line:1234")
    assert BotConfig.default().limits.admins == []  # the safe default: nobody on a platform


async def test_non_admin_reset_is_refused_with_a_clear_reply_and_forgets_nothing(tmp_path, caplog):
    router, memory = make_router(tmp_path, admins=["discord:boss"])
    await router.answer(heard("今日の集合は7時", "u1"))
    with caplog.at_level(logging.WARNING, logger="bunshin.router"):
        assert await router.answer(said("/reset", "u2")) == NOT_ADMIN_REPLY
        assert await router.answer(said("リセット", "u2")) == NOT_ADMIN_REPLY
    assert "reset refused for discord:u2 in discord:c1" in caplog.text
    # Nothing forgotten, and the refused command itself is not remembered as conversation.
    assert [r.text for r in memory.recent("discord:c1", 10)] == ["今日の集合は7時"]
    # The same id on another platform is someone else.
    assert await router.answer(said("/reset", "boss", platform="line")) == NOT_ADMIN_REPLY
    memory.close()


async def test_admin_reset_clears_that_chat_only(tmp_path):
    router, memory = make_router(tmp_path, admins=["discord:boss"])
    await router.answer(heard("one", "u1"))
    await router.answer(heard("other chat", "u1", chat="c2"))
    assert await router.answer(said(" /reset ", "boss")) == RESET_REPLY
    assert memory.recent("discord:c1", 10) == []
    assert [r.text for r in memory.recent("discord:c2", 10)] == ["other chat"]
    memory.close()
    with ConversationMemory(tmp_path / "m.sqlite3") as reopened:  # deleted on disk, not hidden in a cache
        assert reopened.recent("discord:c1", 10) == []


async def test_with_no_admins_only_the_console_may_reset(tmp_path):
    router, memory = make_router(tmp_path)
    await router.answer(IncomingMessage("console", "local", "local", "健太", "覚えてて", addressed=False))
    await router.answer(heard("group talk", "u1"))
    assert await router.answer(said("/reset", "u1")) == NOT_ADMIN_REPLY
    assert await router.answer(said("/reset", "local", platform="console", chat="local")) == RESET_REPLY
    assert memory.recent("console:local", 10) == [] and len(memory.recent("discord:c1", 10)) == 1
    memory.close()


async def test_discord_non_admin_reset_is_answered_with_the_refusal_and_an_admins_works(tmp_path, fake_discord):
    config = BotConfig.from_dict({"persona": {"name": "美咲"}, "memory": {"path": str(tmp_path / "m.sqlite3")},
                                  "limits": {"admins": [f"discord:{ALICE_ID}"]}, "discord": {"enabled": True}})
    memory = ConversationMemory(config.memory.path)
    router = Router(config, memory, NoWorker(), BotMetrics(), "美咲")
    adapter = DiscordAdapter(config, BotMetrics(), "美咲")
    await adapter.client.login("test-token")
    adapter.client._connection._add_guild_from_data(guild_payload())
    chat = f"discord:{CHANNEL_ID}"

    await deliver(adapter, router, message_payload("明日は雨らしい", author=BOB))
    await deliver(adapter, router, message_payload(f"<@{BOT_ID}> /reset", author=BOB, mentions=[BOT_USER]))
    assert [body["content"] for body in fake_discord.posts("messages")] == [NOT_ADMIN_REPLY]
    assert [r.text for r in memory.recent(chat, 10)] == ["明日は雨らしい"]

    await deliver(adapter, router, message_payload(f"<@{BOT_ID}> /reset", mentions=[BOT_USER]))  # from Alice
    assert [body["content"] for body in fake_discord.posts("messages")] == [NOT_ADMIN_REPLY, RESET_REPLY]
    assert memory.recent(chat, 10) == []
    await adapter.client.close()
    memory.close()
