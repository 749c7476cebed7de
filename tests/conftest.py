from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def run_cli(*args: str, module: str = "finetune", timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m <module> ARGS` the way a user does, from the repo root."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def write_toml(path: Path, table: dict) -> Path:
    """A config file from {section: {key: value}} (JSON's scalars and lists are TOML's too)."""
    lines = []
    for name, values in table.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def cli():
    return run_cli


class ScriptedRouter:
    """Stands in for bot.router.Router: `reply(message)` decides each answer (None: stay quiet); what it was
    handed is kept in `seen`."""

    def __init__(self, reply):
        self.reply = reply
        self.seen = []

    async def answer(self, message, key=None, again=False):
        self.seen.append(message)
        result = self.reply(message)
        return await result if hasattr(result, "__await__") else result


@asynccontextmanager
async def answered_by(adapter, router, inbox_path=":memory:"):
    """A platform adapter's messages answered the bot's way: a real inbox (SQLite) and the real dispatcher, with
    `router` (e.g. a ScriptedRouter) deciding the replies. Yields the dispatcher; its `accept` is what the
    platform adapter's run() takes."""
    from bot.dispatcher import Dispatcher
    from bot.inbox import Inbox
    from bot.metrics import BotMetrics

    inbox = Inbox(inbox_path)
    dispatcher = Dispatcher(inbox, {adapter.name: adapter}, BotMetrics())
    dispatcher.start(router)
    try:
        yield dispatcher
    finally:
        await dispatcher.drain(10)
        inbox.close()
