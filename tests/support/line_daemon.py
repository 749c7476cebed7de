"""`python -m bot` serving LINE as a real process, for the tests that stop, kill and restart it
(tests/test_line_durability.py, tests/test_line_restarts.py): a config on a tiny model against a fake
LINE API, the daemon's log in a file, signed webhooks, and what reached each user.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import sys
import time
from pathlib import Path

import aiohttp

from .fake_line_api import PUSH, REPLY, sign, text_event, webhook_bytes
from .repo import REPO, write_toml

PERSONA = "美咲"
SECRET, TOKEN = "durable-channel-secret-5e5e", "durable-access-token-6f6f"
SECRET_ENV, TOKEN_ENV = "BUNSHIN_TEST_LINE_SECRET", "BUNSHIN_TEST_LINE_TOKEN"


def write_config(folder: Path, tiny: Path, fake_url: str, name: str = "bot.toml", **sections) -> Path:
    """`name` in `folder`: the tiny model on CPU, memory (and so the inbox) in `folder`, LINE against `fake_url`;
    `sections` override or add keys table by table."""
    table = {
        "model": {"base": str(tiny), "device": "cpu"},
        "persona": {"name": PERSONA},
        "generation": {"max_new_tokens": 24, "temperature": 0.0},
        "memory": {"path": str(folder / "memory.sqlite3")},
        "server": {"port": 0},
        "limits": {"messages_per_minute": 600.0, "burst": 100},
        "line": {"enabled": True, "channel_secret_env": SECRET_ENV, "access_token_env": TOKEN_ENV, "api_host": fake_url},
    }
    for section, values in sections.items():
        table.setdefault(section, {}).update(values)
    return write_toml(folder / name, table)


# `python -m bot`, started once the libraries the model load imports are imported: what a restart does in a
# test whose point is a deadline that runs from before it (a reply token lives a minute) on a machine where
# importing torch and transformers alone can take that long. The daemon's own code runs as it always does.
_WARM_START = """
import runpy, sys
import torch, transformers, sentencepiece
import transformers.models.gpt_neox.modeling_gpt_neox
import bot.daemon, engine.slot_engine, adapters.line
print("imported, waiting for go", flush=True)
sys.stdin.readline()
sys.argv[0] = "bot"
runpy.run_module("bot", run_name="__main__", alter_sys=True)
"""


class Daemon:
    """`python -m bot --config CONFIG` as a real process, its log in a file; the event loop stays free for the fake."""

    def __init__(self, config: Path, log: Path):
        self.config, self.log_path = config, log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> Daemon:
        return await self._spawn("-m", "bot")

    async def warm(self) -> Daemon:
        """Imports what the daemon needs and waits for `go()` to run it (see _WARM_START)."""
        await self._spawn("-c", _WARM_START)
        await self.logged("imported, waiting for go", timeout=300)
        return self

    async def go(self) -> Daemon:
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()
        return self

    async def _spawn(self, *program: str) -> Daemon:
        with open(self.log_path, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, *program, "--config", str(self.config), cwd=REPO,
                stdin=asyncio.subprocess.PIPE if program[0] == "-c" else asyncio.subprocess.DEVNULL,
                stdout=log, stderr=log,
                env={**os.environ, SECRET_ENV: SECRET, TOKEN_ENV: TOKEN, "PYTHONUNBUFFERED": "1"})
        return self

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    async def logged(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := re.search(pattern, self.log()):
                return found
            if self.proc.returncode is not None:
                raise AssertionError(f"the daemon exited ({self.proc.returncode}) before logging {pattern!r}:\n{self.log()}")
            await asyncio.sleep(0.02)
        raise AssertionError(f"the daemon did not log {pattern!r} within {timeout}s:\n{self.log()}")

    async def url(self) -> str:
        found = await self.logged(r"health and metrics on http://127\.0\.0\.1:(\d+)/healthz")
        return f"http://127.0.0.1:{found[1]}"

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def kill(self) -> None:
        """SIGKILL if still running (a test that failed half-way must not leave a daemon behind)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def post_events(url: str, events: list[dict]) -> list[int]:
    """Each event in its own signed webhook, all at once; the statuses answered."""
    async with aiohttp.ClientSession() as session:
        async def post(event):
            body = webhook_bytes(event)
            async with session.post(url + "/callback", data=body, headers={"X-Line-Signature": sign(body, SECRET)}) as r:
                return r.status
        return await asyncio.gather(*(post(e) for e in events))


async def wait_for(condition, what: str, timeout: float = 120):
    """Polls `condition` (the fake's state, a file) until it is true; no event to await across processes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def answers(fake, event: dict) -> list[tuple[str, list[str]]]:
    """What reached the event's user: replies with its token, pushes to its user (each test user sends one event)."""
    user = event["source"]["userId"]
    return ([("reply", d.texts) for d in fake.delivered(REPLY) if d.to == event["replyToken"]]
            + [("push", d.texts) for d in fake.delivered(PUSH) if d.to == user])


def remembered(folder: Path, user: str) -> list[str]:
    """The texts memory holds for a 1:1 chat, oldest first."""
    with sqlite3.connect(folder / "memory.sqlite3") as db:
        return [t for (t,) in db.execute("SELECT text FROM turns WHERE chat_key = ? ORDER BY id", (f"line:{user}",))]


def one_to_one(n: int, tag: str, **kw) -> list[dict]:
    """`n` text events, each from its own user in a 1:1 chat."""
    return [text_event(f"{tag}のメッセージ{i}", user=f"U{tag}{i:04d}".ljust(33, "0"), **kw) for i in range(n)]
