"""Every platform's messages come through here: should the bot answer, and what.

    dispatcher ─► answer(message) ─► allowlists ─► reset (admins only)? ─► memory ─► rate limit ─► recall ─► worker ─► reply

The platform adapter has already decided whether the bot was addressed (a mention, a DM, a reply, a
LINE 1:1). Messages that were not addressed are still remembered: in a group the next question is
often about what was just said.

A message may be answered a second time after a crash (the inbox keeps it until its reply is
delivered). Memory is written under the message's inbox key, so it is remembered once, and a reply
generated before the crash is found there and delivered instead of a new one.

Each reply also gets notes recalled beyond its window (bot/reply_memory.py: the persona's memory and the chat's
own older turns, never another chat's). Recall runs in a worker thread: re-indexing a chat whose window moved
takes tens of milliseconds, which the event loop (every platform's webhooks) must not wait for.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from finetune.prompt import ChatTurn, MemoryNote
from finetune.records import ChatRecord

from .memory import MemoryStoreError
from .messages import IncomingMessage
from .reply_memory import recall_in_thread
from .worker import DeadlineExceeded, GenerationFailed, QueueFull, WorkerStopped

log = logging.getLogger("bunshin.router")

# What the bot says when it cannot answer normally. Short, in the persona's language, and never
# silent: a user who gets nothing resends, which makes a busy bot busier.
BUSY_REPLY = "いま混み合っているので、少ししてからもう一度送ってね。"
ERROR_REPLY = "ごめん、うまく返事が作れなかった。もう一度送ってみて。"
TIMEOUT_REPLY = "ごめん、返事に時間がかかりすぎたみたい。もう一度送ってみて。"
RATE_LIMIT_REPLY = "ちょっと速すぎるかも。少し待ってから送ってね。"
RESET_REPLY = "会話の記憶をリセットしました。"
NOT_ADMIN_REPLY = "記憶のリセットは管理者だけができます。"
STOPPING_REPLY = "いまは停止中です。あとでまた話しかけてね。"
WINDOW_SLACK = 8  # the prompt remembers between max_turns - 8 and max_turns turns
# Under overload every message is answered busy: one log line per message would add work exactly when the
# bot has none to spare. A line at most this often counts them (the metric counts each).
BUSY_LOG_EVERY_S = 10.0


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per user: `per_minute` sustained, `burst` at once."""

    def __init__(self, per_minute: float, burst: int, clock=time.monotonic):
        self.rate = per_minute / 60.0
        self.burst = burst
        self.clock = clock
        self.buckets: dict[str, _Bucket] = {}

    def allow(self, key: str) -> bool:
        now = self.clock()
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return True
        return False


