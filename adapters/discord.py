"""Discord: a discord.py client in the daemon's event loop.

    gateway MESSAGE_CREATE ─► on_message ─► allowed? addressed? ─► handle(IncomingMessage) ─► reply(s)

The bot answers a mention of itself, any DM, and a reply to one of its own messages; everything
else it is allowed to see is handed to the router with addressed=False, so the channel's memory
(chat_id = the channel or thread id) knows what was said before the next question. When a message
replies to another, the replied-to message goes to the router first as an unaddressed message,
unless the adapter handed it over or sent it itself recently (then it is in memory already).

Rate limits, reconnects and resumes are discord.py's job. A reply that cannot be sent is logged,
and the next message is answered as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable

import aiohttp
import discord

from bot.messages import IncomingMessage

Handler = Callable[[IncomingMessage], Awaitable[str | None]]

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


class DiscordStartError(RuntimeError):
    """The client could not connect for a reason a restart will not fix (token, intents)."""


class DiscordAdapter:
    name = "discord"

    def __init__(self, config, metrics, persona: str):
        self.config = config.discord
        self.metrics = metrics
        self.persona = persona
        # Read now, so a missing variable stops the daemon before the model loads (ConfigError names it).
        self._token = config.secret(self.config.token_env)
        self.allow_guilds = {int(i) for i in self.config.allow_guilds}
        self.allow_channels = {int(i) for i in self.config.allow_channels}
        self.allow_users = {int(i) for i in self.config.allow_users}
        self.reset_commands = {c.strip() for c in config.memory.reset_commands}
        self.is_admin = config.is_admin
        # Per channel, the ids of messages already in the router's memory (handed over or sent by us).
        self._recent: defaultdict[int, deque[int]] = defaultdict(lambda: deque(maxlen=config.memory.max_turns))
        self._in_flight: set[asyncio.Task] = set()
        self._accepting = True
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: enabled in the Developer Portal (see README)
        self.client = discord.Client(intents=intents, allowed_mentions=NO_MENTIONS)

    def web_routes(self) -> list:
        return []  # the gateway is a websocket the client opens; nothing to serve

    async def run(self, handle: Handler, stopping: asyncio.Event) -> None:
        client = self.client

        async def on_ready():
            log.info("connected to Discord as %s (id %s) in %d servers; invite: %s", client.user, client.user.id,
                     len(client.guilds), discord.utils.oauth_url(client.user.id, permissions=INVITE_PERMISSIONS, scopes=("bot",)))

        async def on_message(message: discord.Message):
            await self.on_message(message, handle)

        client.event(on_ready)
        client.event(on_message)
        connection = asyncio.create_task(client.start(self._token), name="discord-gateway")
        stop = asyncio.create_task(stopping.wait())
        try:
            await asyncio.wait({connection, stop}, return_when=asyncio.FIRST_COMPLETED)
            if connection.done():
                connection.result()  # raises why it ended
                return
            # Stop taking messages; replies already being generated still go out before the client closes.
            self._accepting = False
            if self._in_flight:
                await asyncio.wait(self._in_flight)
        except discord.PrivilegedIntentsRequired:
            log.error("%s", INTENT_HELP)
            raise DiscordStartError(INTENT_HELP) from None
        except discord.LoginFailure:
            why = (f"Discord rejected the bot token in the environment variable {self.config.token_env}: "
                   "copy it again from the Developer Portal (Bot, Reset Token)")
            log.error("%s", why)
            raise DiscordStartError(why) from None
        finally:
            stop.cancel()
            await client.close()
            if not connection.done():
                await asyncio.wait({connection}, timeout=5)
            if connection.done() and not connection.cancelled():
                connection.exception()  # retrieved: its failure, if any, was handled above

    async def on_message(self, message: discord.Message, handle: Handler) -> None:
        """One message from the gateway: decide, hand it to the router, deliver the reply."""
        if not self._accepting:
            return
        task = asyncio.current_task()
        self._in_flight.add(task)
        try:
            await self._on_message(message, handle)
        except Exception:  # one bad message must not take the adapter down
            log.exception("failed to handle message %s in channel %s", message.id, message.channel.id)
        finally:
            self._in_flight.discard(task)

    async def _on_message(self, message: discord.Message, handle: Handler) -> None:
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

        replied_to = message.reference.resolved if message.reference else None
        if isinstance(replied_to, discord.Message) and replied_to.id not in recent:
            speaker = self.persona if replied_to.author.id == me.id else replied_to.author.display_name
            await handle(IncomingMessage("discord", str(channel_id), str(replied_to.author.id), speaker,
                                         self._readable(replied_to), addressed=False))
            recent.append(replied_to.id)

        incoming = IncomingMessage("discord", str(channel_id), str(author.id), author.display_name, text, addressed)
        recent.append(message.id)
        if not addressed:
            await handle(incoming)  # remembered, not answered
            return
        async with contextlib.AsyncExitStack() as typing:
            try:
                await typing.enter_async_context(message.channel.typing())  # renewed every few seconds until exit
            except discord.HTTPException as exc:
                log.warning("no typing indicator in channel %s: %s", channel_id, exc)
            reply = await handle(incoming)
        if reply:
            await self._send(message, reply)

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
        users = {user.id: user.display_name for user in message.mentions}
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

    async def _send(self, message: discord.Message, reply: str) -> None:
        """The reply as an answer to `message`, in as many messages as it takes."""
        recent = self._recent[message.channel.id]
        # fail_if_not_exists=False: if the question was deleted meanwhile, the answer still goes out.
        reference = message.to_reference(fail_if_not_exists=False)
        chunks = split_message(reply)
        for i, chunk in enumerate(chunks):
            try:
                sent = await message.channel.send(chunk, reference=reference if i == 0 else None,
                                                  allowed_mentions=NO_MENTIONS)
            except (discord.HTTPException, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                # Forbidden, NotFound, a server error after discord.py's retries, a dropped connection. Never
                # retried here: a send whose answer was lost may well have gone out, and a user sees a reply twice
                # sooner than they miss one. The parts already sent stay; the next message is answered as usual.
                part = f"part {i + 1} of {len(chunks)} of " if len(chunks) > 1 else ""
                log.error("could not send %sa reply in channel %s (to message %s): %s: %s", part, message.channel.id,
                          message.id, type(exc).__name__, exc)
                return
            recent.append(sent.id)


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
