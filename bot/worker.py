"""The worker: the only owner of the model, fed by a bounded asyncio queue.

Messages from every platform wait in one queue. The worker admits them, up to `max_batch` at a
time, to a *stepper* that runs in the worker's own thread (so the event loop keeps serving
adapters and /healthz meanwhile), and answers each request's future as its reply is done.

Two steppers: with a real model, the slot engine (engine/slot_engine.py) decodes every admitted chat
together one token per step, and a message that arrives mid-reply joins at the next step
(continuous batching). Any other backend (one with a `generate(conversations)` method, such as a
model the slot engine cannot serve) is stepped a whole batch at a time: what is waiting is
generated together and all of it finishes at once.

What a request becomes for the model (prompt fitting, the stepper) is the backend's: finetune/model_backend.py.
A request may bring its own sampling values (the API's temperature, top_p, max_tokens, seed, stop) and an
`on_text` callback, which gets the reply's text as the engine decodes it (the API's `stream: true`), called in the
event loop. A request whose caller gave up (its future cancelled: a streaming client went away) is cancelled in
the stepper too, so its slot is free at the next step.

A full queue is refused at once (`QueueFull`: the router answers "busy") rather than letting
replies pile up minutes late. A failed step (CUDA out-of-memory included) fails only the
requests in it; the worker goes on with the next.
"""

from __future__ import annotations

import asyncio
import logging
import queue as thread_queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine.request import EngineOutput
from finetune.prompt import ChatTurn, MemoryNote

from .loading import in_thread
from .metrics import BotMetrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `max_queue` requests already: answer "busy" now instead of replying late."""


class WorkerStopped(Exception):
    """The worker is shutting down (or has): the request was not, or will not be, answered."""


class DeadlineExceeded(Exception):
    """The request's deadline passed while it waited in the queue; no reply was generated."""


