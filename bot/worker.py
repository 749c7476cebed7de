"""The worker: the only owner of the model, fed by a bounded asyncio queue.

Messages from every platform wait in one queue. The worker takes whatever is waiting (up to
`max_batch`), generates the replies as one left-padded batch in a thread (so the event loop keeps
serving adapters and /healthz meanwhile), and answers each request's future. One generation runs
at a time: the model is not thread-safe, and a GPU is busy enough with one batch.

A full queue is refused at once (`QueueFull`: the router answers "busy") rather than letting
replies pile up minutes late. A failed generation (CUDA out-of-memory included) fails only the
requests of that batch; the worker goes on with the next.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from finetune.generation import GenerationSettings, fit_context, generate_replies
from finetune.model_loading import LoadedModel
from finetune.prompt import TEMPLATES, ChatTurn

from .metrics import BotMetrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `max_queue` requests already: answer "busy" now instead of replying late."""


class WorkerStopped(Exception):
    """The worker is shutting down (or has): the request was not, or will not be, answered."""


class DeadlineExceeded(Exception):
    """The request's deadline passed while it waited in the queue; no reply was generated."""


class GenerationFailed(Exception):
    """Generating the batch this request was in failed. kind: "oom" (CUDA out of memory) or "generation"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class GeneratedReply:
    text: str  # may be empty: the model ended its turn at once
    tokens: int  # tokens generated for it


class Backend(Protocol):
    def generate(self, conversations: list[list[ChatTurn]]) -> list[tuple[str, int]]: ...


@dataclass
class ModelBackend:
    """A loaded model and how to prompt it. `generate` blocks: the worker calls it in a thread."""

    loaded: LoadedModel
    persona: str
    template: str
    settings: GenerationSettings
    speakers: tuple[str, ...]  # names seen in training: a line starting with one ends the reply
    max_prompt_tokens: int  # the oldest turns are dropped to fit; room is left for the reply

    @classmethod
    def from_loaded(
        cls,
        loaded: LoadedModel,
        persona: str | None = None,
        template: str | None = None,
        generation_overrides: dict | None = None,
    ) -> ModelBackend:
        """An adapter (or merged model) brings persona, template and generation defaults in its manifest;
        a bare base model needs them given (persona at least)."""
        manifest = loaded.manifest
        overrides = dict(generation_overrides or {})
        unknown = set(overrides) - set(GenerationSettings.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown generation settings: {', '.join(sorted(unknown))}")
        if manifest is not None:
            # The adapter learned one voice in one layout: another persona or template would be
            # a prompt it never saw, so a conflicting argument is an error rather than ignored.
            for name, given, learned in (("persona", persona, manifest.persona), ("template", template, manifest.template)):
                if given is not None and given != learned:
                    raise ValueError(f"the adapter was trained with {name} {learned!r}, not {given!r}")
            persona, template = manifest.persona, manifest.template
            settings = GenerationSettings.from_manifest(manifest.generation, **overrides)
            speakers = tuple(manifest.speakers)
            max_length = manifest.max_length
        else:
            if not persona:
                raise ValueError("a base model without an adapter needs a persona name")
            template = template or "transcript"
            settings = GenerationSettings.from_manifest({}, **overrides)
            speakers = ()
            max_length = getattr(loaded.model.config, "max_position_embeddings", None)
            if not max_length:
                raise ValueError("the model's config does not say its context length (max_position_embeddings)")
        if template not in TEMPLATES:
            raise ValueError(f"unknown prompt template {template!r}; known: {', '.join(TEMPLATES)}")
        budget = max_length - settings.max_new_tokens
        if budget < 16:
            raise ValueError(
                f"max_new_tokens {settings.max_new_tokens} leaves {budget} of {max_length} tokens for the prompt"
            )
        return cls(loaded, persona, template, settings, speakers, budget)

    def generate(self, conversations: list[list[ChatTurn]]) -> list[tuple[str, int]]:
        """(reply text, tokens generated) for each conversation, generated as one batch."""
        if not conversations:
            return []
        tokenizer = self.loaded.tokenizer
        prompts = [fit_context(tokenizer, turns, self.persona, self.template, self.max_prompt_tokens)
                   for turns in conversations]
        # The people in these chats are speakers too: the model may start a turn in their name.
        speakers = sorted({*self.speakers, *(t.speaker for turns in conversations for t in turns)})
        return generate_replies(self.loaded.model, tokenizer, prompts, self.settings, speakers)


@dataclass
class _Request:
    turns: list[ChatTurn]
    deadline: float  # time.monotonic() after which no reply is wanted
    received: float  # time.monotonic() when the message arrived, for the latency metric
    future: asyncio.Future = field(repr=False)


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
        self._queue: asyncio.Queue[_Request] = asyncio.Queue(maxsize=max_queue)
        self._taken: list[_Request] = []  # the latest batch taken off the queue: stop() fails the unanswered
        self._task: asyncio.Task | None = None
        self._stopping = False

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="bunshin-worker")

    def submit(self, turns: Sequence[ChatTurn], *, deadline: float, received: float) -> asyncio.Future:
        """Queue a conversation; the future gets a GeneratedReply, or DeadlineExceeded / GenerationFailed /
        WorkerStopped. Raises QueueFull at once when the queue is full, WorkerStopped once stop() began."""
        if self._stopping:
            raise WorkerStopped("the bot is shutting down")
        if self._task is None:
            raise RuntimeError("Worker.start() was not awaited: nothing would answer this request")
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Request(list(turns), deadline, received, future))
        except asyncio.QueueFull:
            raise QueueFull(f"{self._queue.maxsize} messages are already waiting for a reply") from None
        self.metrics.queue_depth.set(self._queue.qsize())
        return future

    async def stop(self, timeout: float) -> None:
        """Refuse new requests, answer what is queued or in flight within `timeout` seconds, then fail
        the rest with WorkerStopped. A generation still running in its thread is left to finish there."""
        self._stopping = True
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except asyncio.TimeoutError:
            log.warning("worker: %d requests unanswered after %.1f s; giving up on them",
                        len(self._taken) + self._queue.qsize(), timeout)
        self._task.cancel()
        await asyncio.wait({self._task})  # not `await task`: that would re-raise the cancellation
        leftovers = self._taken + [self._queue.get_nowait() for _ in range(self._queue.qsize())]
        for request in leftovers:
            if not request.future.done():
                request.future.set_exception(WorkerStopped("the bot shut down before answering"))
        self.metrics.queue_depth.set(0)

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                await self._answer(batch)
            finally:  # `_taken` stays as it is: if this is stop() cancelling us, it fails those requests
                for _ in batch:
                    self._queue.task_done()

    async def _next_batch(self) -> list[_Request]:
        self._taken = [await self._queue.get()]
        # Messages sent together (a busy group chat, several platforms at once) arrive a few ms apart:
        # a short wait lets them share one generation, which costs about as much as a single reply.
        if self.batch_wait_s > 0 and self._queue.qsize() < self.max_batch - 1:
            await asyncio.sleep(self.batch_wait_s)
        while len(self._taken) < self.max_batch and not self._queue.empty():
            self._taken.append(self._queue.get_nowait())
        self.metrics.queue_depth.set(self._queue.qsize())
        return list(self._taken)

    async def _answer(self, batch: list[_Request]) -> None:
        now = time.monotonic()
        live = []
        for request in batch:
            if request.future.done():  # the caller gave up (cancelled): nothing to answer
                continue
            if request.deadline <= now:
                request.future.set_exception(DeadlineExceeded("the reply was not started before its deadline"))
                self.metrics.errors.labels("deadline").inc()
                continue
            live.append(request)
        if not live:
            return

        self.metrics.batch_size.observe(len(live))
        started = time.monotonic()
        failure = None
        try:
            results = await asyncio.to_thread(self.backend.generate, [r.turns for r in live])
            replies = [(r, GeneratedReply(text, tokens)) for r, (text, tokens) in zip(live, results, strict=True)]
        except Exception as exc:  # one bad batch must not stop the bot: its requests get an error reply
            failure = GenerationFailed(_failure_kind(exc), f"{type(exc).__name__}: {exc}")
            log.error("worker: generating %d replies failed (%s)", len(live), failure, exc_info=True)
        self.metrics.generation_seconds.observe(time.monotonic() - started)

        if failure is not None:
            if failure.kind == "oom":
                # Only now, with the exception and its frames (holding the batch's tensors) gone,
                # can the cached blocks go back, so that the next, maybe smaller, batch fits.
                _empty_cuda_cache()
            for request in live:
                if not request.future.done():  # one exception object each: awaiting it sets its traceback
                    request.future.set_exception(GenerationFailed(failure.kind, failure.message))
                self.metrics.errors.labels(failure.kind).inc()
            return

        done = time.monotonic()
        for request, reply in replies:
            self.metrics.generated_tokens.inc(reply.tokens)
            if request.future.done():  # cancelled while generating
                continue
            request.future.set_result(reply)
            self.metrics.reply_latency_seconds.observe(done - request.received)


def _failure_kind(exc: BaseException) -> str:
    import torch

    return "oom" if isinstance(exc, torch.cuda.OutOfMemoryError) else "generation"


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
