"""Calling LINE's Messaging API: reply, push, the loading animation and profile lookups, each call's outcome
classified.

The calls are plain JSON POSTs over one shared aiohttp session. line-bot-sdk's client does the same
with more on the way: its models, serialisation and a session that reads the proxy settings on every
request with a pool of 5 connections per CPU. Under load that cost 397 µs of the daemon's CPU per
reply against 87 µs here (`bench/line_event_cost.py`), and its small pool made calls wait for a
connection until they timed out. The proxy (HTTPS_PROXY, NO_PROXY) is read once, at start.

Timeouts bound connecting and each read (`[line] api_timeout_s`), not the wait for a free
connection: a busy bot queues its calls, it does not fail them. A profile lookup is the exception:
the reply waits for it, and a name is not worth more than the timeout, so it is bounded as a whole.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
import urllib.request
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import quote, urlsplit

import aiohttp

log = logging.getLogger("bunshin.line")

REPLY, PUSH, LOADING = "/v2/bot/message/reply", "/v2/bot/message/push", "/v2/bot/chat/loading/start"
# Who someone is, asked where they wrote: a 1:1 chat's user, or a member of the group or room (which needs no
# friendship with the bot). Each answers 404 for someone who blocked the bot or left.
PROFILE = {"user": "/v2/bot/profile/{user}", "group": "/v2/bot/group/{chat}/member/{user}",
           "room": "/v2/bot/room/{chat}/member/{user}"}
LINE_ID = re.compile(r"[UCR][0-9a-f]{32}")  # a user's, group's or room's id as LINE gives them (fullmatch)
CONNECTIONS = 64  # to LINE's API at once; more calls wait for one of these
MAX_NAME_CHARS = 50  # LINE allows 20; anything longer is not a name worth a line of the prompt


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


def proxy_for(url: str) -> str | None:
    """The proxy the environment sets for `url` (HTTPS_PROXY / HTTP_PROXY, minus NO_PROXY), or None."""
    parts = urlsplit(url)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def loggable(value, limit: int = 40) -> str:
    """An id, an event type or a server's words fit for a log line (they come from others, not from us)."""
    return str(value)[:limit].encode("ascii", "replace").decode()


class LineApi:
    def __init__(self, host: str, access_token: str, timeout_s: float, metrics):
        self.host = host.rstrip("/")
        self.metrics = metrics
        self._auth = {"Authorization": f"Bearer {access_token}"}
        self._headers = {**self._auth, "Content-Type": "application/json"}
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        self._lookup_timeout = aiohttp.ClientTimeout(total=timeout_s)  # the wait for a connection included
        self._proxy = proxy_for(self.host)
        self._session: aiohttp.ClientSession | None = None

    def open(self) -> None:
        """Creates the session (in the running event loop)."""
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONNECTIONS),
                                              timeout=self._timeout, trust_env=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def reply(self, chat_id: str, token: str, messages: list[dict], what: str) -> Attempt:
        return await self._post(what, chat_id, REPLY, {"replyToken": token, "messages": messages})

    async def push(self, chat_id: str, messages: list[dict], retry_key: str, what: str) -> Attempt:
        return await self._post(what, chat_id, PUSH, {"to": chat_id, "messages": messages},
                                {"X-Line-Retry-Key": retry_key})

    async def show_loading(self, chat_id: str, seconds: int) -> Attempt:
        return await self._post("loading animation", chat_id, LOADING, {"chatId": chat_id, "loadingSeconds": seconds})

    async def display_name(self, chat_kind: str, chat_id: str, user_id: str) -> str | None:
        """`user_id`'s LINE display name (on one line), asked in the chat they wrote in (`chat_kind`: "user", "group"
        or "room"); None after a failure, logged: 404 (blocked the bot, left), 429, 5xx, a timeout, an answer without
        a name. One try: the caller keeps the name it had and asks again later."""
        path = PROFILE[chat_kind].format(chat=quote(chat_id, safe=""), user=quote(user_id, safe=""))
        try:
            async with self._session.get(self.host + path, proxy=self._proxy, headers=self._auth,
                                         timeout=self._lookup_timeout) as r:
                answer = await r.read()
                if r.status != 200:
                    self._refused("profile lookup", user_id, r.status, r.reason, r.headers, answer)
                    return None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self.metrics.errors.labels(kind="line_api").inc()
            log.warning("LINE profile lookup for %s failed: %s", loggable(user_id), type(exc).__name__)
            return None
        try:
            name = json.loads(answer).get("displayName")
        except (ValueError, AttributeError):  # not a JSON object
            name = None
        # Whitespace as single spaces: a line break in a name would start a new line of the prompt.
        name = " ".join(name.split())[:MAX_NAME_CHARS] if isinstance(name, str) else ""
        if not name:
            self.metrics.errors.labels(kind="line_api").inc()
            log.warning("LINE profile lookup for %s failed: the answer holds no displayName", loggable(user_id))
            return None
        return name

    async def _post(self, what: str, chat_id: str, path: str, body: dict, headers: dict | None = None) -> Attempt:
        """One call, its failure logged and classified (never raised)."""
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        try:
            async with self._session.post(self.host + path, data=data, proxy=self._proxy,
                                          headers={**self._headers, **headers} if headers else self._headers) as r:
                answer = await r.read()
                if 200 <= r.status < 300:
                    return Attempt("sent", r.status)
                return self._refused(what, chat_id, r.status, r.reason, r.headers, answer)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:  # no connection: never left
            self.metrics.errors.labels(kind="line_api").inc()
            log.warning("LINE %s for %s failed: %s", what, loggable(chat_id), type(exc).__name__)
            return Attempt("unsent")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:  # sent, maybe accepted
            self.metrics.errors.labels(kind="line_api").inc()
            log.warning("LINE %s for %s failed: %s", what, loggable(chat_id), type(exc).__name__)
            return Attempt("unknown")

    def _refused(self, what: str, chat_id: str, status: int, reason: str | None, headers, answer: bytes) -> Attempt:
        self.metrics.errors.labels(kind="line_api").inc()
        try:
            detail = loggable(json.loads(answer).get("message", ""), 200)
        except (ValueError, AttributeError):  # not a JSON object
            detail = ""
        log.warning("LINE %s for %s failed: HTTP %s %s %s", what, loggable(chat_id), status, reason or "", detail)
        if status == 409:
            return Attempt("conflict", 409)
        if status == 429:
            return Attempt("throttled", 429, retry_after_seconds(headers))
        if 400 <= status < 500:
            return Attempt("refused", status)
        return Attempt("unknown", status)
