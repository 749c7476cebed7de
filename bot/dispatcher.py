"""The path of one accepted message: inbox ─► router ─► platform adapter's deliver ─► inbox finished.

    accept(messages) ─► inbox (on disk) ─► per chat, in order ─► speaker named ─► router.answer ─► deliver ─► finish
                                               ▲
        left unfinished by the last run ───────┘ (queued first, at start)

Chats are answered in parallel, each chat's messages one after another (a reply is built on the
turns before it). Until `start()` (the model is loading) accepted messages wait, on disk and here;
LINE's webhook acknowledges them all the same.

`drain()` (shutdown) finishes every message accepted before it began, within a time limit;
messages accepted during the drain, and any the limit cuts off, stay in the inbox and are answered
at the next start. Both are counted in the log, never dropped in silence.

Under overload the number of messages being answered at once is capped (`max_active`): the rest wait
in order, cheaply, and the event loop stays free to acknowledge webhooks quickly; the router answers
"busy" when the model's queue is full, so a backlog drains at the speed of those short answers.

A platform adapter that can name a sender only at some cost has `speaker_name(message)`, asked here,
just before the router, for the name the persona sees and memory keeps (LINE: a profile lookup,
which its webhook must not wait for). Other platform adapters name senders as they take messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import replace

from .inbox import InboxError
from .messages import Delivery, InboxEntry, IncomingMessage

log = logging.getLogger("bunshin.dispatcher")

# An entry answered by this many starts without finishing (each one killed while at it?) is given up:
# a message that crashes the process must not crash every restart.
MAX_RECOVERIES = 3


class Dispatcher:
    def __init__(self, inbox, adapters: dict, metrics, max_active: int = 256):
        self.inbox = inbox
        self.adapters = adapters  # platform name -> platform adapter
        self.metrics = metrics
        self.router = None  # set by start(): until then messages wait
        self._chats: dict[str, deque[InboxEntry]] = {}  # waiting or being answered, per chat in order
        self._tasks: dict[str, asyncio.Task] = {}  # chat key -> the task answering it
        self._active = asyncio.Semaphore(max_active)
        self._serving_since: float | None = None
        self._draining = False
        self._held = 0  # accepted during the drain: left for the next start

    # --- taking messages in ---

    async def accept(self, messages: list[IncomingMessage]) -> list[InboxEntry | None]:
        """What platform adapters call: store durably (raises InboxError if that fails), then queue the new ones."""
        entries = await self.inbox.accept(messages)
        for entry in entries:
            if entry is not None:
                self._queue(entry)
        return entries

    def recover(self, entries: list[InboxEntry]) -> None:
        """Queue what an earlier run left unfinished, before anything new arrives, in the order it arrived."""
        for entry in entries:
            self._queue(entry)
        if entries:
            log.info("%d message(s) left unanswered by the last run will be answered once serving", len(entries))
            self.metrics.recovered.inc(len(entries))

    def _queue(self, entry: InboxEntry) -> None:
        if self._draining:
            self._held += 1
            return
        chat = self._chats.get(entry.message.chat_key)
        if chat is None:
            chat = self._chats[entry.message.chat_key] = deque()
        chat.append(entry)
        self.metrics.inbox_waiting.inc()
        self._run(entry.message.chat_key)

    @property
    def waiting(self) -> int:
        """Accepted messages not yet finished (being answered included)."""
        return sum(len(chat) for chat in self._chats.values())

    # --- answering ---

    def start(self, router) -> None:
        """The model is ready: answer what waits, then each message as it comes."""
        self.router = router
        self._serving_since = time.monotonic()
        for chat_key in list(self._chats):
            self._run(chat_key)

    def _run(self, chat_key: str) -> None:
        if self.router is not None and chat_key not in self._tasks:
            self._tasks[chat_key] = asyncio.create_task(self._answer_chat(chat_key), name=f"chat {chat_key}")

    async def _answer_chat(self, chat_key: str) -> None:
        chat = self._chats[chat_key]
        try:
            while chat:
                async with self._active:
                    await self._answer(chat[0])
                chat.popleft()
                self.metrics.inbox_waiting.dec()
        finally:
            del self._tasks[chat_key]
            if not chat:
                del self._chats[chat_key]

    async def _answer(self, entry: InboxEntry) -> None:
        message = entry.message
        adapter = self.adapters.get(message.platform)
        try:
            if adapter is None:
                log.warning("message %s (event %s) from %s dropped: the %s platform is not enabled now", entry.id,
                            entry.key, message.chat_key, message.platform)
                return self._finish(entry, Delivery.DROPPED)
            if entry.recoveries > MAX_RECOVERIES:
                log.error("message %s (event %s) from %s dropped: %d starts did not get it answered", entry.id, entry.key,
                          message.chat_key, entry.recoveries)
                return self._finish(entry, Delivery.DROPPED)
            if message.addressed and not adapter.can_deliver(entry):
                # Too late to answer (the platform adapter said why): remembered as part of the conversation,
                # and no reply is made for nobody.
                if entry.reply is None:
                    message = await _named(adapter, message)
                    await self.router.answer(replace(message, addressed=False), entry.key)
                return self._finish(entry, Delivery.DROPPED)
            reply = entry.reply
            if reply is None:
                # A message that waited for the model to load (or for a restart) gets its full deadline from now.
                if self._serving_since is not None and message.received < self._serving_since:
                    message = replace(message, received=self._serving_since)
                async with adapter.working(entry):  # a slow lookup of the name shows the typing indicator too
                    message = await _named(adapter, message)
                    reply = await self.router.answer(message, entry.key, again=entry.recovered)
            if not reply:
                return self._finish(entry, Delivery.QUIET)

            async def record_attempt(method: str) -> None:
                await self.inbox.attempt(entry, method, reply)

            self._finish(entry, Delivery(await adapter.deliver(entry, reply, record_attempt)))
        except InboxError as exc:  # the disk failed: the entry stays unfinished and is tried again at the next start
            log.error("message %s from %s: %s", entry.id, message.chat_key, exc)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug must cost one message, not the chat
            log.exception("message %s from %s failed", entry.id, message.chat_key)
            try:
                self._finish(entry, Delivery.FAILED)
            except InboxError as exc:
                log.error("message %s from %s: %s", entry.id, message.chat_key, exc)

    def _finish(self, entry: InboxEntry, outcome: Delivery) -> None:
        self.inbox.finish(entry, outcome.value)
        self.metrics.deliveries.labels(outcome=outcome.value).inc()

    # --- stopping ---

    async def idle(self) -> None:
        """Returns once nothing accepted is waiting or being answered."""
        while self._tasks:
            await asyncio.wait(set(self._tasks.values()))

    async def drain(self, timeout: float) -> int:
        """Finish what was accepted before now, within `timeout` seconds; returns how many were left unfinished
        (they stay in the inbox, as do messages accepted from now on)."""
        self._draining = True
        waiting = self.waiting
        if waiting:
            log.info("finishing %d accepted message(s) (up to %gs)", waiting, timeout)
        tasks = set(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        left = self.waiting
        for task in list(self._tasks.values()):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks.values()), timeout=5)
        if left:
            log.warning("%d accepted message(s) not answered within %gs: kept in the inbox, answered at the next start",
                        left, timeout)
        if self._held:
            log.warning("%d message(s) accepted during shutdown: kept in the inbox, answered at the next start",
                        self._held)
        return left + self._held


async def _named(adapter, message: IncomingMessage) -> IncomingMessage:
    """`message` with its sender named by the platform adapter's `speaker_name`, if it has one."""
    speaker_name = getattr(adapter, "speaker_name", None)
    if speaker_name is None:
        return message
    name = await speaker_name(message)
    return message if name == message.user_name else replace(message, user_name=name)
