"""Chat with the bot in the terminal: each line you type is a message addressed to the bot.

Works with piped input too (`printf 'おはよう\\n' | python -m bot --demo`): at the end of input the
platform adapter finishes, and the daemon shuts down once the last reply is out. A line typed just
before a crash is answered when the bot starts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

from bot.messages import Accept, Delivery, InboxEntry, IncomingMessage, RecordAttempt


class ConsoleAdapter:
    name = "console"

    def __init__(self, user_name: str, persona: str, stdin=None, stdout=None):
        self.user_name = user_name
        self.persona = persona
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout

    async def _lines(self):
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        try:
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), self.stdin)
        except (ValueError, OSError):
            # Not a pipe or terminal the loop can watch (a regular file, some IDE consoles): read in a thread.
            while line := await asyncio.to_thread(self.stdin.readline):
                yield line
            return
        while line := await reader.readline():
            yield line.decode("utf-8", errors="replace")

    def web_routes(self) -> list:
        return []  # the terminal needs no HTTP

    def _print(self, text: str) -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    async def run(self, accept: Accept, stopping: asyncio.Event) -> None:
        if self.stdin.isatty():
            self._print(f"{self.persona} is listening. /reset forgets the conversation; Ctrl-D ends.")
        async for line in self._lines():
            if stopping.is_set():
                break
            text = line.rstrip("\r\n").replace("\\n", "\n")
            if not text.strip():
                continue
            await accept([IncomingMessage("console", "local", "local", self.user_name, text, addressed=True)])

    def can_deliver(self, entry: InboxEntry) -> bool:
        return True

    def working(self, entry: InboxEntry) -> contextlib.AbstractAsyncContextManager:
        return contextlib.nullcontext()

    async def deliver(self, entry: InboxEntry, reply: str, record_attempt: RecordAttempt) -> Delivery:
        if entry.attempted("print") is not None:
            return Delivery.MAYBE_DELIVERED  # printed before a crash, most likely: not printed twice
        await record_attempt("print")
        self._print(f"{self.persona}: {reply}")
        return Delivery.REPLIED

    async def close(self) -> None:
        pass
