"""The far side of LINE for tests and benchmarks: a fake Messaging API on loopback, and webhooks as LINE
signs them.

The fake is a real aiohttp server that keeps LINE's delivery rules, so a duplicate would show:
- a reply token is spent by the first accepted reply; using it again answers 400 "Invalid reply token";
- a push with an X-Line-Retry-Key already accepted answers 409 and sends nothing;
- a reply carrying X-Line-Retry-Key answers 400 (LINE takes the key on push, multicast, narrowcast and
  broadcast only);
- a wrong Authorization header answers 401.
Every accepted message request is a Delivery; what failed is in `calls` only.

Profiles: GET PROFILE, GROUP_MEMBER and ROOM_MEMBER answer `profiles[userId]` as LINE's displayName,
and 404 for anyone not in it (LINE: a user who blocked the bot, or left the group). A scripted Fault
answers its status after `hang_s`; Fault(200, hang_s=...) answers the profile, late.

Faults: `script[path]` lists Faults for the next calls to that path (for a profile, to that route:
PROFILE, GROUP_MEMBER or ROOM_MEMBER), in order; `fault_for(path, identity, tries)` (a function)
picks one per call, for load runs. A Fault answers `status`, after delivering first
when `deliver` (LINE took it but the answer was lost), and can hang for `hang_s` before answering, so a
client with a shorter timeout gives up. Only message-sending paths get faults from `fault_for`.

For killing the sender mid-call, a Fault can `hold` the call unanswered until `release()`:
- Fault(200, deliver=True, hold=True): LINE took the message and the answer never comes (killed in flight);
- Fault(lost=True, hold=True): the request never reached LINE (killed before it left): nothing is
  recorded in `calls`, nothing delivered, no token spent; `lost` lists (path, reply token or retry key or
  chat) so the test knows the request was on its way. Once the sender is dead, `release()` lets held
  calls end (the fake's shutdown would otherwise wait for them).

In another process (bench/line_load.py runs the fake apart from the daemon and the sender):
`serving_fake_line(token, control=True)` also answers GET /_fake/state?deliveries=N&calls=M with what
was delivered and called since those counts, and FakeLineMirror keeps a copy of it on the far side.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web

REPLY, PUSH, LOADING = "/v2/bot/message/reply", "/v2/bot/message/push", "/v2/bot/chat/loading/start"
PROFILE = "/v2/bot/profile/{userId}"
GROUP_MEMBER = "/v2/bot/group/{groupId}/member/{userId}"
ROOM_MEMBER = "/v2/bot/room/{roomId}/member/{userId}"


@dataclass(frozen=True)
class Fault:
    status: int = 500
    deliver: bool = False  # accept the message before answering `status`: the answer lies about it
    hang_s: float = 0.0  # wait this long before answering (a client timeout shorter than this gives up)
    retry_after: str | None = None  # a Retry-After header (with 429)
    hold: bool = False  # after delivering (if `deliver`), wait for FakeLineApi.release() before answering
    lost: bool = False  # the request never reached LINE: not recorded, not delivered (see the module's docstring)


@dataclass
class Delivery:
    path: str
    to: str  # the reply token for a reply, the chat id for a push
    retry_key: str | None
    texts: list[str]
    at: float = field(default_factory=time.monotonic)


class FakeLineApi:
    def __init__(self, access_token: str):
        self.access_token = access_token
        self.url = ""
        self.calls: list[dict] = []  # every request: path, route (a profile's), headers, json, status answered
        self.deliveries: list[Delivery] = []
        self.script: dict[str, list[Fault]] = {}
        self.fault_for = None  # (path, identity, tries so far) -> Fault | None
        self.spent_tokens: set[str] = set()
        self.accepted_keys: set[str] = set()
        self.profiles: dict[str, str] = {}  # userId -> displayName; anyone else is not found (404)
        self.tries: Counter = Counter()  # per reply token / retry key
        self.in_flight = 0
        self.latency_s = 0.0  # every call waits this long before it is handled (LINE is ~100 ms away, not 0)
        self.lost: list[tuple[str, str]] = []  # (path, identity) of each request a Fault(lost=True) swallowed
        self._released = asyncio.Event()

    # --- what tests ask ---

    def to(self, path: str) -> list[dict]:
        """The calls to `path`, or to a profile route (PROFILE, GROUP_MEMBER, ROOM_MEMBER)."""
        return [c for c in self.calls if path in (c["path"], c.get("route"))]

    def lookups(self) -> list[dict]:
        """Every profile call, whichever route."""
        return [c for c in self.calls if c.get("route")]

    def delivered(self, path: str | None = None) -> list[Delivery]:
        return [d for d in self.deliveries if path is None or d.path == path]

    def replies_to(self, token: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.path == REPLY and d.to == token]

    def pushes_to(self, chat_id: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.path == PUSH and d.to == chat_id]

    def state_since(self, deliveries: int = 0, calls: int = 0) -> dict:
        """What was delivered and called after the first `deliveries` and `calls` (a mirror's catch-up):
        deliveries whole, calls as path, status (None while unanswered) and retry key."""
        return {
            "deliveries": [[d.path, d.to, d.retry_key, d.texts, d.at] for d in self.deliveries[deliveries:]],
            "calls": [[c["path"], c.get("status"), c["headers"].get("X-Line-Retry-Key")] for c in self.calls[calls:]],
            "in_flight": self.in_flight,
        }

    def release(self) -> None:
        """Lets every held call (Fault(hold=True)) answer, now and from now on."""
        self._released.set()

    # --- the API ---

    async def handle(self, request: web.Request) -> web.Response:
        return await self._in_flight(self._answer, request)

    async def profile(self, request: web.Request) -> web.Response:
        return await self._in_flight(self._profile, request)

    async def _in_flight(self, answer, request: web.Request) -> web.Response:
        """Every call, message or profile: counted in `in_flight` while open, and `latency_s` late."""
        self.in_flight += 1
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            return await answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.Response:
        body = await request.json()
        call = {"path": request.path, "headers": dict(request.headers), "json": body, "at": time.monotonic()}

        def answer(status: int, data: dict, headers: dict | None = None) -> web.Response:
            call["status"] = status
            return web.json_response(data, status=status, headers=headers)

        if request.headers.get("Authorization") != f"Bearer {self.access_token}":
            self.calls.append(call)
            return answer(401, {"message": "Authentication failed. Confirm that the access token in the "
                                           "authorization header is valid."})
        key = request.headers.get("X-Line-Retry-Key")
        identity = body.get("replyToken") if request.path == REPLY else key or body.get("to")
        tries = self.tries[identity]
        self.tries[identity] += 1
        fault = None
        if self.script.get(request.path):
            fault = self.script[request.path].pop(0)
        elif self.fault_for is not None and request.path in (REPLY, PUSH):
            fault = self.fault_for(request.path, identity, tries)
        if fault is not None and fault.lost:  # never reached LINE: it keeps no trace of it
            self.lost.append((request.path, identity))
            await self._released.wait()
            return web.json_response({"message": "fake failure"}, status=fault.status)
        self.calls.append(call)

        if request.path == LOADING:
            if fault:
                await asyncio.sleep(fault.hang_s)
                return answer(fault.status, {"message": "fake failure"})
            return answer(202, {})
        if request.path == REPLY and key:
            return answer(400, {"message": "The retry key is not supported for this API"})
        if request.path == PUSH and key in self.accepted_keys:
            return answer(409, {"message": "The retry key is already accepted"},
                          {"x-line-accepted-request-id": str(uuid.uuid5(uuid.NAMESPACE_URL, key))})
        if request.path == REPLY and body["replyToken"] in self.spent_tokens:
            return answer(400, {"message": "Invalid reply token"})
        if request.path not in (REPLY, PUSH):
            return answer(404, {"message": "Not found"})

        accept = fault is None or fault.deliver
        if accept:
            self._deliver(request.path, body, key)
        if fault is not None:
            if fault.hold:
                await self._released.wait()
            await asyncio.sleep(fault.hang_s)
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
            return answer(fault.status, {"message": "fake failure"}, headers)
        return answer(200, {"sentMessages": [{"id": str(uuid.uuid4().int)[:18], "quoteToken": "q"}
                                             for _ in body["messages"]]})

    async def _profile(self, request: web.Request) -> web.Response:
        route = request.match_info.route.resource.canonical
        call = {"path": request.path, "route": route, "headers": dict(request.headers), "json": None,
                "at": time.monotonic()}
        self.calls.append(call)

        def answer(status: int, data: dict, headers: dict | None = None) -> web.Response:
            call["status"] = status
            return web.json_response(data, status=status, headers=headers)

        if request.headers.get("Authorization") != f"Bearer {self.access_token}":
            return answer(401, {"message": "Authentication failed. Confirm that the access token in the "
                                           "authorization header is valid."})
        if self.script.get(route):
            fault = self.script[route].pop(0)
            await asyncio.sleep(fault.hang_s)
            if fault.status != 200:  # a Fault(200, hang_s=...) is a slow answer, the profile after all
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
                return answer(fault.status, {"message": "fake failure"}, headers)
        user_id = request.match_info["userId"]
        if user_id not in self.profiles:
            return answer(404, {"message": "Not found"})
        profile = {"displayName": self.profiles[user_id], "userId": user_id,
                   "pictureUrl": f"https://profile.line-scdn.net/{user_id}"}
        if route == PROFILE:  # a member profile has no language or status message
            profile |= {"language": "ja", "statusMessage": ""}
        return answer(200, profile)

    def _deliver(self, path: str, body: dict, key: str | None) -> None:
        if path == REPLY:
            self.spent_tokens.add(body["replyToken"])
            to = body["replyToken"]
        else:
            if key:
                self.accepted_keys.add(key)
            to = body["to"]
        self.deliveries.append(Delivery(path, to, key, [m.get("text", "") for m in body["messages"]]))


@asynccontextmanager
async def serving_fake_line(access_token: str, *, control: bool = False, port: int = 0):
    """A FakeLineApi on 127.0.0.1 (`port`, 0 for a free one), in the running event loop; `url` says where.
    With `control`, GET /_fake/state serves `state_since` to a FakeLineMirror in another process."""
    fake = FakeLineApi(access_token)
    app = web.Application()
    for route in (PROFILE, GROUP_MEMBER, ROOM_MEMBER):
        app.router.add_get(route, fake.profile)
    app.router.add_post("/{path:.*}", fake.handle)
    if control:
        async def state(request: web.Request) -> web.Response:
            q = request.query
            return web.json_response(fake.state_since(int(q.get("deliveries", 0)), int(q.get("calls", 0))))

        app.router.add_get("/_fake/state", state)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    fake.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    try:
        yield fake
    finally:
        fake.release()
        await runner.cleanup()


class FakeLineMirror:
    """A FakeLineApi served by another process, as far as counting goes: `deliveries` (Delivery),
    `calls` (path, status, retry key) and `in_flight`, brought up to date by `refresh()`."""

    def __init__(self, url: str):
        self.url = url
        self.deliveries: list[Delivery] = []
        self.calls: list[dict] = []
        self.in_flight = 0

    async def refresh(self, session, *, final: bool = False) -> None:
        """Fetches what is new since the last refresh (`session`: an aiohttp.ClientSession); `final` takes
        calls still unanswered as they are (status None)."""
        async with session.get(f"{self.url}/_fake/state", params={
                "deliveries": str(len(self.deliveries)), "calls": str(len(self.calls))}) as response:
            response.raise_for_status()
            state = await response.json()
        self.deliveries += [Delivery(path, to, key, texts, at) for path, to, key, texts, at in state["deliveries"]]
        # A call's status is set when it is answered: calls still open are fetched again next time.
        new_calls = state["calls"]
        answered = len(new_calls) if final else next((i for i, c in enumerate(new_calls) if c[1] is None), len(new_calls))
        self.calls += [{"path": path, "status": status, "retry_key": key} for path, status, key in new_calls[:answered]]
        self.in_flight = state["in_flight"]

    def to(self, path: str) -> list[dict]:
        return [c for c in self.calls if c["path"] == path]

    def delivered(self, path: str | None = None) -> list[Delivery]:
        return [d for d in self.deliveries if path is None or d.path == path]


# --- webhooks as LINE sends them --------------------------------------------------------------


def sign(raw: bytes, secret: str) -> str:
    """X-Line-Signature: base64 of HMAC-SHA256 of the raw body, keyed with the channel secret."""
    return base64.b64encode(hmac.new(secret.encode(), raw, hashlib.sha256).digest()).decode()


def text_event(text: str, *, user: str, group: str | None = None, room: str | None = None,
               mention_self: bool | None = None,
               event_id: str | None = None, token: str | None = None, redelivery: bool = False,
               timestamp_ms: int | None = None, other_user: str = "U" + "a" * 32) -> dict:
    message = {"type": "text", "id": str(uuid.uuid4().int)[:18], "text": text, "quoteToken": "qt-" + uuid.uuid4().hex}
    if mention_self is not None:
        message["mention"] = {"mentionees": [
            {"index": 0, "length": 3, "type": "user", "userId": "Ubot" if mention_self else other_user,
             **({"isSelf": True} if mention_self else {})}]}
    if group:
        source = {"type": "group", "groupId": group, "userId": user}
    elif room:
        source = {"type": "room", "roomId": room, "userId": user}
    else:
        source = {"type": "user", "userId": user}
    return {
        "type": "message", "mode": "active", "timestamp": timestamp_ms or int(time.time() * 1000), "source": source,
        "webhookEventId": event_id or uuid.uuid4().hex.upper()[:26], "deliveryContext": {"isRedelivery": redelivery},
        "replyToken": token or uuid.uuid4().hex, "message": message,
    }


def webhook(*events: dict) -> dict:
    return {"destination": "U" + "f" * 32, "events": list(events)}


def webhook_bytes(*events: dict) -> bytes:
    return json.dumps(webhook(*events), ensure_ascii=False).encode("utf-8")
