"""The daemon with [api] enabled, in a thread of the test's process, for tests/test_api.py and
tests/test_api_bad_input.py: the real worker behind the real HTTP server on loopback, a backend built on the
tiny model (or HeldBackend around it), and small clients for what the `openai` client cannot send."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai

from bot.daemon import run_daemon
from finetune.config import BotConfig
from finetune.model_backend import ModelBackend
from finetune.model_loading import load_base_model
from finetune.prompt import ChatTurn
from finetune.tiny_model import build_tiny_model

PERSONA = "美咲"
KEY_ENV = "BUNSHIN_TEST_API_KEY"
KEY = "sk-test-3f9a1c0e7b"


def tiny_backend(folder: Path) -> ModelBackend:
    """The tiny random model's real backend: greedy, at most 12 new tokens."""
    loaded = load_base_model(str(build_tiny_model(folder / "model")), device="cpu")
    return ModelBackend.from_loaded(loaded, persona=PERSONA, template="transcript",
                                    generation_overrides={"max_new_tokens": 12, "temperature": 0.0})


class HeldBackend:
    """The real backend behind a gate (closed: generation waits in the worker's thread), recording each
    conversation it is given; `fail` makes the next generation raise it."""

    def __init__(self, inner: ModelBackend) -> None:
        self.inner = inner
        self.persona = inner.persona
        self.settings = inner.settings
        self.gate = threading.Event()
        self.gate.set()
        self.generating = threading.Event()
        self.seen: list[list[ChatTurn]] = []
        self.fail: Exception | None = None

    def prompt_ids(self, turns):
        return self.inner.prompt_ids(turns)

    def generate(self, conversations):
        self.seen += conversations
        self.generating.set()
        assert self.gate.wait(20), "the test never opened the gate"
        if self.fail is not None:
            failure, self.fail = self.fail, None
            raise failure
        return self.inner.generate(conversations)


class LogLines(logging.Handler):
    """Every record of the loggers it is added to, formatted as the daemon's log would print it."""

    def __init__(self, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def serving(folder, backend, **sections):
    """The daemon with [api] enabled and no platform: yields its /v1 URL once /healthz says serving."""
    table = {
        "persona": {"name": PERSONA},
        "memory": {"path": str(folder / "memory.sqlite3")},
        "server": {"host": "127.0.0.1", "port": 0},
        "api": {"enabled": True, "key_env": KEY_ENV, "requests_per_minute": 6000.0, "burst": 1000},
    }
    for name, values in sections.items():
        table.setdefault(name, {}).update(values)
    config = BotConfig.from_dict(table, source="test")
    lines, logger = LogLines(), logging.getLogger("bunshin.daemon")
    logger.addHandler(lines)
    level, logger.level = logger.level, logging.INFO
    loop, stop, ended = asyncio.new_event_loop(), asyncio.Event(), []
    os.environ[KEY_ENV] = KEY
    thread = threading.Thread(target=lambda: ended.append(loop.run_until_complete(run_daemon(config, stop, backend))))
    thread.start()
    try:
        url = None
        deadline = time.monotonic() + 30
        while url is None:
            assert time.monotonic() < deadline and thread.is_alive(), f"the API never started: {lines.lines}"
            url = next((line.split(" on ", 1)[1].split(" ")[0] for line in lines.lines if "OpenAI-compatible" in line),
                       None)
            time.sleep(0.02)
        while get_json(url.replace("/v1", "/healthz"))[0] != 200:
            assert time.monotonic() < deadline, "the daemon never served"
            time.sleep(0.02)
        yield url
    finally:
        if isinstance(backend, HeldBackend):
            backend.gate.set()
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()
        logger.removeHandler(lines)
        logger.level = level
        os.environ.pop(KEY_ENV, None)
    assert ended == [0]


def get_json(url: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None
             ) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:  # noqa: S310 - loopback
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)


def metric_samples(url: str) -> dict[str, float]:
    """/metrics as {'name{labels}': value} (the daemon's base URL or its /v1 URL)."""
    with urllib.request.urlopen(url.replace("/v1", "") + "/metrics", timeout=10) as r:  # noqa: S310 - loopback
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples
