"""The one message type every platform adapter hands the bot, its inbox entry, and what a platform adapter is.

    platform adapter ─► accept([IncomingMessage]) ─► inbox ─► dispatcher ─► router ─► deliver(entry, reply)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import asyncio


@dataclass(frozen=True)
class IncomingMessage:
    platform: str  # "console", "discord", "line"
    chat_id: str  # the platform's conversation: a channel, a DM, a LINE group, a 1:1 user
    user_id: str  # who wrote it, as the platform identifies them
    user_name: str  # the name the persona sees in the conversation
    text: str
    addressed: bool  # the platform adapter's verdict: a mention, a DM, a reply to the bot, a LINE 1:1
    received: float = field(default_factory=time.monotonic)  # for the reply deadline and latency
    # The platform's id of the event (LINE webhookEventId, Discord message id): the inbox takes each once.
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    received_at: float = field(default_factory=time.time)  # wall clock, for ages that outlive the process
    # What the platform adapter needs to answer it later, even after a restart (JSON: a reply token, a message id).
    delivery: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def chat_key(self) -> str:
        """Memory and limits are per conversation across platforms: `discord:1234`, `line:Cabc`."""
        return f"{self.platform}:{self.chat_id}"

    @property
    def user_key(self) -> str:
        return f"{self.platform}:{self.user_id}"


@dataclass
class InboxEntry:
    """One accepted message and how far answering it got."""

    id: int
    message: IncomingMessage
    reply: str | None = None  # the reply decided before a delivery was attempted
    attempts: list[tuple[str, float]] = field(default_factory=list)  # (method, wall time) before each first try
    recoveries: int = 0  # how many starts found it unfinished

    @property
    def recovered(self) -> bool:
        """Left unfinished by an earlier run."""
        return self.recoveries > 0

    @property
    def key(self) -> str:
        """Unique per message across platforms: memory keys its turns with it."""
        return f"{self.message.platform}:{self.message.event_id}"

    def attempted(self, method: str) -> float | None:
        """When a delivery by `method` was first attempted, or None."""
        return next((at for m, at in self.attempts if m == method), None)


# Stores messages durably and returns, per message, its inbox entry or None for a duplicate.
Accept = Callable[[list[IncomingMessage]], Awaitable[list[InboxEntry | None]]]
# Records (durably) that a delivery by a method is about to be tried: see Inbox.attempt.
RecordAttempt = Callable[[str], Awaitable[None]]


class Delivery(str, Enum):
    """How an accepted message was finished: what `PlatformAdapter.deliver` returns (and the dispatcher for a message
    with no reply or a bug), stored in the inbox and counted in `bunshin_deliveries{outcome}`. A string too, so the
    inbox and the metrics take it as they always did (enum.StrEnum would need Python 3.11; this is the same)."""

    __str__ = str.__str__
    __format__ = str.__format__

    REPLIED = "replied"  # the platform took the reply
    QUIET = "quiet"  # no reply was due (the router chose silence)
    MAYBE_DELIVERED = "maybe_delivered"  # tried before a crash or an ambiguous failure: not sent again
    DROPPED = "dropped"  # could not be sent any more (LINE: the reply token ran out, no push fallback)
    FAILED = "failed"  # the platform refused it, or a bug
    UNKNOWN_PUSHED = "unknown_pushed"  # LINE: no try settled it; [line] unknown_outcome pushed it (maybe twice)
    UNKNOWN_DROPPED = "unknown_dropped"  # LINE: no try settled it; [line] unknown_outcome did not push (maybe never)


class PlatformAdapter(Protocol):
    """A platform (console, Discord, LINE): turns its events into IncomingMessages and delivers replies.

    It never answers by itself: what it accepts is answered by the bot's dispatcher, which calls
    `deliver` once per accepted message that has a reply, also for messages left unanswered by an
    earlier run (entry.recovered).

    Optional: `async def speaker_name(self, message) -> str`, for a platform that can name a sender
    only at a cost (LINE's profile API). The dispatcher asks it just before the message is answered,
    never while the platform waits for an acknowledgement."""

    name: str

    def web_routes(self) -> list: ...  # aiohttp routes for the daemon's server (LINE's webhook)

    async def run(self, accept: Accept, stopping: asyncio.Event) -> None: ...  # take messages until `stopping`

    def can_deliver(self, entry: InboxEntry) -> bool: ...  # still answerable (logs why not): else only remembered

    def working(self, entry: InboxEntry) -> AbstractAsyncContextManager: ...  # typing indicator while replying

    async def deliver(self, entry: InboxEntry, reply: str, record_attempt: RecordAttempt) -> Delivery: ...

    async def close(self) -> None: ...  # after the last delivery: disconnect
