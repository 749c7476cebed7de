"""LINE Messaging API: a webhook on the daemon's HTTP server, replies through line-bot-sdk v3.

    POST [line] webhook_path ─► size cap ─► X-Line-Signature ─► 200 at once
        └─► background, per chat in order: dedup by webhookEventId ─► addressed? ─► router
            ─► reply token (while fresh) | push ([line] push_fallback) | drop, with a log line

LINE waits 2 s for the webhook's answer, so events are handled after it; a generation takes
longer than that. The webhook answers 503 until the model is loaded and after shutdown begins,
so LINE redelivers those events later. Seen webhookEventIds are kept in a small SQLite file next
to the memory file, so a redelivery is answered once even across a restart.

Logs name chats and event ids, never message text or secrets.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import math
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web
from linebot.v3.messaging import (
    ApiException,
    AsyncApiClient,
    AsyncMessagingApi,
    Configuration,
    PushMessageRequest,
    ReplyMessageRequest,
    ShowLoadingAnimationRequest,
    TextMessage,
)
from linebot.v3.webhooks import Event, GroupSource, MessageEvent, RoomSource, TextMessageContent, UserSource
from pydantic.v1 import ValidationError as SdkResponseError  # the SDK's models are pydantic v1

from bot.messages import IncomingMessage

log = logging.getLogger("bunshin.line")

Handler = Callable[[IncomingMessage], Awaitable[str | None]]

MAX_BODY_BYTES = 1024 * 1024  # a webhook body is a few KB; this is far above any real batch of events
MAX_TEXT_UNITS = 5000  # a text message's limit, in UTF-16 code units
MAX_MESSAGES = 5  # message objects per reply or push call
SEEN_KEEP = 10_000  # webhookEventIds remembered for deduplication
PUSH_ATTEMPTS = 3
SENTENCE_ENDS = "。！？!?."


# --- splitting a reply to LINE's limits -------------------------------------------------------


def utf16_units(text: str) -> int:
    """Length as LINE counts it: characters beyond the BMP (most emoji) are two units."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def _fitting(text: str, limit: int) -> int:
    """How many characters of `text` fit in `limit` UTF-16 units (never half a surrogate pair)."""
    units = 0
    for i, ch in enumerate(text):
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > limit:
            return i
    return len(text)


def split_reply(text: str, limit: int = MAX_TEXT_UNITS, max_messages: int = MAX_MESSAGES) -> list[str]:
    """`text` as at most `max_messages` texts of at most `limit` UTF-16 units each.

    Cuts at the last newline that fits, else after a sentence end (。！？!?.), else at a space, else
    hard; a boundary in the first half of the window is passed over, so pieces stay large. Text
    beyond `max_messages` pieces is cut, and the last piece ends with "…".
    """
    pieces: list[str] = []
    rest = text.strip()
    while rest:
        if utf16_units(rest) <= limit:
            pieces.append(rest)
            break
        window = rest[: _fitting(rest, limit)]
        floor = len(window) // 2
        cut = skip = 0
        if (at := window.rfind("\n", floor)) > 0:
            cut, skip = at, 1
        elif (at := max(window.rfind(ch, floor) for ch in SENTENCE_ENDS)) > 0:
            cut = at + 1
        elif (at := max(window.rfind(" ", floor), window.rfind("\u3000", floor))) > 0:
            cut, skip = at, 1
        else:
            cut = len(window)
        piece, rest = window[:cut].rstrip(), rest[cut + skip:].lstrip()
        if piece:
            pieces.append(piece)
    if len(pieces) > max_messages:
        pieces = pieces[:max_messages]
        last = pieces[-1]
        pieces[-1] = last[: _fitting(last, limit - 1)] + "…"
    return pieces


# --- seen webhook events ----------------------------------------------------------------------


class SeenEvents:
    """webhookEventIds already taken, in their own SQLite file (the memory file holds only its own tables)."""

    def __init__(self, path: str, keep: int = SEEN_KEEP):
        self.keep = keep
        self._added = 0
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # as the memory file: no fsync per webhook
        self._db.execute("CREATE TABLE IF NOT EXISTS seen (event_id TEXT PRIMARY KEY, at REAL NOT NULL)")

    @staticmethod
    def path_for(memory_path: str) -> str:
        if memory_path == ":memory:":
            return ":memory:"
        return str(Path(memory_path).with_suffix(".line-events.sqlite3"))

    def first_time(self, event_id: str) -> bool:
        """Records `event_id`; True when it was not seen before."""
        new = self._db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (event_id, time.time())).rowcount == 1
        self._added += new
        if self._added >= self.keep // 10:  # prune now and then, not on every event
            self._added = 0
            self._db.execute("DELETE FROM seen WHERE rowid <= (SELECT MAX(rowid) FROM seen) - ?", (self.keep,))
        return new

    def close(self) -> None:
        self._db.close()