class GenerationFailed(Exception):
    """Generating the batch this request was in failed. kind: "oom" (CUDA out of memory), "generation", or
    "engine" (a remote engine, `engine = "openai"`, refused, failed or went silent)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class GeneratedReply:
    text: str  # may be empty: the model ended its turn at once
    tokens: int  # tokens generated for it
    finish_reason: str = "stop"  # the engine's: "stop" (an end, a stop, another speaker's turn) or "length"
    prompt_tokens: int | None = None  # the prompt's tokens, where the stepper counted them


class Backend(Protocol):
    # `memories`: each conversation's recalled notes, passed only when some reply has notes (BatchStepper), so a
    # stand-in backend of a test may take the conversations alone.
    def generate(self, conversations: list[list[ChatTurn]],
                 memories: Sequence[Sequence[MemoryNote]] | None = None) -> list[tuple[str, int]]: ...


@dataclass(eq=False)
class _Request:
    turns: list[ChatTurn]
    deadline: float  # time.monotonic() after which no reply is wanted
    received: float  # time.monotonic() when the message arrived, for the latency metric
    future: asyncio.Future = field(repr=False)
    memory: tuple[MemoryNote, ...] = ()  # notes recalled for this reply (bot/reply_memory.py), shown before it
    sampling: Mapping[str, object] | None = None  # the request's own values (GenerationSettings.sampling's names)
    on_text: Callable[[str], None] | None = None  # gets each piece of the reply's text as it is decoded


@dataclass(frozen=True)
class _Cancel:
    request: _Request  # its caller gave up while it was in flight


_CLOSE = object()  # tells the stepping thread to end


class Worker:
    def __init__(
        self,
        backend: Backend,
        metrics: BotMetrics,
        *,
        max_queue: int = 64,
        max_batch: int = 8,
        batch_wait_s: float = 0.005,
    ) -> None:
        if max_queue < 1 or max_batch < 1:
            raise ValueError("max_queue and max_batch must be at least 1")
        self.backend = backend
        self.metrics = metrics
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.stepper = None  # built by start(): the slot engine's warm-up can take a while
        self._queue: asyncio.Queue[_Request] = asyncio.Queue(maxsize=max_queue)
        self._in_flight: set[_Request] = set()  # admitted to the stepper, not yet answered
        self._inbox: thread_queue.SimpleQueue = thread_queue.SimpleQueue()  # loop -> stepping thread
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closing = threading.Event()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    async def start(self) -> None:
        """Build the stepper (warm-up: the first user must not pay for it), then start serving."""
        if self._task is not None:
            return
        make = getattr(self.backend, "make_stepper", None)
        if make is not None:
            # Not asyncio.to_thread: a signal during the warm-up must not wait for it at exit (bot/loading.py).
            self.stepper = await in_thread(make, self.max_batch, name="bunshin-warm-up")
        else:
            from finetune.steppers import BatchStepper

            self.stepper = BatchStepper(self.backend, self.max_batch)
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.stepper.capacity)
        self._thread = threading.Thread(target=self._step_forever, name="bunshin-worker", daemon=True)
        self._thread.start()
        self._task = asyncio.create_task(self._admit_forever(), name="bunshin-worker")

    def submit(self, turns: Sequence[ChatTurn], *, deadline: float, received: float,
               memory: Sequence[MemoryNote] = (), sampling: Mapping[str, object] | None = None,
               on_text: Callable[[str], None] | None = None) -> asyncio.Future:
        """Queue a conversation (and the notes recalled for its reply, its own sampling values, a callback for its
        text as it comes); the future gets a GeneratedReply, or DeadlineExceeded / GenerationFailed /
        WorkerStopped. Raises QueueFull at once when the queue is full, WorkerStopped once stop() began.
        Cancelling the future cancels the reply."""
        if self._stopping:
            raise WorkerStopped("the bot is shutting down")
        if self._task is None:
            raise RuntimeError("Worker.start() was not awaited: nothing would answer this request")
        future = asyncio.get_running_loop().create_future()
        request = _Request(list(turns), deadline, received, future, tuple(memory), sampling, on_text)
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            raise QueueFull(f"{self._queue.maxsize} messages are already waiting for a reply") from None
        future.add_done_callback(lambda f: self._cancelled(request) if f.cancelled() else None)
        self.metrics.queue_depth.set(self._queue.qsize())
        return future

    async def stop(self, timeout: float) -> None:
        """Refuse new requests, answer what is queued or in flight within `timeout` seconds, then fail
        the rest with WorkerStopped. A step still running in the thread is left to finish there."""
        self._stopping = True
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except asyncio.TimeoutError:
            log.warning("worker: %d requests unanswered after %.1f s; giving up on them",
                        len(self._in_flight) + self._queue.qsize(), timeout)
        self._task.cancel()
        await asyncio.wait({self._task})  # not `await task`: that would re-raise the cancellation
        self._closing.set()
        self._inbox.put(_CLOSE)
        leftovers = list(self._in_flight) + [self._queue.get_nowait() for _ in range(self._queue.qsize())]
        self._in_flight.clear()
        for request in leftovers:
            if not request.future.done():
                request.future.set_exception(WorkerStopped("the bot shut down before answering"))
        self.metrics.queue_depth.set(0)

    # -- the event loop's side: admit queued requests while the stepper has room ---------------

    async def _admit_forever(self) -> None:
        while True:
            await self._slots.acquire()
            request = await self._queue.get()
            self.metrics.queue_depth.set(self._queue.qsize())
            if request.future.done():  # the caller gave up (cancelled): nothing to answer
                self._release(request)
                continue
            if request.deadline <= time.monotonic():
                request.future.set_exception(DeadlineExceeded("the reply was not started before its deadline"))
                self.metrics.errors.labels("deadline").inc()
                self._release(request)
                continue
            self._in_flight.add(request)
            self._inbox.put(request)

    def _release(self, request: _Request) -> None:
        self._in_flight.discard(request)
        self._slots.release()
        self._queue.task_done()

    def _cancelled(self, request: _Request) -> None:
        """The caller gave up: the stepper stops working on it (if it was handed over; else admission skips it)."""
        if request in self._in_flight:
            self._inbox.put(_Cancel(request))

    def _dropped(self, request: _Request) -> None:
        if request in self._in_flight:
            self._release(request)

    def _stream(self, request: _Request, text: str) -> None:
        if request in self._in_flight and not request.future.done() and request.on_text is not None:
            request.on_text(text)

    def _deliver(self, request: _Request, output: EngineOutput, done: float) -> None:
        self.metrics.generated_tokens.inc(output.completion_tokens)
        if request in self._in_flight:
            if not request.future.done():  # else cancelled while generating
                if output.finish_reason == "abort":
                    request.future.set_exception(DeadlineExceeded(output.error or "the engine aborted the reply"))
                else:
                    if output.text and request.on_text is not None:
                        request.on_text(output.text)  # the last piece, before the reply's end is known
                    request.future.set_result(GeneratedReply(output.full_text or "", output.completion_tokens,
                                                             output.finish_reason or "stop",
                                                             output.prompt_tokens or None))
                    self.metrics.reply_latency_seconds.observe(done - request.received)
            self._release(request)

    def _fail(self, request: _Request, failure: GenerationFailed) -> None:
        if request in self._in_flight:
            if not request.future.done():  # one exception object each: awaiting it sets its traceback
                request.future.set_exception(GenerationFailed(failure.kind, failure.message))
            self.metrics.errors.labels(failure.kind).inc()
            self._release(request)

    def _post(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop has closed: the bot is gone, nobody is waiting
            pass

    # -- the stepping thread: the only code that touches the model ----------------------------

    def _step_forever(self) -> None:
        stepper = self.stepper
        while not self._closing.is_set():
            if stepper.busy == 0:
                request = self._inbox.get()  # idle: sleep until there is work
                if request is _CLOSE:
                    return
                self._admit(stepper, request)
                # Messages sent together (a busy group chat, several platforms at once) arrive a few
                # ms apart: a short wait lets them start together in one prefill or one batch.
                if self.batch_wait_s > 0:
                    time.sleep(self.batch_wait_s)
            if not self._admit_waiting(stepper):
                return
            self.metrics.batch_size.observe(stepper.busy)
            started = time.monotonic()
            try:
                finished = stepper.step()
            except Exception as exc:  # one bad step must not stop the bot: its requests get an error reply
                # A stepper may say itself what failed (remote_engine.py: the engine, for one request); that is
                # expected, not a bug, so it is logged without a traceback.
                expected = isinstance(exc, GenerationFailed)
                failure = exc if expected else GenerationFailed(_failure_kind(exc), f"{type(exc).__name__}: {exc}")
                keys = stepper.abort()
                log.error("worker: generating %d replies failed (%s)", len(keys), failure, exc_info=not expected)
                del exc
                if failure.kind == "oom":
                    # Only now, with the exception and its frames (holding the step's tensors) gone,
                    # can the cached blocks go back, so that the next, maybe smaller, batch fits.
                    _empty_cuda_cache()
                for request in keys:
                    self._post(self._fail, request, failure)
                continue
            done = time.monotonic()
            self.metrics.generation_seconds.observe(done - started)
            for output in finished:
                if output.finished:
                    self._post(self._deliver, output.key, output, done)
                elif output.text and output.key.on_text is not None:
                    self._post(self._stream, output.key, output.text)

    def _admit_waiting(self, stepper) -> bool:
        """Admit everything already handed over (the semaphore keeps it within capacity); False on close."""
        while True:
            try:
                request = self._inbox.get_nowait()
            except thread_queue.Empty:
                return True
            if request is _CLOSE:
                return False
            if isinstance(request, _Cancel):
                cancel = getattr(stepper, "cancel", None)
                if cancel is not None:
                    cancel(request.request)
                self._post(self._dropped, request.request)
                continue
            self._admit(stepper, request)

    def _admit(self, stepper, request: _Request) -> None:
        if isinstance(request, _Cancel):  # the first thing handed over while idle
            self._post(self._dropped, request.request)
            return
        try:
            if request.sampling is None and request.on_text is None:
                stepper.admit(request, request.turns, request.memory)  # a stand-in stepper may take no more
            else:
                stepper.admit(request, request.turns, request.memory, request.sampling, request.on_text is not None)
        except Exception as exc:  # e.g. a prompt the tokenizer rejects: only this request fails
            log.error("worker: cannot start a reply (%s: %s)", type(exc).__name__, exc, exc_info=True)
            self._post(self._fail, request, GenerationFailed("generation", f"{type(exc).__name__}: {exc}"))


def _failure_kind(exc: BaseException) -> str:
    import torch

    return "oom" if isinstance(exc, torch.cuda.OutOfMemoryError) else "generation"


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
