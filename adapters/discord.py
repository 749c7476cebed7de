"""Discord: a discord.py client in the daemon's event loop.

    gateway MESSAGE_CREATE ─► on_message ─► allowed? addressed? ─► accept([IncomingMessage]) (the bot's inbox)
    dispatcher ─► deliver(entry, reply) ─► reply(s) to the message

The bot answers a mention of itself, any DM, and a reply to one of its own messages; everything
else it is allowed to see is handed to the router with addressed=False, so the channel's memory
(chat_id = the channel or thread id) knows what was said before the next question. When a message
replies to another, the replied-to message goes to the router first as an unaddressed message,
unless the adapter handed it over or sent it itself recently (then it is in memory already).

People are named as DiscordChatExporter's exports, and so the training data, name them: by the
account's `name` (the unique username), not a server nickname or global display name, which change
and are not what the persona learned; `[people]` names someone otherwise. The persona's name is the
bot's own messages' alone (bot/names.py).

Rate limits, reconnects and resumes are discord.py's job. A reply that cannot be sent is logged,
and the next message is answered as usual.

A message accepted before a crash is answered after the restart, as a reply to its message id, if it
is younger than [discord] answer_missed_within_s. Every part of a reply carries a nonce derived from
the message id, which Discord enforces for a few minutes: a part sent again after a crash is not
posted twice. (Messages sent while the bot was down are not fetched: the gateway does not replay them.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import defaultdict, deque

import aiohttp
import discord

from bot.messages import Accept, Delivery, InboxEntry, IncomingMessage, RecordAttempt
from bot.names import apart_from_persona

log = logging.getLogger("bunshin.discord")

MESSAGE_LIMIT = 2000  # characters per Discord message
# What the bot writes never pings anyone: not @everyone, not a role, not a user, not the author it replies to.
NO_MENTIONS = discord.AllowedMentions.none()
# View Channels, Send Messages, Send Messages in Threads, Read Message History (needed to reply).
INVITE_PERMISSIONS = discord.Permissions(view_channel=True, send_messages=True, send_messages_in_threads=True,
                                         read_message_history=True)
INTENT_HELP = (
    "Discord refused the connection (close code 4014): the bot asks for the Message Content intent, "
    "which is not enabled for this application. Open https://discord.com/developers/applications, "
    "choose the application, Bot, Privileged Gateway Intents, turn on MESSAGE CONTENT INTENT, save, "
    "and start the bot again."
)
_ANSWERED_TYPES = (discord.MessageType.default, discord.MessageType.reply)
# Discord enforces a message nonce "in the past few minutes": a send recorded longer ago than this is not
# repeated after a restart (it may have gone out, and the nonce would no longer stop a second copy).
NONCE_WINDOW_S = 120


class DiscordStartError(RuntimeError):
    """The client could not connect for a reason a restart will not fix (token, intents)."""


class DiscordAdapter:
    name = "discord"

    def __init__(self, config, metrics, persona: str):
        self.config = config.discord
        self.persona = persona
        # Read now, so a missing variable stops the daemon before the model loads (ConfigError names it).
        self._token = config.secret(self.config.token_env)
        self.allow_guilds = {int(i) for i in self.config.allow_guilds}
        self.allow_channels = {int(i) for i in self.config.allow_channels}
        self.allow_users = {int(i) for i in self.config.allow_users}
        self.reset_commands = {c.strip() for c in config.memory.reset_commands}
        self.is_admin = config.is_admin
        self.people = config.people
        # Per channel, the ids of messages already in the router's memory (handed over or sent by us).
        self._recent: defaultdict[int, deque[int]] = defaultdict(lambda: deque(maxlen=config.memory.max_turns))
        self._live: dict[str, discord.Message] = {}  # addressed messages of this run, until their reply is sent
        self._connection: asyncio.Task | None = None
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: enabled in the Developer Portal (see README)
        self.client = discord.Client(intents=intents, allowed_mentions=NO_MENTIONS)

    def web_routes(self) -> list:
        return []  # the gateway is a websocket the client opens; nothing to serve

    async def run(self, accept: Accept, stopping: asyncio.Event) -> None:
        """Connects and hands every message to `accept` until `stopping` (the connection stays open for the
        replies still being made: close() ends it)."""
        client = self.client

        async def on_ready():
            log.info("connected to Discord as %s (id %s) in %d servers; invite: %s", client.user, client.user.id,
                     len(client.guilds), discord.utils.oauth_url(client.user.id, permissions=INVITE_PERMISSIONS, scopes=("bot",)))

        async def on_message(message: discord.Message):
            await self.on_message(message, accept)

        client.event(on_ready)
        client.event(on_message)
        self._connection = asyncio.create_task(client.start(self._token), name="discord-gateway")
        stop = asyncio.create_task(stopping.wait())
        try:
            await asyncio.wait({self._connection, stop}, return_when=asyncio.FIRST_COMPLETED)
            if self._connection.done():
                self._connection.result()  # raises why it ended
        except discord.PrivilegedIntentsRequired:
            log.error("%s", INTENT_HELP)
            await client.close()
            raise DiscordStartError(INTENT_HELP) from None
        except discord.LoginFailure:
            why = (f"Discord rejected the bot token in the environment variable {self.config.token_env}: "
                   "copy it again from the Developer Portal (Bot, Reset Token)")
            log.error("%s", why)
            await client.close()
            raise DiscordStartError(why) from None
        finally:
            stop.cancel()

    async def close(self) -> None:
        await self.client.close()
        connection = self._connection
        if connection is not None:
            if not connection.done():
                await asyncio.wait({connection}, timeout=5)
            if connection.done() and not connection.cancelled():
                connection.exception()  # retrieved: its failure, if any, was reported by run()
        self._live.clear()

    async def on_message(self, message: discord.Message, accept: Accept) -> None:
        """One message from the gateway: decide, and hand it (with what it replies to) to the bot's inbox."""
        try:
            await self._on_message(message, accept)
        except Exception:  # one bad message must not take the platform adapter down
            log.exception("failed to take message %s in channel %s", message.id, message.channel.id)

    async def _on_message(self, message: discord.Message, accept: Accept) -> None:
        me = self.client.user
        author = message.author
        if author.id == me.id or message.type not in _ANSWERED_TYPES or not self._allowed(message):
            return  # its own replies are in memory already; joins, pins and the like are not conversation
        addressed = self._addressed(message) and (not author.bot or self.config.answer_bots)
        channel_id = message.channel.id
        recent = self._recent[channel_id]
        text = self._readable(message)
        if addressed and text.strip() in self.reset_commands and self.is_admin(f"discord:{author.id}"):
            recent.clear()  # the router forgets the chat, so do we (a non-admin's reset is refused there)

        taken = []
        replied_to = message.reference.resolved if message.reference else None
        if isinstance(replied_to, discord.Message) and replied_to.id not in recent:
            taken.append(self._incoming(replied_to, self._name_of(replied_to.author), self._readable(replied_to),
                                        addressed=False))
            recent.append(replied_to.id)
        taken.append(self._incoming(message, self._name_of(author), text, addressed))
        recent.append(message.id)
        if addressed:
            self._live[str(message.id)] = message  # for the typing indicator and the reply, until it is sent
        entries = await accept(taken)
        if addressed and entries[-1] is None:
            self._live.pop(str(message.id), None)  # seen before: answered (or being answered) already

    def _name_of(self, user: discord.abc.User) -> str:
        """What the persona calls a user: the bot itself the persona, others as [people] says, else by account name."""
        if user.id == self.client.user.id:
            return self.persona
        return apart_from_persona(self.people.get(f"discord:{user.id}") or user.name, self.persona)

    def _incoming(self, message: discord.Message, speaker: str, text: str, addressed: bool) -> IncomingMessage:
        return IncomingMessage(
            "discord", str(message.channel.id), str(message.author.id), speaker, text, addressed,
            event_id=str(message.id),
            delivery={"channel_id": str(message.channel.id), "message_id": str(message.id),
                      "guild_id": str(message.guild.id) if message.guild is not None else None},
        )

    # --- answering an entry of the inbox ---

    def can_deliver(self, entry: InboxEntry) -> bool:
        """A message of this run, or one from an earlier run younger than [discord] answer_missed_within_s."""
        incoming = entry.message
        if incoming.event_id in self._live:
            return True
        age = time.time() - incoming.received_at
        if age > self.config.answer_missed_within_s:
            log.warning("message %s in channel %s not answered: %.0fs old ([discord] answer_missed_within_s is %g)",
                        incoming.event_id, incoming.chat_id, age, self.config.answer_missed_within_s)
            return False
        return True

    def working(self, entry: InboxEntry) -> contextlib.AbstractAsyncContextManager:
        """The typing indicator (renewed every few seconds by discord.py) while the reply is made."""
        message = self._live.get(entry.message.event_id)
        return _typing(message.channel) if message is not None else contextlib.nullcontext()

    async def deliver(self, entry: InboxEntry, reply: str, record_attempt: RecordAttempt) -> Delivery:
        """The reply as an answer to the message, in as many messages as it takes."""
        incoming = entry.message
        message = self._live.pop(incoming.event_id, None)
        if message is not None:
            channel = message.channel
            reference = message.to_reference(fail_if_not_exists=False)
        else:  # accepted by an earlier run (the dispatcher asked can_deliver first)
            guild_id = int(incoming.delivery["guild_id"]) if incoming.delivery.get("guild_id") else None
            channel = await self._channel(int(incoming.delivery["channel_id"]), guild_id)
            if channel is None:
                return Delivery.FAILED
            reference = discord.MessageReference(message_id=int(incoming.event_id), channel_id=channel.id,
                                                 guild_id=guild_id, fail_if_not_exists=False)
        sent_before = entry.attempted("send")
        if sent_before is not None and time.time() - sent_before > NONCE_WINDOW_S:
            log.warning("reply to message %s in channel %s may have been sent before the restart: not sent again",
                        incoming.event_id, incoming.chat_id)
            return Delivery.MAYBE_DELIVERED
        await record_attempt("send")
        return await self._send(channel, incoming, reference, reply)

    async def _channel(self, channel_id: int, guild_id: int | None):
        """Where to answer a message from an earlier run: the cached channel once connected, else a channel known by
        its id alone (sending needs nothing more, and no API call is spent finding it)."""
        try:
            await asyncio.wait_for(self.client.wait_until_ready(), timeout=60)
        except asyncio.TimeoutError:
            log.warning("not connected to Discord after 60s: cannot answer in channel %s", channel_id)
            return None
        return self.client.get_channel(channel_id) or self.client.get_partial_messageable(channel_id, guild_id=guild_id)

    def _allowed(self, message: discord.Message) -> bool:
        if self.allow_users and message.author.id not in self.allow_users:
            return False
        if message.guild is None:
            return True  # a DM belongs to no server or channel list: allow_users alone decides
        if self.allow_guilds and message.guild.id not in self.allow_guilds:
            return False
        channel = message.channel
        return not self.allow_channels or bool({channel.id, getattr(channel, "parent_id", None)} & self.allow_channels)

    def _addressed(self, message: discord.Message) -> bool:
        me = self.client.user
        if message.guild is None:
            return True
        if any(user.id == me.id for user in message.mentions) or me.id in message.raw_mentions:
            return True
        own_role = message.guild.self_role
        if own_role is not None and own_role.id in message.raw_role_mentions:
            return True  # "@BotName" picked from the list is sometimes the bot's managed role
        if message.mention_everyone and self.config.answer_everyone:
            return True
        replied_to = message.reference.resolved if message.reference else None
        return isinstance(replied_to, discord.Message) and replied_to.author.id == me.id

    def _readable(self, message: discord.Message) -> str:
        """The text as a person reads it: the bot's own mention removed, other mentions as names."""
        me = self.client.user
        guild = message.guild
        users = {user.id: self._name_of(user) for user in message.mentions}
        own_role = guild.self_role if guild is not None else None
        text = re.sub(rf"\s*<@!?{me.id}>\s*", " ", message.content)
        if own_role is not None:
            text = re.sub(rf"\s*<@&{own_role.id}>\s*", " ", text)

        def user(m: re.Match) -> str:
            return "@" + users.get(int(m[1]), "user")

        def channel(m: re.Match) -> str:
            found = guild.get_channel_or_thread(int(m[1])) if guild is not None else None
            return "#" + (found.name if found is not None else "channel")

        def role(m: re.Match) -> str:
            found = guild.get_role(int(m[1])) if guild is not None else None
            return "@" + (found.name if found is not None else "role")

        text = re.sub(r"<@!?(\d+)>", user, text)
        text = re.sub(r"<#(\d+)>", channel, text)
        text = re.sub(r"<@&(\d+)>", role, text)
        text = re.sub(r"<a?(:\w+:)\d+>", r"\1", text)  # custom emoji as :name:
        return text.strip()

    async def _send(self, channel, incoming: IncomingMessage, reference, reply: str) -> str:
        recent = self._recent[channel.id]
        # fail_if_not_exists=False: if the question was deleted meanwhile, the answer still goes out.
        chunks = split_message(reply)
        for i, chunk in enumerate(chunks):
            try:
                # The nonce makes Discord refuse a second copy of this part (enforced for a few minutes).
                sent = await channel.send(chunk, reference=reference if i == 0 else None, allowed_mentions=NO_MENTIONS,
                                          nonce=f"{incoming.event_id}.{i}"[-25:])
            except (discord.HTTPException, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                # Forbidden, NotFound, a server error after discord.py's retries, a dropped connection. Never
                # retried here: a send whose answer was lost may well have gone out. The parts already sent stay;
                # the next message is answered as usual.
                part = f"part {i + 1} of {len(chunks)} of " if len(chunks) > 1 else ""
                log.error("could not send %sa reply in channel %s (to message %s): %s: %s", part, channel.id,
                          incoming.event_id, type(exc).__name__, exc)
                return Delivery.FAILED
            recent.append(sent.id)
        return Delivery.REPLIED


@contextlib.asynccontextmanager
async def _typing(channel):
    """channel.typing() that never stops a reply: a refused indicator is logged and the reply goes on."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(channel.typing())
        except discord.HTTPException as exc:
            log.warning("no typing indicator in channel %s: %s", channel.id, exc)
        yield


# --- splitting at 2000 characters --------------------------------------------------------------

_FENCE = re.compile(r"^[ \t]*```(\S*)", re.MULTILINE)
_CLOSE = "\n```"
# Places to cut, best first: a paragraph, a line, a sentence, a word.
_BOUNDARIES = (re.compile(r"\n\n"), re.compile(r"\n"), re.compile(r"(?<=[。！？!?．.])"), re.compile(r"(?<=[ 、,])"))


def _open_fence(text: str, pos: int) -> re.Match | None:
    """The code fence left open at `pos` (its opening line), or None when `pos` is outside code."""
    opened = None
    for fence in _FENCE.finditer(text, 0, pos):
        opened = None if opened else fence
    return opened


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Pieces of at most `limit` characters, cut at the best natural boundary and never inside a
    code block if another cut is possible; a code block longer than `limit` is closed at the cut and
    reopened (same language) in the next piece."""
    pieces = []
    text = text.strip("\n")
    while len(text) > limit:
        cut = _cut_outside_code(text, limit)
        if cut:
            head, text = text[:cut].rstrip(), text[cut:].lstrip(" \n")
        elif (fence := _open_fence(text, limit)) is None:  # one unbroken run of characters: cut it
            head, text = text[:limit], text[limit:]
        else:  # inside a code block that cannot fit: close it here, reopen it in the next piece
            start = fence.end() + 1
            line = text.rfind("\n", start, limit - len(_CLOSE) + 1)
            cut = line if line > start else limit - len(_CLOSE)
            head = text[:cut] + _CLOSE
            text = f"```{fence[1][:20]}\n" + text[cut:].removeprefix("\n")
        if head.strip():
            pieces.append(head)
    if text.strip():
        pieces.append(text)
    return pieces


def _cut_outside_code(text: str, limit: int) -> int:
    """Where to end the next piece (0: nowhere good outside a code block). A boundary in the later half of
    the window wins by kind (paragraph over line over sentence over word); failing that, the last boundary
    before the code block that crosses the limit, if that keeps the block whole in the next piece."""
    window = text[: limit + 1]  # a boundary right at the limit still counts
    candidates = []
    for kind in _BOUNDARIES:
        cuts = [m.start() for m in kind.finditer(window) if 0 < m.start() <= limit and not _open_fence(text, m.start())]
        if cuts and cuts[-1] >= limit // 2:
            return cuts[-1]
        candidates += cuts
    cut = max(candidates, default=0)
    fence = _open_fence(text, limit)
    if cut and fence is not None:
        closing = _FENCE.search(text, fence.end())
        if (closing.end() if closing else len(text)) - cut > limit:
            return 0  # the block is split anyway: fill this piece instead of sending a stub before it
    return cut
