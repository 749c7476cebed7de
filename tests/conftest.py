from __future__ import annotations

import os
from contextlib import asynccontextmanager

import pytest

# Helpers tests import with `from conftest import ...`; they live in tests/support/repo.py (bench scripts and
# tests/support use them too, and they cannot import conftest).
from tests.support.repo import EXAMPLES, REPO, run_cli, write_toml  # noqa: F401


@pytest.fixture
def cli():
    return run_cli


# The model families `finetune tiny-model --arch` builds, each taken through the whole pipeline (test_model_families.py).
FAMILIES = ("gpt_neox", "llama", "qwen2")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """`tiny_base(arch)`: the folder of a tiny random base of that family, its tokenizer trained on the demo
    chats (examples/line_demo.txt, what the tests prepare datasets from); built once per session and family."""
    from finetune.tiny_model import build_tiny_model

    built = {}
    corpus = (EXAMPLES / "line_demo.txt").read_text(encoding="utf-8").splitlines()

    def build(arch: str):
        if arch not in built:
            built[arch] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}") / "base", corpus, arch=arch)
        return built[arch]

    return build


@pytest.fixture(scope="session")
def gemma3_base():
    """Gemma 3 270M as a `--base` folder (tests/support/real_base.py: installed, verified and converted once,
    cached in $BUNSHIN_CACHE); tests that take it are marked `real_base`."""
    from tests.support.real_base import gemma_base_or_skip

    return gemma_base_or_skip()


@pytest.fixture
async def fake_discord(monkeypatch):
    """Discord's REST API and gateway on loopback, discord.py's client pointed at it (tests/support/fake_discord.py)."""
    from tests.support.fake_discord import serving_fake_discord  # discord.py loads only for the tests that use it

    async with serving_fake_discord(monkeypatch) as fake:
        yield fake


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


def pytest_collection_modifyitems(config, items):
    """`make mutants MODULE=...` sets BUNSHIN_MUTANTS_MODULE: then only that module's tests (tests/mutants.py) are
    collected, so mutmut records and runs those against its mutants, not every test of [tool.mutmut]'s selection
    that happens to call the module (the LINE tests all pass through the inbox, for one)."""
    module = os.environ.get("BUNSHIN_MUTANTS_MODULE")
    if not module:
        return
    from tests.mutants import MODULES, test_files

    if module not in MODULES:
        raise pytest.UsageError(f"BUNSHIN_MUTANTS_MODULE={module}: not one of {', '.join(MODULES)}")
    files = test_files(module)
    kept = [item for item in items if item.nodeid.split("::", 1)[0] in files]
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid.split("::", 1)[0] not in files])
    items[:] = kept
