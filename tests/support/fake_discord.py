"""A fake Discord for the Discord platform adapter's tests: its REST API and gateway on 127.0.0.1, recording what
the client sent, and gateway payloads shaped as Discord sends them (MESSAGE_CREATE, GUILD_CREATE).

`serving_fake_discord(monkeypatch)` starts the fake and points discord.py's own client at it; tests take it as the
`fake_discord` fixture (tests/conftest.py). `deliver` hands a message over as the gateway would and answers it the
bot's way: a real inbox (SQLite, in memory) and the real dispatcher, one per adapter and router, closed when the
fake stops.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import weakref
from contextlib import asynccontextmanager

import discord
import yarl
from aiohttp import WSMsgType, web

from adapters.discord import DiscordAdapter
from bot.dispatcher import Dispatcher
from bot.inbox import Inbox
from bot.metrics import BotMetrics

TOKEN_ENV = "DISCORD_BOT_TOKEN"
BOT_ID, ALICE_ID, BOB_ID, OTHER_BOT_ID = 1100000000000000001, 1200000000000000001, 1200000000000000002, 1100000000000000009
GUILD_ID, OTHER_GUILD_ID = 1300000000000000001, 1300000000000000002
CHANNEL_ID, OTHER_CHANNEL_ID, DM_ID = 1400000000000000001, 1400000000000000002, 1400000000000000009
TIMESTAMP = "2024-05-01T12:00:00.000000+00:00"
MESSAGE_CONTENT_INTENT = 1 << 15

BOT_USER = {"id": str(BOT_ID), "username": "misaki-bot", "global_name": None, "discriminator": "0", "avatar": None,
            "bot": True, "verified": True, "mfa_enabled": False, "flags": 0, "public_flags": 0}
ALICE = {"id": str(ALICE_ID), "username": "alice", "global_name": "Alice", "discriminator": "0", "avatar": None,
         "public_flags": 0}
BOB = {"id": str(BOB_ID), "username": "bob", "global_name": "Bob", "discriminator": "0", "avatar": None, "public_flags": 0}
OTHER_BOT = {"id": str(OTHER_BOT_ID), "username": "helper", "global_name": None, "discriminator": "0", "avatar": None,
             "bot": True, "public_flags": 0}
APPLICATION = {"id": str(BOT_ID), "name": "misaki", "description": "", "icon": None, "bot_public": True,
               "bot_require_code_grant": False, "owner": ALICE, "verify_key": "0" * 64, "flags": 0, "summary": ""}


def guild_payload(guild_id: int = GUILD_ID, channels=((CHANNEL_ID, "general"), (OTHER_CHANNEL_ID, "random"))) -> dict:
    return {
        "id": str(guild_id), "name": "friends", "owner_id": str(ALICE_ID), "icon": None, "features": [],
        "roles": [{"id": str(guild_id), "name": "@everyone", "permissions": "1071698660929", "position": 0, "color": 0,
                   "hoist": False, "managed": False, "mentionable": False, "flags": 0}],
        "channels": [{"id": str(cid), "type": 0, "name": name, "guild_id": str(guild_id), "position": i,
                      "permission_overwrites": [], "nsfw": False, "parent_id": None, "topic": None}
                     for i, (cid, name) in enumerate(channels)],
        "emojis": [], "stickers": [], "member_count": 3,
    }


_ids = itertools.count(1500000000000000001)


def member(nick: str | None = None) -> dict:
    return {"roles": [], "joined_at": TIMESTAMP, "deaf": False, "mute": False, "flags": 0, "nick": nick}


def message_payload(content: str, *, author: dict = ALICE, channel_id: int = CHANNEL_ID, guild_id: int | None = GUILD_ID,
                    mentions=(), mention_everyone: bool = False, replying_to: dict | None = None,
                    nicks: dict[str, str] | None = None) -> dict:
    """A MESSAGE_CREATE event's `d`, shaped as Discord sends it; `nicks`: server nicknames by user id."""
    nicks = nicks or {}
    data = {
        "id": str(next(_ids)), "channel_id": str(channel_id), "author": author, "content": content,
        "timestamp": TIMESTAMP, "edited_timestamp": None, "tts": False, "mention_everyone": mention_everyone,
        "mentions": [{**user, "member": member(nicks.get(user["id"]))} if guild_id else user for user in mentions],
        "mention_roles": [], "attachments": [], "embeds": [], "components": [], "pinned": False,
        "type": 0, "flags": 0, "nonce": str(next(_ids)),
    }
    if guild_id:
        data["guild_id"] = str(guild_id)
        data["member"] = member(nicks.get(author["id"]))
    if replying_to is not None:
        data["type"] = 19
        data["message_reference"] = {"type": 0, "message_id": replying_to["id"], "channel_id": replying_to["channel_id"],
                                     **({"guild_id": str(guild_id)} if guild_id else {})}
        data["referenced_message"] = replying_to
    return data


ERRORS = {403: "Missing Permissions", 503: "Service Unavailable"}


