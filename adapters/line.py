"""LINE Messaging API: a webhook on the daemon's HTTP server, replies through LINE's API (line_api.py).

    POST [line] webhook_path ─► size cap ─► X-Line-Signature ─► events ─► inbox (on disk) ─► 200
    dispatcher ─► deliver: reply token (while fresh) | push ([line] push_fallback) | drop, with a log line

LINE waits 2 s for the webhook's answer, and a generation takes longer than that, so events are
answered after it. An event is answered 200 only once it is stored in the bot's inbox (bot/inbox.py),
which also refuses a webhookEventId it already holds: a redelivered event is answered once, also
across a restart, and an event acknowledged just before a crash is answered after it. The webhook
takes events while the model loads too; they are answered once serving starts.

Delivery is exactly once while LINE's own rules can make it so, retried within bounds. A reply token
is spent by the first request LINE accepts and lives about a minute (LINE guarantees one; [line]
reply_token_margin_s is how long we use it): within its life a reply retried after an ambiguous
failure (5xx, timeout, or a crash after the attempt was recorded) either gets through or is refused
as spent, so it is never sent twice. A push carries an X-Line-Retry-Key derived from the event, which
LINE honours for a day (RETRY_KEY_LIFE_S): it sends a key's message once and answers 409 after that.
Before the first try of a reply or a push the attempt is recorded in the inbox, so a restart keeps
these rules.

Past those lives the outcome of an earlier try can no longer be settled: a reply whose token is gone
(the bot was down longer than the token lives, or every try was ambiguous) may or may not have
arrived, and only a push can still deliver it, perhaps a second time. [line] unknown_outcome decides:
"push" (a duplicate is better than a silence) or "drop" (the default: a silence is better than a
duplicate). Either way a warning names the event and its inbox entry, and the inbox keeps the
outcome (`unknown_pushed` / `unknown_dropped`) as the trace. A reply never tried whose token went
stale is pushed only with [line] push_fallback: that risks nothing but the push quota.
429 waits for Retry-After; everything else backs off exponentially with jitter.

Senders are named as LINE's exports name them, by their LINE display name, which the persona learned
them by. A webhook does not carry it, and the webhook answers before anything is asked of LINE: the
name is looked up when the message is answered (`speaker_name`, asked by the dispatcher before the
router) and cached on disk (bot/names.py). `[people]` names someone without a lookup.

Logs name chats, senders and event ids by their ids, never message text, display names or secrets.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import math
import time
import uuid
from dataclasses import dataclass

from aiohttp import web

from bot.http_input import BadBody, header_bytes, is_utf8, parse_json, read_capped
from bot.inbox import InboxError
from bot.messages import Accept, Delivery, InboxEntry, IncomingMessage, RecordAttempt
from bot.names import NameCache, apart_from_persona

from .line_api import LINE_ID, PROFILE, LineApi, RetryPolicy, loggable

log = logging.getLogger("bunshin.line")

MAX_BODY_BYTES = 1024 * 1024  # a webhook body is a few KB; this is far above any real batch of events
MAX_TEXT_UNITS = 5000  # a text message's limit, in UTF-16 code units
MAX_MESSAGES = 5  # message objects per reply or push call
LOADING_AFTER_S = 1.0  # a reply not ready by then shows LINE's loading animation in a 1:1 chat
PUSH_KEYS = uuid.UUID("6f1c1d0e-8a4b-4f1e-9a53-6b756e736869")  # namespace of the X-Line-Retry-Keys derived from events
RETRY_KEY_LIFE_S = 24 * 3600  # LINE honours an X-Line-Retry-Key this long after its first request
SENTENCE_ENDS = "。！？!?."
NAME_REFRESH_S = 24 * 3600  # a display name found is used this long, then asked again: people rename themselves
NAME_RETRY_S = 10 * 60  # after a failed lookup, the name known before (or the placeholder) is used this long


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
    if not hmac.compare_digest(expected, header_bytes(signature)):
        raise WebhookRejected(401, "invalid X-Line-Signature")


@dataclass(frozen=True)
class TextEvent:
    """A LINE text message event, as much of it as the bot uses (what LINE documents for the webhook)."""

    event_id: str  # webhookEventId: the same on a redelivery
    timestamp_ms: int
    reply_token: str | None
    kind: str  # "user" (1:1), "group" or "room"
    chat_id: str  # the user, group or room
    user_id: str  # the sender; "" when LINE leaves it out (a member who does not share a profile)
    text: str
    self_mentions: tuple[tuple[int, int], ...] = ()  # (index, length) of each @mention of the bot itself


def parse_events(body: bytes) -> list[TextEvent]:
    """The text message events in a (verified) webhook body that can be answered; other events and malformed
    ones are skipped. A body that is not a LINE webhook at all raises WebhookRejected(400).

    Read straight from the JSON: line-bot-sdk's webhook models cost 25 µs an event in a loop and up to 210 µs
    under load (bench/results/line_profile.json), for the ten fields used here."""
    try:
        payload = parse_json(body)  # LINE sends UTF-8
    except BadBody as exc:
        raise WebhookRejected(400, f"body is {exc.reason}") from None
    events = payload.get("events") if isinstance(payload, dict) else None
    if not isinstance(events, list):
        raise WebhookRejected(400, 'body has no "events" list')
    return [event for raw in events if (event := _text_message_event(raw)) is not None]


_SOURCE_IDS = {"user": "userId", "group": "groupId", "room": "roomId"}


def _text_message_event(raw) -> TextEvent | None:
    """A text message event we can answer, or None (other events and malformed ones are ignored)."""
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind != "message":
        log.debug("%s event ignored", loggable(kind))
        return None
    event_id, message, source = raw.get("webhookEventId"), raw.get("message"), raw.get("source")
    if not isinstance(message, dict) or message.get("type") != "text":
        log.debug("message event %s that is not text ignored", loggable(event_id))
        return None
    text, timestamp, reply_token = message.get("text"), raw.get("timestamp"), raw.get("replyToken")
    if not (isinstance(event_id, str) and isinstance(text, str) and type(timestamp) is int
            and (reply_token is None or isinstance(reply_token, str))):
        log.warning("malformed message event ignored (%s)", loggable(event_id))
        return None
    chat_kind = source.get("type") if isinstance(source, dict) else None
    chat_id = source.get(_SOURCE_IDS[chat_kind]) if isinstance(chat_kind, str) and chat_kind in _SOURCE_IDS else None
    user_id = source.get("userId") if isinstance(source, dict) else None
    if not (isinstance(chat_id, str) and chat_id) or not (user_id is None or isinstance(user_id, str)):
        log.warning("message event %s without a usable source: ignored", loggable(event_id))
        return None
    # What LINE never sends would fail later, in SQLite or in arithmetic on the timestamp, after the webhook
    # has answered: refuse it here instead.
    if not (event_id and is_utf8(event_id, chat_id, user_id or "", text, reply_token or "")
            and 0 <= timestamp < 2**53):
        log.warning("message event %s with impossible values ignored", loggable(event_id))
        return None
    return TextEvent(event_id, timestamp, reply_token, chat_kind, chat_id, user_id or "", text,
                     _self_mentions(message.get("mention")))


def _self_mentions(mention) -> tuple[tuple[int, int], ...]:
    """(index, length) of the mentionees that are the bot itself ("isSelf": true)."""
    mentionees = mention.get("mentionees") if isinstance(mention, dict) else None
    if not isinstance(mentionees, list):
        return ()
    return tuple((m["index"], m["length"]) for m in mentionees
                 if isinstance(m, dict) and m.get("isSelf") is True
                 and type(m.get("index")) is int and type(m.get("length")) is int)


# --- the adapter ------------------------------------------------------------------------------


def strip_self_mention(text: str, spans) -> str:
    """`text` without the bot's own @mentions (and one space after each), found by (index, length) as LINE gives
    them. LINE counts in UTF-16 code units (an emoji before the mention counts two); a span that does not start
    with "@" that way is tried as code points, and left in place if neither fits."""
    for index, length in sorted(((i, n) for i, n in spans if i >= 0 and n > 0), reverse=True):  # from the end
        units = text.encode("utf-16-le", "surrogatepass")
        if units[2 * index:2 * index + 2] == b"@\x00" and 2 * (index + length) <= len(units):
            head = units[:2 * index].decode("utf-16-le", "surrogatepass")
            tail = units[2 * (index + length):].decode("utf-16-le", "surrogatepass")
        elif text[index:index + 1] == "@" and index + length <= len(text):
            head, tail = text[:index], text[index + length:]
        else:
            continue
        text = head + (tail[1:] if tail[:1] in (" ", "\u3000") else tail)
    return text.strip()


class LineAdapter:
    name = "line"
    retry = RetryPolicy()  # tests shorten the waits

    def __init__(self, config, metrics, persona: str):
        self.config = config
        self.line = config.line
        self.persona = persona
        # Read once, at start: BotConfig.secret raises ConfigError naming the variable, never the value.
        self._secret = config.secret(self.line.channel_secret_env).encode("utf-8")
        self._token = config.secret(self.line.access_token_env)
        self._accept: Accept | None = None  # set by run(); until then, and after close(), the webhook answers 503
        self._api = LineApi(self.line.api_host, self._token, self.line.api_timeout_s, metrics)
        self.people = config.people
        # Opened now, so a file that cannot be used stops the daemon before the model loads (NameCacheError says why).
        self._names = NameCache(NameCache.path_for(config.memory.path))

    def web_routes(self) -> list:
        return [web.post(self.line.webhook_path, self.webhook)]

    # --- the webhook: verify, store, answer ---

    async def webhook(self, request: web.Request) -> web.Response:
        received, received_at = time.monotonic(), time.time()
        try:
            body = await read_capped(request, MAX_BODY_BYTES)
        except BadBody as exc:
            log.warning("webhook from %s rejected: body is %s", request.remote, exc.reason)
            return web.Response(status=400, text=f"body is {exc.reason}")
        if body is None:
            log.warning("webhook from %s rejected: body over %d bytes", request.remote, MAX_BODY_BYTES)
            return web.Response(status=413, text=f"body over {MAX_BODY_BYTES} bytes")
        try:
            verify_signature(body, request.headers.get("X-Line-Signature"), self._secret)
            events = parse_events(body)
        except WebhookRejected as exc:
            log.warning("webhook from %s rejected: %s", request.remote, exc.reason)
            return web.Response(status=exc.status, text=exc.reason)
        accept = self._accept
        if accept is None:  # not started, or closed: LINE redelivers later (if redelivery is on)
            return web.Response(status=503, text="not serving")
        messages = [self._incoming(event, received, received_at) for event in events]
        try:
            taken = await accept(messages)
        except InboxError:  # logged by the inbox; a 500 lets LINE redeliver the events
            return web.Response(status=500, text="could not store the events")
        for message, entry in zip(messages, taken, strict=True):
            if entry is None:
                log.info("event %s delivered again: already taken", loggable(message.event_id))
        return web.Response(status=200, text="OK")

    def _incoming(self, event: TextEvent, received: float, received_at: float) -> IncomingMessage:
        return IncomingMessage(
            platform="line",
            chat_id=event.chat_id,
            # A group member who has not agreed to share their profile comes without a userId: such senders
            # share one rate-limit bucket per chat, not one for every chat the bot is in.
            user_id=event.user_id or f"unknown-in-{event.chat_id}",
            # Until speaker_name finds the real name (the webhook does not wait for LINE's API), and when it cannot:
            # the id's tail tells speakers apart.
            user_name=f"LINE user {event.user_id[-4:]}" if event.user_id else "LINE user",
            # Its own @mention is not part of what was said (as Discord's platform adapter drops its own); a bare
            # mention, with nothing else, is kept, so that being called still gets an answer.
            text=(strip_self_mention(event.text, event.self_mentions) or event.text) if event.self_mentions else event.text,
            addressed=self._addressed(event),
            received=received,
            event_id=event.event_id,
            received_at=received_at,
            delivery={"kind": event.kind, "reply_token": event.reply_token, "event_ms": event.timestamp_ms},
        )

    def _addressed(self, event: TextEvent) -> bool:
        if event.kind == "user" or event.self_mentions:
            return True
        return self.line.call_by_name and bool(self.persona) and self.persona in event.text

    # --- answering an entry of the inbox ---

    async def speaker_name(self, message: IncomingMessage) -> str:
        """The sender's name as the persona learned it: [people], else their LINE display name, cached; never the
        persona's own (bot/names.py). Asked by the dispatcher before the router, so the reply waits for a lookup, at
        most [line] api_timeout_s.

        A display name found is used for NAME_REFRESH_S, then asked again. A failed lookup keeps the name found
        before, else the placeholder (`LINE user 1a2b`), for NAME_RETRY_S: not asked again on every message."""
        return apart_from_persona(await self._name(message), self.persona)

    async def _name(self, message: IncomingMessage) -> str:
        mapped = self.people.get(message.user_key)
        if mapped is not None:
            return mapped
        chat_kind = message.delivery.get("kind")
        if chat_kind not in PROFILE or not (LINE_ID.fullmatch(message.user_id) and LINE_ID.fullmatch(message.chat_id)):
            return message.user_name  # no userId (a member who does not share a profile), or not an id of LINE's
        cached = self._names.get(message.user_key)
        if cached is not None and not cached.due(time.time()):
            return cached.name or message.user_name
        name = await self._api.display_name(chat_kind, message.chat_id, message.user_id)
        if name is not None:
            self._names.put(message.user_key, name, time.time() + NAME_REFRESH_S)
            return name
        known = cached.name if cached is not None else None
        self._names.put(message.user_key, known, time.time() + NAME_RETRY_S)
        return known or message.user_name

    def can_deliver(self, entry: InboxEntry) -> bool:
        """False, with the log line, for a reply token gone stale while push_fallback is off (and nothing was sent
        yet): making a reply would be for nobody. It happens after a long wait: a restart, or overload."""
        message = entry.message
        if self.line.push_fallback or entry.attempts or self._token_fresh(message):
            return True
        log.warning("reply token stale after %.1fs for %s: reply dropped ([line] push_fallback is off)",
                    self._token_age(message), _which(entry))
        return False

    @contextlib.asynccontextmanager
    async def working(self, entry: InboxEntry):
        """LINE's loading animation in a 1:1 chat while the reply is made, once it has taken LOADING_AFTER_S: a quick
        answer (a short reply, "busy", "too fast") needs none, and would pay for a second API call. Not for a
        message recovered after a restart."""
        message = entry.message
        loading, asked = None, asyncio.Event()
        if message.delivery.get("kind") == "user" and message.addressed and not entry.recovered:
            loading = asyncio.create_task(self._show_loading(message.chat_id, asked))
        try:
            yield
        finally:
            if loading is not None:
                if not asked.is_set():
                    loading.cancel()  # the reply was ready before the animation was asked for
                await asyncio.wait({loading})  # once asked for, it must start before the reply, or it shows after it

    async def deliver(self, entry: InboxEntry, reply: str, record_attempt: RecordAttempt) -> Delivery:
        """Only ever to the chat the event came from: the reply token is that chat's, and so is the chat id."""
        messages = [{"type": "text", "text": piece} for piece in split_reply(reply)]
        if not messages:
            return Delivery.QUIET
        message = entry.message
        pushed_at = entry.attempted("push")
        if pushed_at is not None:
            # Pushed before a restart, maybe delivered: the same retry key makes LINE send it at most once, for a day.
            if time.time() - pushed_at < RETRY_KEY_LIFE_S:
                return await self._push(entry, messages, record_attempt)
            return await self._unknown(entry, messages, record_attempt,
                                       "its push was tried over a day ago, when the retry key stopped guarding it")
        if entry.attempted("reply") is not None:
            # Replied before a restart (the request may or may not have left). While the token lives, trying it again
            # is exactly-once: LINE takes it, or refuses it as spent by the earlier try.
            if not self._token_fresh(message):
                return await self._unknown(entry, messages, record_attempt,
                                           f"its reply was tried before a restart and its token is now "
                                           f"{self._token_age(message):.0f}s old")
            outcome = await self._reply(entry, messages, record_attempt, retried=True)
        elif self._token_fresh(message):
            outcome = await self._reply(entry, messages, record_attempt)
        else:
            outcome = "stale"
        if outcome == "sent":
            return Delivery.REPLIED
        if outcome == "refused":
            return Delivery.FAILED
        if outcome == "spent":
            log.warning("reply to %s may have been delivered: not pushed, so it cannot arrive twice (its token was "
                        "refused as spent after a try that may have got through)", _which(entry))
            return Delivery.MAYBE_DELIVERED
        if outcome == "unknown":
            return await self._unknown(entry, messages, record_attempt,
                                       "its reply may have got through, and its token ran out before a try could tell")
        reason = ("reply not accepted in time" if outcome == "unsent"
                  else f"reply token stale after {self._token_age(message):.1f}s")
        if self.line.push_fallback:
            return await self._push(entry, messages, record_attempt)
        log.warning("%s for %s: reply dropped ([line] push_fallback is off)", reason, _which(entry))
        return Delivery.DROPPED

    async def _unknown(self, entry: InboxEntry, messages: list[dict], record_attempt: RecordAttempt, why: str) -> Delivery:
        """An earlier try may have delivered the reply and nothing can tell any more: [line] unknown_outcome decides
        whether to risk a duplicate. The warning names the event (never the text); the outcome stays in the inbox."""
        if self.line.unknown_outcome == "push":
            log.warning('reply to %s: outcome unknown (%s): pushed ([line] unknown_outcome = "push"), so it may arrive '
                        "twice", _which(entry), why)
            outcome = await self._push(entry, messages, record_attempt)
            return Delivery.UNKNOWN_PUSHED if outcome == Delivery.REPLIED else outcome
        log.warning('reply to %s: outcome unknown (%s): not sent again ([line] unknown_outcome = "drop"), so it may '
                    "never have arrived", _which(entry), why)
        return Delivery.UNKNOWN_DROPPED

    def _token_fresh(self, message: IncomingMessage) -> bool:
        """The event has a reply token young enough to use ([line] reply_token_margin_s)."""
        return bool(message.delivery.get("reply_token")) and self._token_age(message) < self.line.reply_token_margin_s

    def _token_age(self, message: IncomingMessage) -> float:
        """The token lasts about a minute from the event; count from the older of LINE's stamp and our receipt."""
        now = time.time()
        return max(now - message.received_at, now - message.delivery.get("event_ms", 0) / 1000)

    # --- LINE's API ---

    async def _show_loading(self, chat_id: str, asked: asyncio.Event) -> None:
        await asyncio.sleep(LOADING_AFTER_S)
        asked.set()
        seconds = min(60, max(5, 5 * math.ceil(self.config.queue.deadline_s / 5)))
        # One try: a missing animation is cosmetic, and the reply waits for this call.
        await self._api.show_loading(chat_id, seconds)

    async def _reply(self, entry: InboxEntry, messages: list[dict], record_attempt: RecordAttempt,
                     retried: bool = False) -> str:
        """"sent"; "refused" (an error other than a bad token: pushing would fail alike); "unsent" (LINE refused
        the token or never took the request: a push may send it); "spent" (the token was refused after a try that
        may have got through: that try spent it); "unknown" (a try may have got through, and the token's life ran
        out before a try could tell).

        The reply API takes no retry key, but its token is spent by the first accepted request: a retry
        after a 5xx or a timeout either gets through or is refused with 400, so it cannot duplicate.
        `retried`: an earlier run tried it already, so a 400 may mean it was spent by that try."""
        message = entry.message
        chat_id = message.chat_id
        token = message.delivery["reply_token"]
        maybe_sent = retried
        policy = self.retry
        await record_attempt("reply")
        for attempt in range(1, policy.attempts + 1):
            result = await self._api.reply(chat_id, token, messages, f"reply (try {attempt}/{policy.attempts})")
            if result.outcome == "sent":
                log.info("replied to %s (%d message(s))", _which(entry), len(messages))
                return "sent"
            if result.outcome == "refused":
                if result.status == 400:  # "Invalid reply token": spent (by us, if maybe_sent) or expired
                    return "spent" if maybe_sent else "unsent"
                return "refused"
            maybe_sent = maybe_sent or result.outcome == "unknown"
            if attempt == policy.attempts:
                break
            wait = policy.wait_before_retry(attempt, result.retry_after)
            if self._token_age(message) + wait >= self.line.reply_token_margin_s:
                log.warning("reply to %s: no retry, the token would be stale", _which(entry))
                break
            await asyncio.sleep(wait)
        return "unknown" if maybe_sent else "unsent"

    async def _push(self, entry: InboxEntry, messages: list[dict], record_attempt: RecordAttempt) -> Delivery:
        """Tries with one X-Line-Retry-Key, derived from the event so that a restart reuses it: LINE sends a key's
        message once and answers 409 to later tries. "replied", or "failed" after the last try."""
        chat_id = entry.message.chat_id
        key = str(uuid.uuid5(PUSH_KEYS, entry.key))
        policy = self.retry
        await record_attempt("push")
        for attempt in range(1, policy.attempts + 1):
            result = await self._api.push(chat_id, messages, key, f"push (try {attempt}/{policy.attempts})")
            if result.outcome in ("sent", "conflict"):
                log.info("pushed to %s (%d message(s))", _which(entry), len(messages))
                return Delivery.REPLIED
            if not result.retriable or attempt == policy.attempts:
                break
            if result.retry_after is not None and result.retry_after > policy.max_retry_after_s:
                log.error("push to %s: LINE asks to wait %.0fs: given up", _which(entry), result.retry_after)
                return Delivery.FAILED
            await asyncio.sleep(policy.wait_before_retry(attempt, result.retry_after))
        log.error("push to %s failed for good after %d tries", _which(entry), attempt)
        return Delivery.FAILED

    # --- lifecycle ---

    async def run(self, accept: Accept, stopping: asyncio.Event) -> None:
        """Takes webhooks from now on (while the model loads too). After `stopping` the webhook still stores what
        comes, for the next start, until close()."""
        self._api.open()
        self._accept = accept
        log.info("LINE webhook on %s", self.line.webhook_path)
        await stopping.wait()

    async def close(self) -> None:
        self._accept = None  # new webhooks get 503 from here on
        await self._api.close()
        self._names.close()



def _which(entry: InboxEntry) -> str:
    """An inbox entry as log lines name it: chat, LINE's webhookEventId and the inbox's id (never its text), so the
    operator can find it in the inbox (`SELECT outcome FROM entries WHERE event_id = ...`)."""
    message = entry.message
    return f"line:{loggable(message.chat_id)} (event {loggable(message.event_id)}, inbox entry {entry.id})"
