"""Start-up work that cannot be interrupted (the model load, the engine's warm-up), in a thread the
process does not wait for.

A signal during the load must stop the daemon now: loading a large model takes minutes, and docker
and systemd kill a process that has not exited 10 to 90 s after SIGTERM, which would cost what the
shutdown was about to write. Nothing can stop `from_pretrained` half-way, so the daemon stops without
it (bot/daemon.py): its files are closed, messages that arrived wait in the inbox. What it must not
do is wait for the load at exit, as it would for `asyncio.to_thread` (the pool's threads are joined
when the event loop closes and again at interpreter exit). So the work runs in a daemon thread of its
own, and `python -m bot` ends the process without finalizing the interpreter while work is still
running there (bot/cli.py): a thread inside torch that woke up during finalization could abort the
process instead of letting it exit 0.

One thread, kept for the life of the process, runs the work in turn, as a pool's thread would be
kept: on a CPU, a slot engine warmed up in a thread that then ended stepped ten times slower
(torch's per-thread state of the thread that built it goes with that thread).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any

_jobs: queue.SimpleQueue = queue.SimpleQueue()
_names: list[str] = []  # the work submitted and not finished, in order
_lock = threading.Lock()
_thread: threading.Thread | None = None


async def in_thread(fn: Callable[..., Any], *args: Any, name: str) -> Any:
    """`fn(*args)` in the loading thread; its result or exception. Cancelling the wait leaves the work running."""
    global _thread
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def job() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting coroutine, whatever it is
            result, error = None, exc
        finally:
            with _lock:
                _names.remove(name)
        try:
            loop.call_soon_threadsafe(_settle, future, result, error)
        except RuntimeError:  # the loop has closed: nobody waits for it any more
            pass

    with _lock:
        _names.append(name)
        if _thread is None:
            _thread = threading.Thread(target=_run_jobs, name="bunshin-loading", daemon=True)
            _thread.start()
    _jobs.put(job)
    return await future


def still_running() -> list[str]:
    """The names of the work given to `in_thread` that has not finished (running, or waiting for its turn)."""
    with _lock:
        return list(_names)


def _run_jobs() -> None:
    while True:
        _jobs.get()()


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the waiter was cancelled (stopped during the load)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
