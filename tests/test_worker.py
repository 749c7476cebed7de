"""The model worker on a real tiny model: batching, busy, deadlines, errors, shutdown, metrics.

The model is a random GPT-NeoX with a rinna-shaped tokenizer (finetune/tiny_model.py), built once
per module; its replies are nonsense, so tests check where replies go, not what they say. Wrappers
around the real backend only add what a test needs to control: a gate to hold a generation in
flight, a delay, or an injected error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time

import pytest
import torch

from bot.metrics import BotMetrics
from bot.worker import (
    DeadlineExceeded,
    GeneratedReply,
    GenerationFailed,
    QueueFull,
    Worker,
    WorkerStopped,
)
from finetune.manifest import AdapterManifest
from finetune.model_backend import ModelBackend
from finetune.model_loading import load_base_model
from finetune.prompt import ChatTurn
from finetune.tiny_model import build_tiny_model

PERSONA = "美咲"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_base_model(str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")), device="cpu")


@pytest.fixture(scope="module")
def backend(loaded):
    return ModelBackend.from_loaded(loaded, persona=PERSONA, template="transcript",
                                    generation_overrides={"max_new_tokens": 8})


class Recording:
    """The real backend, remembering each batch it was given and what it returned."""

    def __init__(self, inner: ModelBackend) -> None:
        self.inner = inner
        self.calls: list[tuple[list[list[ChatTurn]], list[tuple[str, int]]]] = []

    def generate(self, conversations):
        results = self.inner.generate(conversations)
        self.calls.append((conversations, results))
        return results

    def seen(self) -> list[str]:
        return [turns[-1].text for conversations, _ in self.calls for turns in conversations]


class Gated(Recording):
    """Holds every generation until `release` is set, so a test knows exactly what is in flight."""

    def __init__(self, inner: ModelBackend) -> None:
        super().__init__(inner)
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()

    def generate(self, conversations):
        self.started.set()
        assert self.release.wait(10), "test never released the generation"
        try:
            return super().generate(conversations)
        finally:
            self.finished.set()


class Faulty(Recording):
    """Raises `error` for a batch holding a message that contains TRIGGER."""

    def __init__(self, inner: ModelBackend, error: BaseException) -> None:
        super().__init__(inner)
        self.error = error

    def generate(self, conversations):
        if any("TRIGGER" in t.text for turns in conversations for t in turns):
            raise self.error
        return super().generate(conversations)


class Slow(Recording):
    def generate(self, conversations):
        time.sleep(0.3)  # blocks its thread as a real GPU generation does
        return super().generate(conversations)


def chat(text: str) -> list[ChatTurn]:
    return [ChatTurn("健太", "おはよう"), ChatTurn(PERSONA, "おはよう！"), ChatTurn("健太", text)]


def submit(worker: Worker, text: str, *, deadline_in: float = 30.0) -> asyncio.Future:
    now = time.monotonic()
    return worker.submit(chat(text), deadline=now + deadline_in, received=now)


def sample(metrics: BotMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def running(worker: Worker):
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop(timeout=10)


async def wait_started(gated: Gated) -> None:
    assert await asyncio.to_thread(gated.started.wait, 10), "the worker never started generating"


# --------------------------------------------------------------------------- batching


async def test_twenty_chats_at_once_are_all_answered_in_batches(backend):
    metrics, recording = BotMetrics(), Recording(backend)
    async with running(Worker(recording, metrics, max_batch=8)) as worker:
        texts = [f"メッセージ{i}" for i in range(20)]
        replies = await asyncio.wait_for(asyncio.gather(*(submit(worker, t) for t in texts)), 20)

    assert all(isinstance(r, GeneratedReply) and isinstance(r.text, str) and r.tokens >= 0 for r in replies)
    # Each future got the result generated for its own conversation, wherever it sat in its batch.
    generated = {turns[-1].text: result for conversations, results in recording.calls
                 for turns, result in zip(conversations, results, strict=True)}
    assert sorted(generated) == sorted(texts)
    assert [(r.text, r.tokens) for r in replies] == [generated[t] for t in texts]

    sizes = [len(conversations) for conversations, _ in recording.calls]
    assert sum(sizes) == 20 and max(sizes) > 1 and max(sizes) <= 8
    assert sample(metrics, "bunshin_batch_size_count") == len(sizes) < 20
    assert sample(metrics, "bunshin_batch_size_sum") == 20
    assert sample(metrics, "bunshin_batch_size_bucket", le="1.0") < len(sizes)  # some batch held more than one
    assert sample(metrics, "bunshin_reply_latency_seconds_count") == 20
    assert sample(metrics, "bunshin_generated_tokens_total") == sum(r.tokens for r in replies)
    assert sample(metrics, "bunshin_queue_depth") == 0


async def test_a_full_queue_is_refused_at_once_and_the_queued_are_still_answered(backend):
    metrics, gated = BotMetrics(), Gated(backend)
    try:
        async with running(Worker(gated, metrics, max_queue=2)) as worker:
            in_flight = submit(worker, "一通目")
            await wait_started(gated)  # the worker took it off the queue and is generating
            queued = [submit(worker, "二通目"), submit(worker, "三通目")]
            assert sample(metrics, "bunshin_queue_depth") == 2

            begun = time.monotonic()
            with pytest.raises(QueueFull):
                submit(worker, "四通目")
            assert time.monotonic() - begun < 0.1
            assert worker.queue_depth == 2

            gated.release.set()
            replies = await asyncio.wait_for(asyncio.gather(in_flight, *queued), 10)
    finally:
        gated.release.set()
    assert all(isinstance(r, GeneratedReply) for r in replies)
    assert sorted(gated.seen()) == sorted(["一通目", "二通目", "三通目"])  # the refused one never reached the model


# --------------------------------------------------------------------------- errors and deadlines


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (RuntimeError("boom"), "generation"),
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom"),
    ],
    ids=["runtime-error", "cuda-oom"],
)
async def test_a_failed_generation_answers_its_batch_with_an_error_and_the_worker_goes_on(backend, error, kind):
    metrics, faulty = BotMetrics(), Faulty(backend, error)
    async with running(Worker(faulty, metrics)) as worker:
        # Submitted together, so they share one batch: the innocent one fails with the bad one.
        bad, batch_mate = submit(worker, "TRIGGER"), submit(worker, "こんにちは")
        results = await asyncio.wait_for(asyncio.gather(bad, batch_mate, return_exceptions=True), 10)
        assert all(isinstance(r, GenerationFailed) and r.kind == kind for r in results), results
        assert type(error).__name__ in results[0].message
        assert sample(metrics, "bunshin_errors_total", kind=kind) == 2
        assert sample(metrics, "bunshin_reply_latency_seconds_count") == 0  # no reply was ready

        after = await asyncio.wait_for(submit(worker, "次のメッセージ"), 10)
    assert isinstance(after, GeneratedReply)
    assert faulty.seen() == ["次のメッセージ"]
    assert sample(metrics, "bunshin_reply_latency_seconds_count") == 1


async def test_an_expired_request_is_dropped_without_generating(backend):
    metrics, recording = BotMetrics(), Recording(backend)
    async with running(Worker(recording, metrics)) as worker:
        expired, live = submit(worker, "遅すぎた", deadline_in=-1), submit(worker, "間に合った")
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(expired, 10)
        assert isinstance(await asyncio.wait_for(live, 10), GeneratedReply)
    assert recording.seen() == ["間に合った"]
    assert sample(metrics, "bunshin_batch_size_sum") == 1
    assert sample(metrics, "bunshin_errors_total", kind="deadline") == 1


async def test_a_request_cancelled_by_its_caller_is_skipped_and_the_loop_goes_on(backend):
    metrics, gated = BotMetrics(), Gated(backend)
    try:
        async with running(Worker(gated, metrics)) as worker:
            first = submit(worker, "一通目")
            await wait_started(gated)
            abandoned = submit(worker, "取り消し")
            abandoned.cancel()
            gated.release.set()
            assert isinstance(await asyncio.wait_for(first, 10), GeneratedReply)
            assert isinstance(await asyncio.wait_for(submit(worker, "三通目"), 10), GeneratedReply)
    finally:
        gated.release.set()
    assert gated.seen() == ["一通目", "三通目"]


# --------------------------------------------------------------------------- shutdown


async def test_stop_finishes_work_in_flight_and_refuses_new_requests(backend):
    metrics, gated = BotMetrics(), Gated(backend)
    worker = Worker(gated, metrics)
    await worker.start()
    try:
        in_flight = submit(worker, "一通目")
        await wait_started(gated)
        queued = submit(worker, "二通目")
        stopping = asyncio.create_task(worker.stop(timeout=10))
        await asyncio.sleep(0.01)
        assert not stopping.done()  # waiting for the generation it must finish
        with pytest.raises(WorkerStopped):
            submit(worker, "三通目")
        gated.release.set()
        await asyncio.wait_for(stopping, 10)
    finally:
        gated.release.set()
    assert isinstance(in_flight.result(), GeneratedReply)
    assert isinstance(queued.result(), GeneratedReply)
    with pytest.raises(WorkerStopped):
        submit(worker, "四通目")


async def test_stop_fails_what_it_cannot_finish_within_the_timeout(backend):
    gated = Gated(backend)
    worker = Worker(gated, BotMetrics())
    await worker.start()
    try:
        in_flight, queued = submit(worker, "一通目"), None
        await wait_started(gated)
        queued = submit(worker, "二通目")
        begun = time.monotonic()
        await worker.stop(timeout=0.1)
        assert time.monotonic() - begun < 2
        for future in (in_flight, queued):
            with pytest.raises(WorkerStopped):
                future.result()
    finally:
        gated.release.set()
        # The abandoned generation still runs in its thread: let it end before the model is reused.
        assert await asyncio.to_thread(gated.finished.wait, 10)


# --------------------------------------------------------------------------- the event loop, metrics, backend


async def test_the_event_loop_keeps_running_during_a_generation(backend):
    slow = Slow(backend)
    async with running(Worker(slow, BotMetrics())) as worker:
        reply = submit(worker, "ゆっくり")
        ticks = 0
        while not reply.done():
            await asyncio.sleep(0.01)
            ticks += 1
    assert isinstance(reply.result(), GeneratedReply)
    # 0.3 s of blocking generation: ~30 ticks if it runs in a thread, 1 or 2 if it blocked the loop.
    assert ticks >= 10


async def test_metrics_render_in_prometheus_text_format(backend):
    metrics = BotMetrics()
    async with running(Worker(Recording(backend), metrics)) as worker:
        await asyncio.wait_for(submit(worker, "こんにちは"), 10)
    text = metrics.render().decode()
    assert metrics.content_type.startswith("text/plain")
    for line in (
        "bunshin_queue_depth 0.0",
        'bunshin_batch_size_bucket{le="1.0"} 1.0',
        "bunshin_reply_latency_seconds_count 1.0",
        "bunshin_generation_seconds_count 1.0",
        "bunshin_generated_tokens_total",
        'bunshin_messages_total{outcome="replied"}',  # recorded by the router
        'bunshin_messages_total{outcome="rate_limited"} 0.0',
        'bunshin_errors_total{kind="oom"} 0.0',
    ):
        assert line in text, line
    assert BotMetrics().render().count(b"bunshin_") > 0  # a second instance: no clash on a global registry


def test_backend_defaults_for_a_base_model_and_from_an_adapter_manifest(loaded, backend):
    assert (backend.persona, backend.template) == (PERSONA, "transcript")
    assert backend.settings.max_new_tokens == 8
    assert backend.max_prompt_tokens == loaded.model.config.max_position_embeddings - 8
    with pytest.raises(ValueError, match="persona"):
        ModelBackend.from_loaded(loaded)
    with pytest.raises(ValueError, match="unknown generation"):
        ModelBackend.from_loaded(loaded, persona=PERSONA, generation_overrides={"max_tokens": 8})

    manifest = AdapterManifest(
        base_model="tiny", base_revision=None, base_shape={}, tokenizer_fingerprint=loaded.tokenizer.fingerprint,
        tokenizer_backend="sentencepiece", newline="<NL>", template="instruction", persona="健太", max_length=256,
        generation={"max_new_tokens": 40, "temperature": 0.0, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.1},
        speakers=["美咲", "健太"],
    )
    adapter = dataclasses.replace(loaded, manifest=manifest)
    from_manifest = ModelBackend.from_loaded(adapter, generation_overrides={"max_new_tokens": 20})
    assert (from_manifest.persona, from_manifest.template, from_manifest.speakers) == ("健太", "instruction", ("美咲", "健太"))
    assert (from_manifest.settings.temperature, from_manifest.settings.max_new_tokens) == (0.0, 20)
    # The model's whole context, not the manifest's training length (256): long chats keep more of themselves.
    assert from_manifest.max_prompt_tokens == loaded.model.config.max_position_embeddings - 20
    with pytest.raises(ValueError, match="trained with persona"):
        ModelBackend.from_loaded(adapter, persona=PERSONA)
    # Greedy (the manifest's temperature 0) through the real model: one reply per conversation.
    [(text, tokens)] = from_manifest.generate([chat("こんにちは")])
    assert isinstance(text, str) and 0 <= tokens <= 20
