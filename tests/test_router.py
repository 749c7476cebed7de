"""The router on real parts (SQLite memory, the worker on a tiny model): what users are told."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from bot.memory import ConversationMemory
from bot.messages import IncomingMessage
from bot.metrics import BotMetrics
from bot.router import BUSY_REPLY, ERROR_REPLY, RATE_LIMIT_REPLY, RESET_REPLY, RateLimiter, Router
from bot.worker import Worker
from finetune.config import BotConfig
from finetune.model_backend import ModelBackend
from finetune.model_loading import load_base_model
from finetune.tiny_model import build_tiny_model

PERSONA = "美咲"


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    loaded = load_base_model(str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")), device="cpu")
    return ModelBackend.from_loaded(loaded, persona=PERSONA, generation_overrides={"max_new_tokens": 6})


def make_router(tmp_path, backend, **sections):
    data = {"persona": {"name": PERSONA}, "memory": {"path": str(tmp_path / "m.sqlite3")}, **sections}
    config = BotConfig.from_dict(data, source="test")
    metrics = BotMetrics()
    worker = Worker(backend, metrics, max_queue=config.queue.max_size, max_batch=config.queue.max_batch)
    memory = ConversationMemory(config.memory.path)
    return Router(config, memory, worker, metrics, PERSONA), worker, memory, metrics


def msg(text: str, *, user: str = "u1", chat: str = "c1", addressed: bool = True) -> IncomingMessage:
    return IncomingMessage("discord", chat, user, f"name-{user}", text, addressed)


class Gate:
    """The real backend, held in flight until released, or failing on a trigger word."""

    def __init__(self, inner):
        self.inner = inner
        self.release = threading.Event()
        self.started = threading.Event()

    def generate(self, conversations):
        self.started.set()
        assert self.release.wait(10)
        if any("FAIL" in t.text for c in conversations for t in c):
            raise RuntimeError("injected")
        return self.inner.generate(conversations)


async def test_a_full_queue_answers_busy_at_once_and_queued_messages_still_get_replies(tmp_path, backend, caplog):
    gate = Gate(backend)
    router, worker, memory, metrics = make_router(tmp_path, gate, queue={"max_size": 1, "max_batch": 1})
    await worker.start()
    first = asyncio.create_task(router.answer(msg("一つ目", user="a", chat="a")))
    await asyncio.to_thread(gate.started.wait, 5)  # the first is in flight
    second = asyncio.create_task(router.answer(msg("二つ目", user="b", chat="b")))  # waits in the queue
    await asyncio.sleep(0.05)
    with caplog.at_level(logging.WARNING, logger="bunshin.router"):
        for i in range(5):  # no room: answered at once
            assert await router.answer(msg(f"{i}つ目", user=f"c{i}", chat=f"c{i}")) == BUSY_REPLY
    gate.release.set()
    assert await first not in (BUSY_REPLY, ERROR_REPLY, None)
    assert await second not in (BUSY_REPLY, ERROR_REPLY, None)
    assert metrics.registry.get_sample_value("bunshin_messages_total", {"outcome": "busy"}) == 5
    # Overload is told once per BUSY_LOG_EVERY_S, not once per message (the metric counts each).
    busy_lines = [r.getMessage() for r in caplog.records if "queue full" in r.getMessage()]
    assert busy_lines == ["queue full: answered busy to 1 message(s) since the last such line (the latest in discord:c0)"]
    await worker.stop(5)
    memory.close()


async def test_a_failed_generation_apologises_and_the_next_message_is_answered(tmp_path, backend):
    gate = Gate(backend)
    gate.release.set()
    router, worker, memory, _ = make_router(tmp_path, gate)
    await worker.start()
    assert await router.answer(msg("FAIL please")) == ERROR_REPLY
    reply = await router.answer(msg("ふつうのメッセージ", chat="c2"))
    assert reply not in (ERROR_REPLY, BUSY_REPLY, None)
    await worker.stop(5)
    memory.close()


async def test_memory_limits_reset_and_allowlists(tmp_path, backend):
    router, worker, memory, _ = make_router(
        tmp_path, backend, limits={"burst": 2, "messages_per_minute": 1, "allow_chats": ["discord:c1", "discord:c9"],
                                   "admins": ["discord:u3"]}
    )
    await worker.start()
    # Not addressed: remembered as context, no reply.
    assert await router.answer(msg("みんな聞いて", addressed=False, user="x")) is None
    reply = await router.answer(msg("どう思う？"))
    assert [r.speaker for r in memory.recent("discord:c1", 10)] == ["name-x", "name-u1", PERSONA]
    assert memory.recent("discord:c1", 10)[-1].text == reply
    # Rate limit per user: a burst of 2, then told to slow down; another user is unaffected.
    assert await router.answer(msg("もう一回")) not in (RATE_LIMIT_REPLY, None)
    assert await router.answer(msg("さらに")) == RATE_LIMIT_REPLY
    assert await router.answer(msg("わたしも", user="u2")) not in (RATE_LIMIT_REPLY, None)
    # Allowlisted chats only.
    assert await router.answer(msg("こんにちは", chat="elsewhere")) is None
    assert memory.recent("discord:elsewhere", 10) == []
    # Reset forgets this chat only.
    assert await router.answer(msg("/reset", user="u3")) == RESET_REPLY
    assert memory.recent("discord:c1", 10) == []
    await worker.stop(5)
    memory.close()


def test_rate_limiter_refills_over_time():
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=1, clock=lambda: now[0])
    assert limiter.allow("u") and not limiter.allow("u")
    now[0] += 1.0
    assert limiter.allow("u")


class Recording:
    """The real backend, keeping every conversation it was asked to answer."""

    def __init__(self, inner):
        self.inner = inner
        self.conversations = []

    def generate(self, conversations):
        self.conversations += conversations
        return self.inner.generate(conversations)


async def test_the_model_is_given_the_whole_remembered_conversation_in_order(tmp_path, backend):
    recording = Recording(backend)
    router, worker, memory, _ = make_router(tmp_path, recording)
    await worker.start()
    first = await router.answer(msg("最初のメッセージ"))
    await router.answer(msg("二つ目のメッセージ"))
    await worker.stop(5)
    memory.close()
    # The second prompt holds the first message, the persona's reply to it and the second message, in order.
    second = [(t.speaker, t.text) for t in recording.conversations[-1]]
    assert second == [("name-u1", "最初のメッセージ"), (PERSONA, first), ("name-u1", "二つ目のメッセージ")]
