"""`python -m bot`: one asyncio process, one model.

    config ─► memory + inbox (SQLite) ─► platform adapters take messages (into the inbox) at once
          ─► model (base + LoRA adapter) ─► worker ─► router ─► dispatcher answers the inbox, in order per chat
                                                                └─► /healthz, /metrics

Platform adapters start before the model loads: what they accept meanwhile waits in the inbox (on
disk), with whatever the last run left unanswered, and is answered once serving starts. Files live
next to [memory] path: the memory, the inbox, and with LINE the names its profiles gave (bot/names.py,
opened and closed by the LINE platform adapter). What replies recall beyond a chat's window ([memory] person,
chat_recall, profile: bot/reply_memory.py) is read at start as well; a file it cannot use stops the start.

Shutdown (SIGINT, SIGTERM, or the console's end of input): every message accepted before it is
answered and delivered, up to [queue] drain_timeout_s (the worker keeps generating meanwhile); what
is left, and what arrives during the drain, stays in the inbox for the next start and is counted in
the log. Then the platform adapters disconnect, the files are closed, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from pathlib import Path

from finetune.model_loading import ModelLoadError, load_base_model, load_persona_model, read_adapter_manifest

from .backend import ModelBackend
from .config import ConfigError
from .dispatcher import Dispatcher
from .inbox import Inbox, InboxError
from .memory import ConversationMemory, MemoryStoreError
from .metrics import BotMetrics
from .names import NameCacheError
from .reply_memory import ReplyMemory
from .router import Router
from .server import build_app, start_server
from .worker import Worker

log = logging.getLogger("bunshin.daemon")

DEMO_HINT = "To try the bot without downloading a model, run: python -m bot --demo"


def load_model(config):
    """The configured model, or ModelLoadError saying why (never a silent fallback to a demo model)."""
    m = config.model
    quantize, device, dtype = m.quantize, (m.device or None), m.dtype
    if m.adapter:
        manifest = read_adapter_manifest(Path(m.adapter))
        # [model] base, when it differs from the manifest's, is where to load that same base from (a local copy).
        base = m.base if m.base and m.base != manifest.base_model else None
        return load_persona_model(Path(m.adapter), base=base, quantize=quantize, device=device, dtype=dtype,
                            merge=m.merge_adapter and quantize == "none")
    return load_base_model(m.base, revision=m.revision, quantize=quantize, device=device, dtype=dtype)


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
    )


def configured_persona(config) -> str:
    """Who the bot speaks as, known before the model loads: [persona] name, else the adapter's manifest."""
    if config.persona.name:
        return config.persona.name
    if config.model.adapter:
        try:
            return read_adapter_manifest(Path(config.model.adapter)).persona
        except ModelLoadError as exc:
            raise SystemExit(f"error: {exc}\n{DEMO_HINT}") from None
    return ""


def build_platform_adapters(config, persona: str, metrics) -> list:
    """The enabled platform adapters (bot/messages.py says what one is)."""
    adapters = []
    if config.console.enabled:
        from adapters.console import ConsoleAdapter

        adapters.append(ConsoleAdapter(config.console.user_name, persona))
    if config.line.enabled:
        from adapters.line import LineAdapter

        adapters.append(LineAdapter(config, metrics, persona))
    if config.discord.enabled:
        from adapters.discord import DiscordAdapter

        adapters.append(DiscordAdapter(config, metrics, persona))
    return adapters


async def run_daemon(config, stop: asyncio.Event | None = None, backend=None) -> int:
    """Serve until SIGINT/SIGTERM, `stop` (for embedding and tests), or the console's end of input.

    `backend` (tests, benchmarks) replaces the configured model: any object with `persona` and
    `generate(conversations) -> [(text, tokens)]`."""
    started = time.monotonic()
    metrics = BotMetrics()
    state = {"phase": "loading"}
    try:
        # Keep a few times what the prompt uses (or what chat recall searches), so a long chat stays bounded on disk.
        memory = ConversationMemory(config.memory.path, keep=config.memory.kept_turns())
    except MemoryStoreError as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        inbox = Inbox(Inbox.path_for(config.memory.path))
    except InboxError as exc:
        memory.close()
        raise SystemExit(f"error: {exc}") from None
    worker: Worker | None = None
    adapters = []
    runner = None
    api = None
    stopping = stop or asyncio.Event()
    tasks: list[asyncio.Task] = []
    try:
        persona = configured_persona(config)  # the manifest is read once, for the platform adapters and the API
        # The profile and the persona's memory are read before anything starts: a file that cannot be used is a
        # ConfigError naming it (python -m bot exits 2), not a failure an hour into serving.
        recall = ReplyMemory.from_config(config, memory)
        log.info("%s", recall.describe())
        try:
            adapters = build_platform_adapters(config, persona, metrics)
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
            app = build_app(metrics, health)
            for adapter in adapters:
                app.router.add_routes(adapter.web_routes())
            if api is not None:
                app.router.add_routes(api.web_routes())
            runner, port = await start_server(app, config.server.host, config.server.port)
            log.info("health and metrics on http://%s:%d/healthz and /metrics", config.server.host, port)
            if api is not None:
                log.info("OpenAI-compatible API on http://%s:%d/v1 as model %r", config.server.host, port, api.model_id)
            state["port"] = port
        # Messages are taken from now on, while the model loads too: they wait in the inbox.
        tasks = [asyncio.create_task(a.run(dispatcher.accept, stopping), name=a.name) for a in adapters]
        if backend is None:
            try:
                backend = await asyncio.to_thread(load_backend, config, recall.profile)
            except ModelLoadError as exc:
                hint = "" if config.model.engine == "openai" else f"\n{DEMO_HINT}"
                raise SystemExit(f"error: {exc}{hint}") from None
            except ValueError as exc:  # e.g. a [persona] that contradicts the adapter's manifest
                raise SystemExit(f"error: {config.source}: {exc}") from None
        worker = Worker(backend, metrics, max_queue=config.queue.max_size, max_batch=config.queue.max_batch,
                        batch_wait_s=config.queue.batch_wait_ms / 1000)
        # Warm-up (the slot engine's cache, CUDA graphs and self-check) happens before "serving", so
        # the first user does not pay for it; /healthz says "warming_up" meanwhile.
        state["phase"] = "warming_up"
        await worker.start()
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
    if state.get("failed"):
        log.error("stopped after a platform adapter failed")
        return 1
    log.info("stopped")
    return 0


async def _serve_until_stopped(tasks, dispatcher, worker, drain_timeout: float, state, stopping: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stopping.set)
        except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
            pass
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
