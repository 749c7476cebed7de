"""`python -m bot`: one asyncio process, one model.

    config ─► memory + inbox (SQLite) ─► platform adapters take messages (into the inbox) at once
          ─► model (base + LoRA adapter) ─► worker ─► router ─► dispatcher answers the inbox, in order per chat
                                                                └─► /healthz, /metrics

Platform adapters start before the model loads: what they accept meanwhile waits in the inbox (on
disk), with whatever the last run left unanswered, and is answered once serving starts. Files live
next to [memory] path, by default in the persona home (bot/memory_location.py): the memory, the inbox,
and with LINE the names its profiles gave (bot/names.py, opened and closed by the LINE platform adapter). What
replies recall beyond a chat's window ([memory] person, chat_recall, profile: bot/reply_memory.py) is read at
start as well; a file it cannot use stops the start.

Shutdown (SIGINT, SIGTERM, or the console's end of input): every message accepted before it is
answered and delivered, up to [queue] drain_timeout_s (the worker keeps generating meanwhile); what
is left, and what arrives during the drain, stays in the inbox for the next start and is counted in
the log. Then the platform adapters disconnect, the files are closed, and the process exits 0.
A signal while the model loads or warms up stops at once (the load cannot be interrupted and is left
behind, bot/loading.py): what was accepted meanwhile stays in the inbox, and the process exits 0.

The inbox and the memory belong together: memory keys its turns by the inbox's entries, and the inbox
holds what was accepted but not answered yet. A memory without its inbox (the inbox deleted or moved)
is refused at start, before anything is created, unless `--new-inbox` says to start an empty one.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import shlex
import signal
import time
from pathlib import Path

from adapters.registry import enabled_platforms
from finetune.config import ConfigError
from finetune.model_backend import ModelBackend
from finetune.model_loading import ModelLoadError, load_base_model, load_persona_model
from finetune.persona_home import PersonaHomeError

from .dispatcher import Dispatcher
from .inbox import Inbox, InboxError
from .loading import in_thread
from .memory import ConversationMemory, MemoryStoreError
from .memory_location import with_memory_path
from .metrics import BotMetrics
from .names import NameCacheError
from .reply_memory import ReplyMemory
from .router import Router
from .server import build_app, start_server
from .worker import Worker

log = logging.getLogger("bunshin.daemon")

DEMO_HINT = "To try the bot without downloading a model, run: python -m bot --demo"


def load_model(config):
    """The configured model, or ModelLoadError saying why (never a silent fallback to a demo model). An adapter
    is loaded on the base its manifest names (config.adapter_manifest() refuses a [model] base naming another)."""
    m = config.model
    quantize, device, dtype = m.quantize, (m.device or None), m.dtype
    if config.adapter_manifest() is not None:
        return load_persona_model(Path(m.adapter), quantize=quantize, device=device, dtype=dtype,
                                  merge=m.merge_adapter and quantize == "none")
    return load_base_model(m.base_model, revision=m.revision, quantize=quantize, device=device, dtype=dtype)


def load_backend(config, profile=()):
    """The configured model as the daemon serves it: the local one ([model] engine "slots" or "plain") or the remote
    engine's prompting ("openai"), with the `profile` lines ([memory] profile) atop every prompt. Blocks (run it in a
    thread); ModelLoadError or ValueError (e.g. a [persona] that contradicts the adapter's manifest) say why not."""
    if config.model.engine == "openai":
        # The weights are served elsewhere (bot/remote_engine.py): only the tokenizer and the manifest load here.
        from .remote_engine import RemoteBackend

        return RemoteBackend.from_config(config, profile)
    return ModelBackend.from_loaded(
        load_model(config),
        persona=config.persona.name or None,
        template=config.persona.template or None,
        generation_overrides=config.generation.overrides(),
        engine=config.model.engine,
        cuda_graphs=config.model.cuda_graphs,
        compile=config.model.compile,
        profile=profile,
        mixed_steps=config.model.mixed_steps,
    )


def configured_persona(config) -> str:
    """Who the bot speaks as, known before the model loads: [persona] name, else the adapter's manifest. Reading the
    manifest here, first of all, stops a start whose adapter is missing or whose [model] base is not the adapter's."""
    try:
        manifest = config.adapter_manifest()
    except ModelLoadError as exc:
        raise SystemExit(f"error: {exc}\n{DEMO_HINT}") from None
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    if config.persona.name:
        return config.persona.name
    return manifest.persona if manifest is not None else ""


def refuse_memory_without_inbox(memory_path: str, inbox_path: str) -> None:
    """SystemExit, saying how to start fresh, when the memory exists and its inbox does not (deleted or moved):
    starting would lose what the inbox held unanswered, and could answer again what it had answered."""
    if memory_path == ":memory:" or Path(inbox_path).exists() or not Path(memory_path).exists():
        return
    raise SystemExit(
        f"error: the inbox {inbox_path} is missing, but the memory beside it ({memory_path}) exists.\n"
        "Starting without it would lose the messages it held unanswered, and could answer recent ones again.\n"
        "Put the inbox back if it was moved. To start fresh, delete the memory too (every conversation is "
        f"forgotten): rm {shlex.quote(memory_path)}*. To keep the conversations and start with an empty inbox, start with "
        "--new-inbox once.")


async def run_daemon(config, stop: asyncio.Event | None = None, backend=None, new_inbox: bool = False) -> int:
    """Serve until SIGINT/SIGTERM, `stop` (for embedding and tests), or the console's end of input.

    `backend` (tests, benchmarks) replaces the configured model: any object with `persona` and
    `generate(conversations) -> [(text, tokens)]`. `new_inbox`: start with an empty inbox beside an
    existing memory (refused otherwise, see refuse_memory_without_inbox)."""
    started = time.monotonic()
    metrics = BotMetrics()
    state = {"phase": "loading"}
    try:  # [memory] path "" = the persona home's (bot/memory_location.py)
        config = with_memory_path(config, lambda: configured_persona(config))
    except PersonaHomeError as exc:
        raise SystemExit(f"error: {exc}") from None
    inbox_path = Inbox.path_for(config.memory.path)
    if not new_inbox:
        refuse_memory_without_inbox(config.memory.path, inbox_path)
    stopping = stop or asyncio.Event()
    # From now on a signal stops the daemon the way it should at this point (while the model loads too).
    signals = _stop_on_signals(stopping)
    try:
        # The inbox first: a start that fails between the two leaves an inbox without memory, which is harmless.
        inbox = Inbox(inbox_path)
    except InboxError as exc:
        _forget_signals(signals)
        raise SystemExit(f"error: {exc}") from None
    try:
        # Keep a few times what the prompt uses (or what chat recall searches), so a long chat stays bounded on disk.
        memory = ConversationMemory(config.memory.path, keep=config.memory.kept_turns())
    except MemoryStoreError as exc:
        inbox.close()
        _forget_signals(signals)
        raise SystemExit(f"error: {exc}") from None
    worker: Worker | None = None
    adapters = []
    runner = None
    api = None
    tasks: list[asyncio.Task] = []
    try:
        persona = configured_persona(config)  # the manifest is read once, for the platform adapters and the API
        # The profile and the persona's memory are read before anything starts: a file that cannot be used is a
        # ConfigError naming it (python -m bot exits 2), not a failure an hour into serving.
        recall = ReplyMemory.from_config(config, memory)
        log.info("%s", recall.describe())
        try:
            adapters = enabled_platforms(config, metrics, persona)  # bot/messages.py says what one is
        except NameCacheError as exc:
            raise SystemExit(f"error: {exc}") from None
        dispatcher = Dispatcher(inbox, {a.name: a for a in adapters}, metrics, max_active=config.queue.max_active)
        dispatcher.recover(inbox.recovered)

        def health():
            ok = state["phase"] == "serving"
            details = {"phase": state["phase"], "uptime_s": round(time.monotonic() - started, 1),
                       "inbox_waiting": dispatcher.waiting}
            if worker is not None:
                details["queue_depth"] = worker.queue_depth
            return ok, details

        if config.api.enabled:
            from .api import OpenAIApi

            try:  # the key is read once, now: a missing variable stops the start, naming it
                api = OpenAIApi(config, metrics, persona, config.secret(config.api.key_env))
            except ConfigError as exc:
                raise SystemExit(f"error: {exc}") from None
        if config.server.enabled:
            app = build_app(metrics, health, middlewares=[api.errors] if api is not None else [])
            for adapter in adapters:
                app.router.add_routes(adapter.web_routes())
            if api is not None:
                app.router.add_routes(api.web_routes())
            runner, port = await start_server(app, config.server.host, config.server.port, metrics)
            log.info("health and metrics on http://%s:%d/healthz and /metrics", config.server.host, port)
            if api is not None:
                log.info("OpenAI-compatible API on http://%s:%d/v1 as model %r", config.server.host, port, api.model_id)
            state["port"] = port
        # Messages are taken from now on, while the model loads too: they wait in the inbox.
        tasks = [asyncio.create_task(a.run(dispatcher.accept, stopping), name=a.name) for a in adapters]
        try:
            backend = await _unless_stopped(_load_backend(config, backend, recall.profile), stopping)
            worker = Worker(backend, metrics, max_queue=config.queue.max_size, max_batch=config.queue.max_batch,
                            batch_wait_s=config.queue.batch_wait_ms / 1000)
            # Warm-up (the slot engine's cache, CUDA graphs and self-check) happens before "serving", so
            # the first user does not pay for it; /healthz says "warming_up" meanwhile.
            state["phase"] = "warming_up"
            await _unless_stopped(worker.start(), stopping)
        except _CannotStart as exc:
            raise SystemExit(f"error: {exc}") from None
        except _StoppedBeforeServing:
            log.info("stopped while %s: %d accepted message(s) kept in the inbox, answered at the next start",
                     "loading the model" if state["phase"] == "loading" else "warming up", dispatcher.waiting)
            state["phase"] = "stopped"
            return 0
        # What exists now (libraries, model, engine) lives until exit. Frozen, a full garbage
        # collection no longer walks it; unfrozen, each one paused the event loop ~100 ms on the
        # 2-core CI machine, which alone put LINE's webhook p99 over 50 ms (bench/line_load.py).
        gc.freeze()
        router = Router(config, memory, worker, metrics, backend.persona, recall)
        if api is not None:
            api.attach(worker, backend, recall)
        if not adapters:
            log.warning("no platform adapter is enabled: only %s are served",
                        "the API, /healthz and /metrics" if api is not None else "/healthz and /metrics")
        dispatcher.start(router)
        state["phase"] = "serving"
        log.info("serving as %s with %s (load took %.1fs)", backend.persona, ", ".join(a.name for a in adapters) or "no adapters",
                 time.monotonic() - started)
        await _serve_until_stopped(tasks, dispatcher, worker, config.queue.drain_timeout_s, state, stopping)
    finally:
        stopping.set()
        for adapter in adapters:
            try:
                await adapter.close()
            except Exception as exc:  # noqa: BLE001 - closing the others and the files matters more
                log.error("closing %s failed: %r", adapter.name, exc)
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        if runner is not None:
            await runner.cleanup()
        inbox.close()
        memory.close()
        _forget_signals(signals)
    if state.get("failed"):
        log.error("stopped after a platform adapter failed")
        return 1
    log.info("stopped")
    return 0


class _CannotStart(Exception):
    """The model cannot be loaded: str() says why (the error message, "error: " aside)."""


async def _load_backend(config, backend, profile=()):
    """The configured model (or engine) as a backend (load_backend), unless `backend` is given; _CannotStart saying
    why it cannot. (Not SystemExit: this runs as a task, and asyncio lets a task's SystemExit escape the event loop
    at once.)"""
    if backend is not None:
        return backend
    try:
        return await in_thread(load_backend, config, profile, name="bunshin-load")
    except ModelLoadError as exc:
        hint = "" if config.model.engine == "openai" else f"\n{DEMO_HINT}"
        raise _CannotStart(f"{exc}{hint}") from None
    except ConfigError as exc:  # the adapter's manifest changed since configured_persona read it
        raise _CannotStart(str(exc)) from None
    except ValueError as exc:  # e.g. a [persona] that contradicts the adapter's manifest
        raise _CannotStart(f"{config.source}: {exc}") from None


class _StoppedBeforeServing(Exception):
    """A signal (or `stop`) came while the model loaded or warmed up."""


async def _unless_stopped(work, stopping: asyncio.Event):
    """What `work` (a coroutine) returns, or _StoppedBeforeServing as soon as `stopping` is set; `work` is then
    cancelled (a thread it waits for runs on, bot/loading.py)."""
    task = asyncio.ensure_future(work)
    stop_wait = asyncio.create_task(stopping.wait())
    await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    stop_wait.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise _StoppedBeforeServing


def _stop_on_signals(stopping: asyncio.Event) -> list[int]:
    """SIGINT and SIGTERM set `stopping` from now on; the signals this could be done for (none off the main thread)."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stopping.set)
        except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
            continue
        installed.append(sig)
    return installed


def _forget_signals(signals: list[int]) -> None:
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.remove_signal_handler(sig)


async def _serve_until_stopped(tasks, dispatcher, worker, drain_timeout: float, state, stopping: asyncio.Event) -> None:
    stop_wait = asyncio.create_task(stopping.wait())
    # Run until a signal, or until every platform adapter has finished (the console at end of input).
    pending = set(tasks) | {stop_wait}
    while pending and not stopping.is_set():
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stop_wait and task.exception() is not None:
                state["failed"] = True
                log.error("platform adapter %s failed: %r", task.get_name(), task.exception())
        if tasks and all(t.done() for t in tasks):
            break
    stop_wait.cancel()
    state["phase"] = "draining"
    if not stopping.is_set():
        # Every platform adapter ended by itself (the console's input ran out): answer all it gave, unless a
        # signal comes first.
        idle, stop_wait = asyncio.create_task(dispatcher.idle()), asyncio.create_task(stopping.wait())
        await asyncio.wait({idle, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        idle.cancel()
        stop_wait.cancel()
    log.info("shutting down: finishing the replies to messages already accepted (up to %.0fs)", drain_timeout)
    await dispatcher.drain(drain_timeout)
    stopping.set()
    await worker.stop(1.0)
