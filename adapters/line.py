"""LINE Messaging API: a webhook on the daemon's HTTP server, replies through line-bot-sdk v3.

    POST [line] webhook_path ─► size cap ─► X-Line-Signature ─► 200 at once
        └─► background, per chat in order: dedup by webhookEventId ─► addressed? ─► router
            ─► reply token (while fresh) | push ([line] push_fallback) | drop, with a log line

LINE waits 2 s for the webhook's answer, so events are handled after it; a generation takes
longer than that. The webhook answers 503 until the model is loaded and after shutdown begins,
so LINE redelivers those events later. Seen webhookEventIds are kept in a small SQLite file next
to the memory file, so a redelivery is answered once even across a restart.

Delivery is at most once, retried within bounds. A reply token is spent by the first request
LINE accepts, so a reply retried after an ambiguous failure (5xx, timeout) either gets through or
is refused: never sent twice; after such a failure it is not pushed either. A push carries one
X-Line-Retry-Key for all its tries, so LINE sends it once and answers 409 to the rest. 429 waits
for Retry-After; everything else backs off exponentially with jitter.

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
import random
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
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


# --- the webhook body: signature first, then parsing -------------------------------------------


class WebhookRejected(Exception):
    """A webhook request refused before any event was taken: `status` is the 4xx answer, `reason` says why."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


def verify_signature(body: bytes, signature: str | None, secret: bytes) -> None:
    """Raises WebhookRejected unless `signature` is LINE's: base64 of HMAC-SHA256 of the raw body with the channel secret.

    Runs before the body is parsed, so nothing a stranger sends reaches the JSON parser or the SDK."""
    if not signature:
        raise WebhookRejected(400, "missing X-Line-Signature")
    expected = base64.b64encode(hmac.new(secret, body, hashlib.sha256).digest())
    if not hmac.compare_digest(expected, signature.encode("utf-8", "replace")):
        raise WebhookRejected(401, "invalid X-Line-Signature")


def parse_events(body: bytes) -> list[MessageEvent]:
    """The text message events in a (verified) webhook body that can be answered; other events and malformed
    ones are skipped. A body that is not a LINE webhook at all raises WebhookRejected(400)."""
    try:
        text = body.decode("utf-8")  # LINE sends UTF-8; json.loads(bytes) would also guess UTF-16 and UTF-32
    except UnicodeDecodeError as exc:
        raise WebhookRejected(400, f"body is not UTF-8 (invalid byte at offset {exc.start})") from None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WebhookRejected(400, f"body is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise WebhookRejected(400, "body is not JSON a parser can take (nested too deeply)") from None
    events = payload.get("events") if isinstance(payload, dict) else None
    if not isinstance(events, list):
        raise WebhookRejected(400, 'body has no "events" list')
    return [event for raw in events if (event := _text_message_event(raw)) is not None]


def _text_message_event(raw) -> MessageEvent | None:
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
    chat = _chat_of(event.source)
    if chat is None:
        log.warning("message event %s without a usable source: ignored", _short(event.webhook_event_id))
        return None
    # The SDK's models check types, not values. What LINE never sends would fail later, in SQLite or in
    # arithmetic on the timestamp, after the webhook has answered: refuse it here instead.
    user_id = getattr(event.source, "user_id", None) or ""
    if not (event.webhook_event_id and _is_utf8(event.webhook_event_id, chat[1], user_id, event.message.text)
            and 0 <= event.timestamp < 2**53):
        log.warning("message event %s with impossible values ignored", _short(event.webhook_event_id))
        return None
    return event


def _is_utf8(*texts: str) -> bool:
    """False for a JSON string holding an unpaired surrogate (\\ud800): valid JSON, but not text UTF-8 can store."""
    try:
        for text in texts:
            text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- calling LINE's API: what a failure means, and when to try again -------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how far apart a call to LINE's API is tried. Tries back off exponentially with
    jitter (replies held back by an outage should not all return at the same instant); a 429's
    Retry-After is waited out, unless it is longer than `max_retry_after_s`."""

    attempts: int = 4
    base_s: float = 0.5
    max_s: float = 8.0
    max_retry_after_s: float = 60.0

    def wait_before_retry(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after failed try `attempt` (1-based): Retry-After, else an equal-jitter backoff."""
        if retry_after is not None:
            return retry_after + random.uniform(0, self.base_s / 2)
        step = min(self.max_s, self.base_s * 2 ** (attempt - 1))
        return step / 2 + random.uniform(0, step / 2)


@dataclass(frozen=True)
class Attempt:
    """What one call to LINE's API came to.

    outcome: "sent" (accepted), "conflict" (409: an earlier try with this retry key was accepted),
    "refused" (a 4xx: nothing was sent, and trying again would not change that), "throttled" (429:
    nothing was sent), "unsent" (the connection failed before the request went out), "unknown" (5xx
    or a timeout: LINE may have accepted it)."""

    outcome: str
    status: int | None = None
    retry_after: float | None = None

    @property
    def retriable(self) -> bool:
        return self.outcome in ("throttled", "unsent", "unknown")


def retry_after_seconds(headers) -> float | None:
    """A Retry-After header (seconds or an HTTP date) in seconds from now, or None."""
    value = (headers or {}).get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


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
    retry = RetryPolicy()  # tests shorten the waits

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
        body = await _read_capped(request, MAX_BODY_BYTES)
        if body is None:
            log.warning("webhook from %s rejected: body over %d bytes", request.remote, MAX_BODY_BYTES)
            return web.Response(status=413, text=f"body over {MAX_BODY_BYTES} bytes")
        try:
            verify_signature(body, request.headers.get("X-Line-Signature"), self._secret)
            events = parse_events(body)
        except WebhookRejected as exc:
            log.warning("webhook from %s rejected: %s", request.remote, exc.reason)
            return web.Response(status=exc.status, text=exc.reason)
        handle = self._handle
        if handle is None:  # loading, or shutting down: LINE redelivers later
            return web.Response(status=503, text="not serving yet")
        by_chat: dict[str, list[MessageEvent]] = {}
        for event in events:
            if not self._seen.first_time(event.webhook_event_id):
                log.info("event %s delivered again: already taken", _short(event.webhook_event_id))
                continue
            by_chat.setdefault(_chat_of(event.source)[1], []).append(event)
        for chat_events in by_chat.values():  # chats in parallel, each chat's events in order
            task = asyncio.create_task(self._process(chat_events, received, handle))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return web.Response(status=200, text="OK")

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
        # Only ever to the chat the event came from: the reply token is that chat's, and so is `chat_id`.
        if event.reply_token and self._token_age(event, received) < self.line.reply_token_margin_s:
            outcome = await self._reply(event, received, messages, chat_id)
            if outcome == "sent" or outcome == "refused":
                return
            if outcome == "unknown":
                log.warning("reply to %s may have been delivered: not pushed, so it cannot arrive twice", message.chat_key)
                return
            reason = "reply not accepted in time"
        else:
            reason = f"reply token stale after {self._token_age(event, received):.1f}s"
        if self.line.push_fallback:
            await self._push(chat_id, messages)
        else:
            log.warning("%s for %s: reply dropped ([line] push_fallback is off)", reason, message.chat_key)

    @staticmethod
    def _token_age(event: MessageEvent, received: float) -> float:
        """The token lasts about a minute from the event; count from the older of LINE's stamp and our receipt."""
        return max(time.monotonic() - received, time.time() - event.timestamp / 1000)

    # --- LINE's API ---

    async def _call(self, what: str, chat_id: str, send: Callable[[], Awaitable]) -> Attempt:
        """One call to LINE's API, its failure logged and classified (never raised)."""
        try:
            await send()
        except SdkResponseError:
            pass  # accepted (2xx) with a body other than documented
        except ApiException as exc:
            self.metrics.errors.labels(kind="line_api").inc()
            detail = ""
            try:
                detail = _short(json.loads(exc.body).get("message", ""), 200)
            except Exception:  # noqa: BLE001 - no JSON body
                pass
            log.warning("LINE %s for %s failed: HTTP %s %s %s", what, _short(chat_id), exc.status, exc.reason or "", detail)
            if exc.status == 409:
                return Attempt("conflict", 409)
            if exc.status == 429:
                return Attempt("throttled", 429, retry_after_seconds(exc.headers))
            if exc.status is not None and 400 <= exc.status < 500:
                return Attempt("refused", exc.status)
            return Attempt("unknown", exc.status)
        except aiohttp.ClientConnectorError as exc:  # no connection: the request never left
            self.metrics.errors.labels(kind="line_api").inc()
            log.warning("LINE %s for %s failed: %s", what, _short(chat_id), type(exc).__name__)
            return Attempt("unsent")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:  # sent, maybe accepted
            self.metrics.errors.labels(kind="line_api").inc()
            log.warning("LINE %s for %s failed: %s", what, _short(chat_id), type(exc).__name__)
            return Attempt("unknown")
        except Exception as exc:  # noqa: BLE001 - a bug here must cost one message, not the chat's task
            self.metrics.errors.labels(kind="line_api").inc()
            log.error("LINE %s for %s failed: %s", what, _short(chat_id), type(exc).__name__)
            return Attempt("refused")
        return Attempt("sent")

    async def _show_loading(self, chat_id: str) -> None:
        seconds = min(60, max(5, 5 * math.ceil(self.config.queue.deadline_s / 5)))
        # One try: a missing animation is cosmetic, and the reply waits for this call.
        await self._call("loading animation", chat_id, lambda: self._api.show_loading_animation(
            ShowLoadingAnimationRequest(chat_id=chat_id, loading_seconds=seconds), _request_timeout=self._timeout))

    async def _reply(self, event: MessageEvent, received: float, messages: list[TextMessage], chat_id: str) -> str:
        """"sent"; "refused" (an error other than a bad token: pushing would fail alike); "unsent" (LINE refused
        the token or never took the request: a push may send it); "unknown" (an earlier try may have got through).

        The reply API takes no retry key, but its token is spent by the first accepted request: a retry
        after a 5xx or a timeout either gets through or is refused with 400, so it cannot duplicate."""
        request = ReplyMessageRequest(reply_token=event.reply_token, messages=messages)
        maybe_sent = False
        policy = self.retry
        for attempt in range(1, policy.attempts + 1):
            result = await self._call(f"reply (try {attempt}/{policy.attempts})", chat_id, lambda: self._api.reply_message(
                request, _request_timeout=self._timeout))
            if result.outcome == "sent":
                log.info("replied to line:%s (%d message(s))", _short(chat_id), len(messages))
                return "sent"
            if result.outcome == "refused":
                if result.status == 400:  # "Invalid reply token": spent (by us, if maybe_sent) or expired
                    return "unknown" if maybe_sent else "unsent"
                return "refused"
            maybe_sent = maybe_sent or result.outcome == "unknown"
            if attempt == policy.attempts:
                break
            wait = policy.wait_before_retry(attempt, result.retry_after)
            if self._token_age(event, received) + wait >= self.line.reply_token_margin_s:
                log.warning("reply to line:%s: no retry, the token would be stale", _short(chat_id))
                break
            await asyncio.sleep(wait)
        return "unknown" if maybe_sent else "unsent"

    async def _push(self, chat_id: str, messages: list[TextMessage]) -> None:
        """Tries with one X-Line-Retry-Key: LINE sends a key's message once and answers 409 to later tries."""
        request = PushMessageRequest(to=chat_id, messages=messages)
        key = str(uuid.uuid4())
        policy = self.retry
        for attempt in range(1, policy.attempts + 1):
            result = await self._call(f"push (try {attempt}/{policy.attempts})", chat_id, lambda: self._api.push_message(
                request, x_line_retry_key=key, _request_timeout=self._timeout))
            if result.outcome in ("sent", "conflict"):
                log.info("pushed to line:%s (%d message(s))", _short(chat_id), len(messages))
                return
            if not result.retriable or attempt == policy.attempts:
                break
            if result.retry_after is not None and result.retry_after > policy.max_retry_after_s:
                log.error("push to line:%s: LINE asks to wait %.0fs: given up", _short(chat_id), result.retry_after)
                return
            await asyncio.sleep(policy.wait_before_retry(attempt, result.retry_after))
        log.error("push to line:%s failed for good after %d tries", _short(chat_id), attempt)

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


async def _read_capped(request: web.Request, limit: int) -> bytes | None:
    """The request body, or None once it passes `limit` bytes (checked while reading: a chunked body has no
    Content-Length to check first)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)