# --- the adapter ------------------------------------------------------------------------------


def _chat_of(source) -> tuple[str, str] | None:
    """(kind, chat id) of an event's source: a 1:1 user, a group or a room."""
    if isinstance(source, UserSource) and source.user_id:
        return "user", source.user_id
    if isinstance(source, GroupSource) and source.group_id:
        return "group", source.group_id
    if isinstance(source, RoomSource) and source.room_id:
        return "room", source.room_id
    return None


def _short(value, limit: int = 40) -> str:
    """An id or event type fit for a log line (the body is the sender's, not ours)."""
    return str(value)[:limit].encode("ascii", "replace").decode()


class LineAdapter:
    name = "line"

    def __init__(self, config, metrics, persona: str):
        self.config = config
        self.line = config.line
        self.metrics = metrics
        self.persona = persona
        # Read once, at start: BotConfig.secret raises ConfigError naming the variable, never the value.
        self._secret = config.secret(self.line.channel_secret_env).encode("utf-8")
        self._token = config.secret(self.line.access_token_env)
        self._seen = SeenEvents(SeenEvents.path_for(config.memory.path))
        self._handle: Handler | None = None  # set by run(); until then the webhook answers 503
        self._api: AsyncMessagingApi | None = None
        self._tasks: set[asyncio.Task] = set()
        self._timeout = aiohttp.ClientTimeout(total=self.line.api_timeout_s)

    def web_routes(self) -> list:
        return [web.post(self.line.webhook_path, self.webhook)]

    # --- the webhook: verify, answer at once, work in the background ---

    async def webhook(self, request: web.Request) -> web.Response:
        received = time.monotonic()
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return web.Response(status=413, text="body too large")
        body = bytearray()
        async for chunk in request.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return web.Response(status=413, text="body too large")
        signature = request.headers.get("X-Line-Signature")
        if not signature:
            log.warning("webhook without X-Line-Signature from %s: rejected", request.remote)
            return web.Response(status=400, text="missing X-Line-Signature")
        expected = base64.b64encode(hmac.new(self._secret, bytes(body), hashlib.sha256).digest())
        if not hmac.compare_digest(expected, signature.encode("utf-8", "replace")):
            log.warning("webhook with a wrong X-Line-Signature from %s: rejected", request.remote)
            return web.Response(status=401, text="invalid signature")
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past reason
            return web.Response(status=400, text="body is not JSON")
        events = payload.get("events") if isinstance(payload, dict) else None
        if not isinstance(events, list):
            return web.Response(status=400, text="no events list")
        handle = self._handle
        if handle is None:  # loading, or shutting down: LINE redelivers later
            return web.Response(status=503, text="not serving yet")
        by_chat: dict[str, list[MessageEvent]] = {}
        for raw in events:
            event = self._parse(raw)
            if event is None:
                continue
            if not self._seen.first_time(event.webhook_event_id):
                log.info("event %s delivered again: already taken", _short(event.webhook_event_id))
                continue
            by_chat.setdefault(_chat_of(event.source)[1], []).append(event)
        for chat_events in by_chat.values():  # chats in parallel, each chat's events in order
            task = asyncio.create_task(self._process(chat_events, received, handle))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return web.Response(status=200, text="OK")

    def _parse(self, raw) -> MessageEvent | None:
        """A text message event we can answer, or None (other events and malformed ones are ignored)."""
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind != "message":
            log.debug("%s event ignored", _short(kind))
            return None
        try:
            event = Event.from_dict(raw)
        except Exception as exc:  # noqa: BLE001 - its message may quote the event, text included
            log.warning("malformed message event ignored (%s)", type(exc).__name__)
            return None
        if not isinstance(event, MessageEvent) or not isinstance(event.message, TextMessageContent):
            return None
        if _chat_of(event.source) is None:
            log.warning("message event %s without a usable source: ignored", _short(event.webhook_event_id))
            return None
        return event

    # --- one chat's events ---

    async def _process(self, events: list[MessageEvent], received: float, handle: Handler) -> None:
        for event in events:
            try:
                await self._answer(event, received, handle)
            except Exception:  # noqa: BLE001 - one bad event must not stop the chat's others
                log.exception("event %s failed", _short(event.webhook_event_id))

    def _addressed(self, event: MessageEvent, kind: str) -> bool:
        if kind == "user":
            return True
        mention = event.message.mention
        if mention and any(getattr(m, "is_self", False) for m in mention.mentionees or ()):
            return True
        return self.line.call_by_name and bool(self.persona) and self.persona in event.message.text

    async def _answer(self, event: MessageEvent, received: float, handle: Handler) -> None:
        kind, chat_id = _chat_of(event.source)
        user_id = getattr(event.source, "user_id", None) or ""
        message = IncomingMessage(
            platform="line",
            chat_id=chat_id,
            user_id=user_id or "unknown",
            # A profile lookup would cost an API call per new speaker; the id's tail tells speakers apart.
            user_name=f"LINE user {user_id[-4:]}" if user_id else "LINE user",
            text=event.message.text,
            addressed=self._addressed(event, kind),
            received=received,
        )
        loading = None
        if kind == "user" and message.addressed:
            loading = asyncio.create_task(self._show_loading(chat_id))
        try:
            reply = await handle(message)
        finally:
            if loading is not None:
                await loading  # the animation must start before the reply, or it shows after it
        if not reply:
            return
        messages = [TextMessage(text=piece) for piece in split_reply(reply)]
        if not messages:
            return
        # The token lasts about a minute from the event; count from the older of LINE's stamp and our receipt.
        age = max(time.monotonic() - received, time.time() - event.timestamp / 1000)
        if event.reply_token and age < self.line.reply_token_margin_s:
            status = await self._reply(event.reply_token, messages, chat_id)
            if status != 400:
                return
            reason = "reply token refused"
        else:
            reason = f"reply token stale after {age:.1f}s"
        if self.line.push_fallback:
            await self._push(chat_id, messages)
        else:
            log.warning("%s for %s: reply dropped ([line] push_fallback is off)", reason, message.chat_key)

    # --- LINE's API ---

    def _api_failed(self, what: str, chat_id: str, exc: Exception) -> int | None:
        self.metrics.errors.labels(kind="line_api").inc()
        if isinstance(exc, ApiException):
            detail = ""
            try:
                detail = _short(json.loads(exc.body).get("message", ""), 200)
            except Exception:  # noqa: BLE001 - no JSON body
                pass
            log.error("LINE %s for %s failed: HTTP %s %s %s", what, _short(chat_id), exc.status, exc.reason or "", detail)
            return exc.status
        log.error("LINE %s for %s failed: %s", what, _short(chat_id), type(exc).__name__)
        return None

    async def _show_loading(self, chat_id: str) -> None:
        seconds = min(60, max(5, 5 * math.ceil(self.config.queue.deadline_s / 5)))
        try:
            await self._api.show_loading_animation(
                ShowLoadingAnimationRequest(chat_id=chat_id, loading_seconds=seconds), _request_timeout=self._timeout)
        except SdkResponseError:
            pass  # accepted (2xx) with a body other than documented
        except Exception as exc:  # noqa: BLE001 - a missing animation is cosmetic
            self._api_failed("loading animation", chat_id, exc)

    async def _reply(self, token: str, messages: list[TextMessage], chat_id: str) -> int | None:
        """Sends once: a reply token is spent by the first try, so a retry could only fail or duplicate."""
        try:
            await self._api.reply_message(ReplyMessageRequest(reply_token=token, messages=messages),
                                          _request_timeout=self._timeout)
        except SdkResponseError:
            pass
        except Exception as exc:  # noqa: BLE001
            return self._api_failed("reply", chat_id, exc)
        log.info("replied to line:%s (%d message(s))", _short(chat_id), len(messages))
        return 200

    async def _push(self, chat_id: str, messages: list[TextMessage]) -> None:
        """Retries 5xx and network errors with one X-Line-Retry-Key: LINE sends a key's message once (409 after)."""
        key = str(uuid.uuid4())
        for attempt in range(1, PUSH_ATTEMPTS + 1):
            try:
                await self._api.push_message(PushMessageRequest(to=chat_id, messages=messages), x_line_retry_key=key,
                                             _request_timeout=self._timeout)
            except SdkResponseError:
                pass
            except Exception as exc:  # noqa: BLE001
                if isinstance(exc, ApiException) and exc.status == 409:
                    pass  # an earlier try with this key got through
                else:
                    status = self._api_failed(f"push (try {attempt}/{PUSH_ATTEMPTS})", chat_id, exc)
                    retriable = status is None or status >= 500
                    if retriable and attempt < PUSH_ATTEMPTS:
                        await asyncio.sleep(0.5 * 2 ** (attempt - 1))
                        continue
                    return
            log.info("pushed to line:%s (%d message(s))", _short(chat_id), len(messages))
            return

    # --- lifecycle ---

    async def run(self, handle: Handler, stopping: asyncio.Event) -> None:
        client = AsyncApiClient(Configuration(host=self.line.api_host, access_token=self._token))
        self._api = AsyncMessagingApi(client)
        self._handle = handle
        log.info("LINE webhook on %s", self.line.webhook_path)
        try:
            await stopping.wait()
            self._handle = None  # new webhooks get 503 from here on
            # The daemon drains the worker first, so these are only delivering what it produced.
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=self.line.api_timeout_s)
        finally:
            for task in self._tasks:
                task.cancel()
            await client.close()
            self._seen.close()