def json_response(data: dict, status: int = 200) -> web.Response:
    # Exactly "application/json", as Discord sends it (discord.py does not parse "...; charset=utf-8").
    return web.Response(body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"})


class FakeDiscord:
    """Discord's REST API and gateway, on loopback, recording what the client sends."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict | None]] = []
        self.fail_messages: int | None = None  # an HTTP status for POST .../messages
        # One entry per coming POST .../messages: None (sent), an HTTP status, or "drop": recorded as sent,
        # then the connection closed before any answer (the message went out; the client cannot know).
        self.message_outcomes: list[int | str | None] = []
        self.message_posts = asyncio.Condition()  # notified on every POST .../messages, sent or refused
        self.by_nonce: dict[str, dict] = {}  # enforce_nonce: a nonce seen again returns the message it made
        self.gateway_mode = "refuse_intents"  # or "serve": READY, then `events`
        self.events: list[dict] = []
        self.identify: dict | None = None
        self.app = web.Application()
        self.app.router.add_route("*", "/api/v10/{path:.*}", self.rest)
        self.app.router.add_get("/gateway", self.gateway)

    async def wait_for_message_posts(self, count: int) -> None:
        async with self.message_posts:
            await asyncio.wait_for(self.message_posts.wait_for(lambda: len(self.posts("messages")) >= count), 20)

    def posts(self, kind: str) -> list[dict]:
        return [body for method, path, body in self.requests if method == "POST" and path.endswith("/" + kind)]

    async def rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["path"]
        body = await request.json() if request.can_read_body else None
        self.requests.append((request.method, path, body))
        if path == "/users/@me":
            return json_response(BOT_USER)
        if path == "/oauth2/applications/@me":
            return json_response(APPLICATION)
        if path.endswith("/typing"):
            return web.Response(status=204)
        if path.endswith("/messages") and request.method == "POST":
            async with self.message_posts:
                self.message_posts.notify_all()
            outcome = self.message_outcomes.pop(0) if self.message_outcomes else self.fail_messages
            if outcome == "drop":
                request.transport.close()
                return web.Response(status=200)
            if outcome:
                return json_response({"message": ERRORS.get(outcome, "Missing Permissions"), "code": 0 if outcome >= 500 else 50013},
                                     status=outcome)
            if body.get("enforce_nonce") and body.get("nonce") in self.by_nonce:
                return json_response(self.by_nonce[body["nonce"]])  # Discord: the same message, not a new one
            channel_id = path.split("/")[2]
            sent = {"id": str(next(_ids)), "channel_id": channel_id, "author": BOT_USER, "content": body["content"],
                    "timestamp": TIMESTAMP, "edited_timestamp": None, "tts": False, "mention_everyone": False,
                    "mentions": [], "mention_roles": [], "attachments": [], "embeds": [], "components": [],
                    "pinned": False, "type": 19 if body.get("message_reference") else 0, "flags": 0}
            if body.get("enforce_nonce") and body.get("nonce"):
                self.by_nonce[body["nonce"]] = sent
            return json_response(sent)
        return json_response({"message": "404: Not Found", "code": 0}, status=404)

    async def gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(timeout=1.0)
        await ws.prepare(request)
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": 45000}, "s": None, "t": None})
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                break
            payload = msg.json()
            if payload["op"] == 1:
                await ws.send_json({"op": 11, "d": None, "s": None, "t": None})
            elif payload["op"] == 2:
                self.identify = payload["d"]
                if self.gateway_mode == "refuse_intents":
                    await ws.close(code=4014, message=b"Disallowed intent(s).")
                    break
                ready = {"v": 10, "user": BOT_USER, "guilds": [], "session_id": "s1", "private_channels": [],
                         "relationships": [], "resume_gateway_url": str(request.url.with_path("/gateway")),
                         "application": {"id": str(BOT_ID), "flags": 0}}
                await ws.send_json({"op": 0, "t": "READY", "s": 1, "d": ready})
                for seq, event in enumerate(self.events, start=2):
                    await ws.send_json({"op": 0, "t": "MESSAGE_CREATE", "s": seq, "d": event})
        return ws


@asynccontextmanager
async def serving_fake_discord(monkeypatch):
    """The fake on a free loopback port, discord.py's REST and gateway addresses pointed at it and a token in
    TOKEN_ENV (monkeypatch puts Discord's addresses back afterwards). On exit, the inboxes `deliver` opened
    are closed."""
    fake = FakeDiscord()
    runner = web.AppRunner(fake.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    monkeypatch.setattr(discord.http.Route, "BASE", f"http://127.0.0.1:{port}/api/v10")
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(f"ws://127.0.0.1:{port}/gateway"))
    monkeypatch.setenv(TOKEN_ENV, "test-token")
    try:
        yield fake
    finally:
        await runner.cleanup()
        while _inboxes:
            _inboxes.pop().close()


# One bot (inbox + dispatcher) per platform adapter and router of a test; the inboxes are closed when the
# fake stops (serving_fake_discord).
_bots: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_inboxes: list[Inbox] = []


def bot_for(adapter: DiscordAdapter, router) -> Dispatcher:
    per_router = _bots.setdefault(adapter, {})
    if id(router) not in per_router:
        inbox = Inbox(":memory:")
        _inboxes.append(inbox)
        dispatcher = Dispatcher(inbox, {"discord": adapter}, BotMetrics())
        dispatcher.start(router)
        per_router[id(router)] = dispatcher
    return per_router[id(router)]




def parse(adapter: DiscordAdapter, payload: dict) -> discord.Message:
    """What discord.py's ConnectionState.parse_message_create builds from the event."""
    state = adapter.client._connection
    channel, _ = state._get_guild_channel(payload)
    return discord.Message(state=state, channel=channel, data=payload)


async def deliver(adapter: DiscordAdapter, router, payload: dict) -> None:
    """The message as the gateway hands it over, answered the bot's way (inbox, dispatcher, deliver)."""
    dispatcher = bot_for(adapter, router)
    await adapter.on_message(parse(adapter, payload), dispatcher.accept)
    await dispatcher.idle()