class Router:
    def __init__(self, config, memory, worker, metrics, persona: str, recall=None):
        self.config = config
        self.memory = memory
        self.recall = recall  # bot.reply_memory.ReplyMemory, or None: the window alone
        self.worker = worker
        self.metrics = metrics
        self.persona = persona
        self.limiter = RateLimiter(config.limits.messages_per_minute, config.limits.burst)
        self.allow_users = set(config.limits.allow_users)
        self.allow_chats = set(config.limits.allow_chats)
        self.reset_commands = {c.strip() for c in config.memory.reset_commands}
        self._busy_unlogged = 0
        self._busy_logged_at = float("-inf")

    def _allowed(self, message: IncomingMessage) -> bool:
        if self.allow_users and message.user_key not in self.allow_users:
            return False
        return not self.allow_chats or message.chat_key in self.allow_chats

    def _log_busy(self, chat_key: str) -> None:
        self._busy_unlogged += 1
        now = time.monotonic()
        if now - self._busy_logged_at >= BUSY_LOG_EVERY_S:
            log.warning("queue full: answered busy to %d message(s) since the last such line (the latest in %s)",
                        self._busy_unlogged, chat_key)
            self._busy_unlogged, self._busy_logged_at = 0, now

    async def answer(self, message: IncomingMessage, key: str | None = None, again: bool = False) -> str | None:
        """The reply to send, or None to stay quiet. `key` (the inbox's, unique per message) makes memory
        writes idempotent; `again`: the message is answered a second time (after a restart), so a reply made
        the first time may be in memory already."""
        try:
            return await self._answer(message, key, again)
        except MemoryStoreError as exc:
            # Locked or damaged memory: the operator reads which file and why; the user hears that it failed
            # (so they can resend) instead of getting an answer given without the conversation.
            self.metrics.messages.labels(outcome="error").inc()
            log.error("%s", exc)
            return ERROR_REPLY if message.addressed else None

    async def _answer(self, message: IncomingMessage, key: str | None, again: bool) -> str | None:
        if not self._allowed(message):
            self.metrics.messages.labels(outcome="ignored").inc()
            return None
        text = message.text.strip()[: self.config.limits.max_message_chars]
        if not text:
            return None
        if message.addressed and text in self.reset_commands:
            if not self.config.is_admin(message.user_key):
                # Said plainly, so the user knows why nothing happened; not remembered, not answered by the model.
                self.metrics.messages.labels(outcome="refused").inc()
                log.warning("reset refused for %s in %s: not in [limits] admins", message.user_key, message.chat_key)
                return NOT_ADMIN_REPLY
            self.memory.reset(message.chat_key)
            if self.recall is not None:
                self.recall.forget(message.chat_key)
            log.info("memory reset for %s by %s", message.chat_key, message.user_key)
            return RESET_REPLY
        self.memory.append(message.chat_key, message.user_name, text, event=key)
        if not message.addressed:
            self.metrics.messages.labels(outcome="ignored").inc()
            return None
        reply_key = f"reply:{key}" if key else None
        if again and reply_key and (earlier := self.memory.text_of(reply_key)) is not None:
            self.metrics.messages.labels(outcome="replied").inc()
            return earlier  # generated before a crash, not delivered: the same words, not new ones
        if not self.limiter.allow(message.user_key):
            self.metrics.messages.labels(outcome="rate_limited").inc()
            return RATE_LIMIT_REPLY

        # A start that moves in jumps, not by one turn per message: the worker reuses what it computed for
        # this chat's last prompt when the next one begins the same way.
        window = self.memory.recent(message.chat_key, self.config.memory.max_turns, slack=WINDOW_SLACK)
        turns = [ChatTurn(r.speaker, r.text) for r in window]
        notes = await self._recalled(message.chat_key, window)
        deadline = message.received + self.config.queue.deadline_s
        try:
            reply = await self.worker.submit(turns, memory=notes, deadline=deadline, received=message.received)
        except QueueFull:
            self.metrics.messages.labels(outcome="busy").inc()
            self._log_busy(message.chat_key)
            return BUSY_REPLY
        except DeadlineExceeded:
            self.metrics.messages.labels(outcome="expired").inc()
            return TIMEOUT_REPLY
        except GenerationFailed as exc:
            self.metrics.messages.labels(outcome="error").inc()
            log.error("generation failed for %s: %s", message.chat_key, exc.kind)
            return ERROR_REPLY
        except WorkerStopped:
            return STOPPING_REPLY
        text_out = reply.text or "…"
        self.memory.append(message.chat_key, self.persona, text_out, event=reply_key)
        self.metrics.messages.labels(outcome="replied").inc()
        if self.config.logging.log_message_text:
            log.debug("%s <- %r", message.chat_key, text_out)
        return text_out

    async def _recalled(self, chat_key: str, window: list[ChatRecord]) -> list[MemoryNote]:
        """This reply's notes; none when recall is off."""
        if self.recall is None or not self.recall.recalls:
            return []
        return await recall_in_thread(self.metrics, chat_key, self.recall.for_chat, chat_key, window)
