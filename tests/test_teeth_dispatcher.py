"""The dispatcher after restarts, on real parts: the inbox and memory as SQLite files, the router and the worker
on the tiny model, the console platform adapter printing to a buffer. A "restart" is the inbox (and the router)
opened again on the same files, which is what the next start of the daemon does.

- A message left unfinished is answered by the next start, up to MAX_RECOVERIES starts; one that this many
  starts did not get answered is given up (a message that crashes the process must not crash every start).
- A reply generated before the crash and not delivered is delivered as it was, without asking the model again.
"""

from __future__ import annotations

import asyncio
import contextlib
import io

import pytest

from adapters.console import ConsoleAdapter
from bot.dispatcher import MAX_RECOVERIES, Dispatcher
from bot.inbox import Inbox
from bot.memory import ConversationMemory
from bot.messages import IncomingMessage
from bot.metrics import BotMetrics
from bot.router import Router
from bot.worker import Worker
from finetune.config import BotConfig
from finetune.model_backend import ModelBackend
from finetune.model_loading import load_base_model
from finetune.tiny_model import build_tiny_model

PERSONA = "美咲"


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    loaded = load_base_model(str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")), device="cpu")
    return ModelBackend.from_loaded(loaded, persona=PERSONA, generation_overrides={"max_new_tokens": 8,
                                                                                    "temperature": 0.0})


class Recording:
    """The real backend, keeping every conversation it was asked to answer."""

    def __init__(self, inner):
        self.inner = inner
        self.persona = inner.persona
        self.conversations = []

    def generate(self, conversations):
        self.conversations += conversations
        return self.inner.generate(conversations)


class Start:
    """One start of the bot on the files in `folder`: inbox, memory, router, worker, the console adapter."""

    def __init__(self, folder, backend):
        self.config = BotConfig.from_dict({"persona": {"name": PERSONA},
                                           "memory": {"path": str(folder / "memory.sqlite3")}}, source="test")
        self.metrics = BotMetrics()
        self.model = Recording(backend)
        self.memory = ConversationMemory(self.config.memory.path)
        self.inbox = Inbox(Inbox.path_for(self.config.memory.path))
        self.worker = Worker(self.model, self.metrics)
        self.router = Router(self.config, self.memory, self.worker, self.metrics, PERSONA)
        self.printed = io.StringIO()
        self.console = ConsoleAdapter("健太", PERSONA, stdout=self.printed)
        self.dispatcher = Dispatcher(self.inbox, {"console": self.console}, self.metrics)

    async def serve_what_was_left(self) -> None:
        """The daemon's start: recover, start the worker and the dispatcher, answer everything waiting."""
        self.dispatcher.recover(self.inbox.recovered)
        await self.worker.start()
        self.dispatcher.start(self.router)
        await self.dispatcher.idle()

    async def stop(self) -> dict[str, int]:
        """Shut down in order; the inbox's counts by outcome."""
        await self.dispatcher.drain(10)
        counts = await self.inbox.counts()
        await self.worker.stop(5)
        self.inbox.close()
        self.memory.close()
        return counts

    def replies(self) -> list[str]:
        return [line.removeprefix(f"{PERSONA}: ") for line in self.printed.getvalue().splitlines()]

    def outcomes(self, outcome: str) -> float:
        return self.metrics.registry.get_sample_value("bunshin_deliveries_total", {"outcome": outcome}) or 0.0


def typed(text: str) -> IncomingMessage:
    return IncomingMessage("console", "local", "local", "健太", text, addressed=True)


@contextlib.asynccontextmanager
async def crashed(folder, backend):
    """A start that is killed after what the block does: nothing is finished or closed in order (the files
    stay as the process left them; the connection is dropped as the kernel would drop it)."""
    start = Start(folder, backend)
    yield start
    start.inbox.close()  # commits nothing more than what was committed: no entry was finished
    start.memory.close()


async def test_a_message_left_unanswered_by_max_recoveries_starts_is_still_answered_and_one_more_is_given_up(
        tmp_path, backend):
    async with crashed(tmp_path, backend) as start:  # killed before answering what it took, as each start is
        await start.inbox.accept([typed("最初のメッセージ")])
    async with crashed(tmp_path, backend) as start:
        assert [e.message.text for e in start.inbox.recovered] == ["最初のメッセージ"]
        await start.inbox.accept([typed("あとのメッセージ")])
    for _ in range(MAX_RECOVERIES - 1):
        async with crashed(tmp_path, backend) as start:
            assert [e.message.text for e in start.inbox.recovered] == ["最初のメッセージ", "あとのメッセージ"]
    # The next start is the (MAX_RECOVERIES + 1)th to find the first message, the MAX_RECOVERIES-th for the second.
    start = Start(tmp_path, backend)
    assert [(e.message.text, e.recoveries) for e in start.inbox.recovered] == [
        ("最初のメッセージ", MAX_RECOVERIES + 1), ("あとのメッセージ", MAX_RECOVERIES)]
    await start.serve_what_was_left()
    assert len(start.replies()) == 1  # the second one, answered
    assert [turn[-1].text for turn in start.model.conversations] == ["あとのメッセージ"]
    assert (start.outcomes("dropped"), start.outcomes("replied")) == (1, 1)
    assert await start.stop() == {"dropped": 1, "replied": 1}


async def test_a_reply_generated_before_a_crash_is_delivered_as_it_was_without_asking_the_model_again(
        tmp_path, backend):
    async with crashed(tmp_path, backend) as start:
        (entry,) = await start.inbox.accept([typed("明日どこ行く？")])
        await start.worker.start()
        # What the dispatcher does before delivering: the router answers (the reply is in memory now)...
        made = await start.router.answer(entry.message, entry.key)
        await start.worker.stop(5)
        # ... and the process is killed before the console printed it.
    assert made and len(start.model.conversations) == 1

    again = Start(tmp_path, backend)
    assert [e.recovered for e in again.inbox.recovered] == [True]
    await again.serve_what_was_left()
    assert again.replies() == [made]
    assert again.model.conversations == []  # the model was not asked a second time
    assert await again.stop() == {"replied": 1}
    # Memory holds the message and the one reply, once each.
    memory = ConversationMemory(again.config.memory.path)
    assert [(turn.speaker, turn.text) for turn in memory.recent("console:local", 10)] == [
        ("健太", "明日どこ行く？"), (PERSONA, made)]
    memory.close()


class Gated(Recording):
    """The real backend, held at the door until the test opens it: a reply still being generated at shutdown."""

    def __init__(self, inner):
        super().__init__(inner)
        import threading

        self.entered, self.gate = threading.Event(), threading.Event()

    def generate(self, conversations):
        self.entered.set()
        self.gate.wait(30)
        return super().generate(conversations)


async def test_drain_counts_what_it_leaves_and_what_came_during_it_and_the_next_start_answers_all_of_it(
        tmp_path, backend):
    """Shutdown with a reply being generated: drain's limit cuts it off, two messages arrive while it drains.
    drain says 3 were left (the operator's log line), none is finished, and the next start answers all three,
    in the order they came."""
    import asyncio

    start = Start(tmp_path, backend)
    start.model = gated = Gated(backend)
    start.worker = Worker(gated, start.metrics)
    start.router = Router(start.config, start.memory, start.worker, start.metrics, PERSONA)
    await start.worker.start()
    start.dispatcher.start(start.router)
    await start.dispatcher.accept([typed("一つ目")])
    assert await asyncio.to_thread(gated.entered.wait, 10)  # its reply is being generated
    draining = asyncio.create_task(start.dispatcher.drain(0.3))
    await asyncio.sleep(0)  # drain has begun
    await start.dispatcher.accept([typed("二つ目")])
    await start.dispatcher.accept([typed("三つ目")])
    assert await draining == 3  # 1 cut off by the limit + 2 accepted during the drain
    assert start.dispatcher.waiting == 1  # the cut-off one, still counted as waiting: nothing finished it
    gated.gate.set()
    assert await start.inbox.counts() == {"unfinished": 3}
    await start.worker.stop(5)
    start.inbox.close()
    start.memory.close()
    assert start.replies() == []

    again = Start(tmp_path, backend)
    assert [e.message.text for e in again.inbox.recovered] == ["一つ目", "二つ目", "三つ目"]
    await again.serve_what_was_left()
    assert [turn[-1].text for turn in again.model.conversations] == ["一つ目", "二つ目", "三つ目"]
    assert len(again.replies()) == 3
    assert await again.dispatcher.drain(1) == 0  # nothing left, nothing held
    assert await again.stop() == {"replied": 3}


class TooLate(ConsoleAdapter):
    """A platform adapter that can no longer answer (LINE: the reply token expired and push is off)."""

    def can_deliver(self, entry) -> bool:
        return False


class Broken(ConsoleAdapter):
    """A platform adapter with a bug in its delivery."""

    async def deliver(self, entry, reply, record_attempt):
        raise RuntimeError("a bug in the platform adapter")


class Misnamed(ConsoleAdapter):
    """A platform adapter that answers with an outcome the dispatcher does not know (a typo, an attempt's result)."""

    async def deliver(self, entry, reply, record_attempt):
        await super().deliver(entry, reply, record_attempt)
        return "sent"


class Naming(ConsoleAdapter):
    """A platform adapter that names senders only when asked (LINE's profile lookup)."""

    async def speaker_name(self, message):
        return "けんちゃん"


def said(platform: str, text: str, *, addressed: bool = True, chat: str = "local", user: str = "健太", **kw):
    return IncomingMessage(platform, chat, "u1", user, text, addressed=addressed, **kw)


async def test_every_way_a_message_ends_is_written_to_the_inbox_and_counted_under_its_own_name(tmp_path, backend):
    """Each outcome a message can have, finished in the inbox under its name and counted in the metric of that
    name: a platform that is not enabled (dropped), a message to nobody (quiet), a platform adapter that fails
    (failed), one that can no longer answer (dropped, remembered with its event key, the model not asked), and a
    plain reply. Nothing stays unfinished."""
    start = Start(tmp_path, backend)
    printed = start.printed
    start.dispatcher.adapters.update({
        "late": TooLate("健太", PERSONA, stdout=printed), "broken": Broken("健太", PERSONA, stdout=printed),
        "misnamed": Misnamed("健太", PERSONA, stdout=printed)})
    await start.worker.start()
    start.dispatcher.start(start.router)
    entries = await start.dispatcher.accept([
        said("line", "LINEは今日おやすみ"),  # no adapter for it in this start
        said("console", "ひとりごと", addressed=False, chat="group"),
        said("broken", "届かないかも"),
        said("late", "遅すぎた質問"),
        said("console", "こんにちは"),
        said("misnamed", "どうなる?"),
    ])
    await start.dispatcher.idle()
    # An outcome that is no Delivery is a bug of that adapter: the message counts as failed, not under a new name.
    assert await start.inbox.counts() == {"dropped": 2, "quiet": 1, "failed": 2, "replied": 1}
    assert {o: start.outcomes(o) for o in ("dropped", "quiet", "failed", "replied")} == {
        "dropped": 2, "quiet": 1, "failed": 2, "replied": 1}
    assert [turn[-1].text for turn in start.model.conversations] == ["届かないかも", "こんにちは", "どうなる?"]
    assert len(start.replies()) == 2
    # Too late to answer, yet part of the conversation: remembered once, under the inbox's key for it.
    late = entries[3]
    assert start.memory.text_of(late.key) == "遅すぎた質問"
    assert [(t.speaker, t.text) for t in start.memory.recent("late:local", 10)] == [("健太", "遅すぎた質問")]
    assert await start.stop() == {"dropped": 2, "quiet": 1, "failed": 2, "replied": 1}


async def test_messages_wait_for_the_model_then_each_chat_is_answered_once_in_order(tmp_path, backend):
    """Accepted before start() (the model is loading): nothing is answered and nothing finished; then every
    message of a chat exactly once, in the order they came, under the name the platform adapter gives, and a
    message that waited longer than its deadline still gets its whole deadline from the start."""
    start = Start(tmp_path, backend)
    start.dispatcher.adapters["named"] = Naming("健太", PERSONA, stdout=start.printed)
    await start.worker.start()
    long_ago = said("console", "一時間前のメッセージ")
    long_ago = IncomingMessage(**{**long_ago.__dict__, "received": long_ago.received - 3600})
    await start.dispatcher.accept([long_ago, said("console", "二つ目"), said("named", "名前は？")])
    await start.dispatcher.accept([said("console", "三つ目")])
    assert start.dispatcher.waiting == 4 and await start.inbox.counts() == {"unfinished": 4}
    assert start.model.conversations == [] and start.dispatcher._tasks == {}
    start.dispatcher.start(start.router)
    await start.dispatcher.idle()
    asked = [turn[-1].text for turn in start.model.conversations]
    assert sorted(asked) == sorted(["一時間前のメッセージ", "二つ目", "三つ目", "名前は？"])
    assert [t for t in asked if t != "名前は？"] == ["一時間前のメッセージ", "二つ目", "三つ目"]  # the chat's order
    assert len(start.replies()) == 4 and start.dispatcher.waiting == 0
    # The lookup's name is the one the persona sees and memory keeps.
    [named] = [turn for turn in start.model.conversations if turn[-1].text == "名前は？"]
    assert named[-1].speaker == "けんちゃん"
    assert [t.speaker for t in start.memory.recent("named:local", 10)][0] == "けんちゃん"
    assert await start.stop() == {"replied": 4}


class TooLateNaming(Naming):
    def can_deliver(self, entry) -> bool:
        return False


async def test_a_message_too_late_to_answer_is_remembered_under_the_name_the_platform_gives(tmp_path, backend):
    start = Start(tmp_path, backend)
    start.dispatcher.adapters["late"] = TooLateNaming("健太", PERSONA, stdout=start.printed)
    await start.worker.start()
    start.dispatcher.start(start.router)
    await start.dispatcher.accept([said("late", "もう遅い？")])
    await start.dispatcher.idle()
    assert [(t.speaker, t.text) for t in start.memory.recent("late:local", 10)] == [("けんちゃん", "もう遅い？")]
    assert start.model.conversations == [] and await start.stop() == {"dropped": 1}


async def test_a_message_that_comes_long_after_the_start_has_its_own_deadline(tmp_path, backend):
    """Only a message that waited for the model gets its deadline moved to the start; one that comes an hour into
    serving keeps its own (moved to the start, it would be an hour late and never reach the model)."""
    start = Start(tmp_path, backend)
    await start.worker.start()
    start.dispatcher.start(start.router)
    start.dispatcher._serving_since -= 3600  # serving for an hour
    await start.dispatcher.accept([said("console", "いまきたよ")])
    await start.dispatcher.idle()
    assert [turn[-1].text for turn in start.model.conversations] == ["いまきたよ"]
    assert len(start.replies()) == 1 and await start.stop() == {"replied": 1}


class KilledWhilePrinting(ConsoleAdapter):
    """Records the attempt as the console does, then the process dies before the line is printed and finished."""

    async def deliver(self, entry, reply, record_attempt):
        await record_attempt("print")
        await asyncio.Event().wait()  # never returns: the kill comes first


async def test_a_reply_whose_delivery_began_before_a_crash_is_not_delivered_twice_nor_made_again(tmp_path, backend):
    """The attempt (its method and the reply) is committed before the platform adapter sends: after the crash the
    next start sees it, does not print a second time and does not ask the model again (maybe_delivered)."""
    async with crashed(tmp_path, backend) as start:
        start.dispatcher.adapters["console"] = KilledWhilePrinting("健太", PERSONA, stdout=start.printed)
        await start.worker.start()
        start.dispatcher.start(start.router)
        [entry] = await start.dispatcher.accept([said("console", "届いた？")])
        for _ in range(200):  # until the attempt is recorded
            if entry.attempted("print") is not None:
                break
            await asyncio.sleep(0.05)
        made = entry.reply
        assert made and len(start.model.conversations) == 1
        for task in list(start.dispatcher._tasks.values()):
            task.cancel()
        await start.worker.stop(5)
    again = Start(tmp_path, backend)
    [recovered] = again.inbox.recovered
    assert recovered.reply == made and recovered.attempted("print") is not None
    await again.serve_what_was_left()
    assert again.replies() == [] and again.model.conversations == []
    assert await again.stop() == {"maybe_delivered": 1}


class Stuck(ConsoleAdapter):
    """A platform adapter that ignores its cancellation (a blocking call in a library, say)."""

    released = False  # the test lets it go at the end, so the event loop can close

    async def deliver(self, entry, reply, record_attempt):
        while not self.released:
            try:
                await asyncio.sleep(0.1)
            except asyncio.CancelledError:
                continue
        return "failed"


async def test_a_stuck_platform_adapter_cannot_hold_up_shutdown(tmp_path, backend):
    start = Start(tmp_path, backend)
    start.dispatcher.adapters["stuck"] = stuck = Stuck("健太", PERSONA, stdout=start.printed)
    await start.worker.start()
    start.dispatcher.start(start.router)
    await start.dispatcher.accept([said("stuck", "おーい")])
    while not start.model.conversations:
        await asyncio.sleep(0.05)
    assert await asyncio.wait_for(start.dispatcher.drain(0.1), timeout=30) == 1  # the limit, then 5 s for the cancel
    assert await start.inbox.counts() == {"unfinished": 1}
    stuck.released = True
    await start.dispatcher.idle()
    await start.worker.stop(5)
    start.inbox.close()
    start.memory.close()
