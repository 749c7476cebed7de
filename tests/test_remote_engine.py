"""`[model] engine = "openai"` against a fake engine on loopback that speaks vLLM's /v1/completions.

The fake (FakeEngine) is a real aiohttp server answering as vLLM does: a token-id prompt, `stop` strings
and `stop_token_ids` honoured, SSE chunks of one token each with their `token_ids` (`return_token_ids`),
text detokenized incrementally (a character split over byte-fallback tokens is held back, as vLLM's
detokenizer does), the usage chunk and `data: [DONE]`; or one JSON answer when the request is not
streamed (or the script says so). It records every request body, counts requests in flight, and notices
a client that left before the end of a stream. Answers come from a script.

The model folder is the tiny model (finetune/tiny_model.py) with a bunshin.json marked merged, as
`finetune merge` leaves one; the bot's side loads only its tokenizer and manifest. The local ModelBackend
over the same folder (weights loaded) is the reference for prompts and for where a reply is cut.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from conftest import REPO, write_toml

from bot.metrics import BotMetrics
from bot.remote_engine import RemoteBackend
from bot.router import ERROR_REPLY
from bot.worker import GeneratedReply, GenerationFailed, Worker
from finetune.config import BotConfig, ConfigError
from finetune.generation import reply_text
from finetune.manifest import AdapterManifest
from finetune.model_backend import ModelBackend
from finetune.model_loading import load_persona_model
from finetune.prompt import ChatTurn, turn_end
from finetune.tiny_model import build_tiny_model
from finetune.tokenization import load_tokenizer

PERSONA = "美咲"
FRIEND = "健太"
SERVED = "misaki-merged"
GENERATION = {"max_new_tokens": 40, "temperature": 0.0, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.1}


# --------------------------------------------------------------------------- the model folder


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    """The tiny model as `finetune merge` leaves a folder: weights, tokenizer files, bunshin.json (merged)."""
    folder = build_tiny_model(tmp_path_factory.mktemp("remote") / "merged")
    tokenizer = load_tokenizer(str(folder))
    AdapterManifest(
        base_model="tiny", base_revision=None, base_shape={}, tokenizer_fingerprint=tokenizer.fingerprint,
        tokenizer_backend=tokenizer.backend, newline=tokenizer.newline, template="transcript", persona=PERSONA,
        max_length=256, generation=dict(GENERATION), speakers=[PERSONA, FRIEND], merged=True,
    ).write(folder / "bunshin.json")
    return folder


@pytest.fixture(scope="module")
def weightless(merged, tmp_path_factory) -> Path:
    """The same folder without its weights: all a bot in front of a remote engine keeps."""
    folder = tmp_path_factory.mktemp("remote") / "weightless"
    shutil.copytree(merged, folder)
    for weights in [*folder.glob("*.safetensors"), *folder.glob("*.bin")]:
        weights.unlink()
    return folder


@pytest.fixture(scope="module")
def tokenizer(merged):
    return load_tokenizer(str(merged))


@pytest.fixture(scope="module")
def local(merged) -> ModelBackend:
    """The local engines' prompting of the same folder, weights loaded: the reference."""
    return ModelBackend.from_loaded(load_persona_model(merged, device="cpu"), engine="plain")


# --------------------------------------------------------------------------- the fake engine


@dataclass
class Answer:
    reply: str = "うん、いいよ"  # what the model "generates", in people's text (line breaks as \n)
    status: int = 200
    hang_s: float = 0.0  # before anything is answered
    piece_delay_s: float = 0.0  # between streamed tokens
    with_ids: bool = True  # token_ids in the answer (vLLM's return_token_ids); False: text only (SGLang, llama.cpp)
    stream: bool | None = None  # None: as the request asks
    eos: bool = True  # the model ends with EOS after the reply (unless a stop string or max_tokens comes first)
    error_in_stream: bool = False  # an error event after the first token, as vLLM sends one mid-stream
    cut_off_after: int | None = None  # the stream ends after this many tokens: no finish_reason, no [DONE]
    # vLLM (v1) holds back streamed text that may be the start of a stop string; an engine that does not sends
    # `<NL>健太:` before the space that completes the stop string ends the reply.
    hold_back: bool = True
    tokens_per_chunk: int = 1  # vLLM sends several when its client falls behind


@dataclass
class FakeEngine:
    tokenizer: object
    script: list[Answer] = field(default_factory=list)  # next answers, in order; then `default`
    default: Answer = field(default_factory=Answer)
    url: str = ""
    bodies: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    left_early: int = 0  # streams whose client closed the connection before the end
    finished: int = 0
    max_model_len: int = 512  # what GET /models says it serves

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": SERVED, "object": "model", "owned_by": "vllm", "max_model_len": self.max_model_len}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        if len(body.get("stop", [])) > 4:  # vLLM's VLLM_MAX_STOP_STRINGS, OpenAI's limit too
            return web.json_response({"error": {"message": "1 validation error: stop: List should have at most 4 items",
                                                "type": "BadRequestError", "param": None, "code": 400}}, status=400)
        answer = self.script.pop(0) if self.script else self.default
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(answer.hang_s)
            if answer.status != 200:  # vLLM's ErrorResponse
                return web.json_response({"error": {"message": "engine exploded", "type": "InternalServerError",
                                                    "param": None, "code": answer.status}}, status=answer.status)
            tokens = self.generate(body, answer)
            stream = body.get("stream", False) if answer.stream is None else answer.stream
            if stream:
                return await self.stream(request, body, answer, tokens)
            return self.whole(body, answer, tokens)
        finally:
            self.in_flight -= 1

    def generate(self, body: dict, answer: Answer) -> list[tuple[int, str, str | None, str | None]]:
        """(token id, text delta, finish_reason, stop_reason) per token, as vLLM would produce them for `body`."""
        t = self.tokenizer
        ids = t.encode(t.to_model_text(answer.reply)) + ([t.eos_id] if answer.eos else [])
        held = max((len(s) for s in body.get("stop", [])), default=1) - 1 if answer.hold_back else 0
        out, emitted, text = [], "", ""
        for n, token in enumerate(ids[: body["max_tokens"]], 1):
            if token in body.get("stop_token_ids", []) or token == t.eos_id:
                out.append((token, text[len(emitted):], "stop", token))  # what was held back goes with the end
                return out
            text = t.decode(ids[:n])
            stop = next((s for s in body.get("stop", []) if s in text), None)
            if stop is not None:  # vLLM: the text ends before the stop string; the token that completed it counts
                final = text[: text.index(stop)]
                out.append((token, final[len(emitted):], "stop", stop))
                return out
            last = n == min(len(ids), body["max_tokens"])
            ready = text if last else text[: len(text) - held]
            delta = "" if ready.endswith("\ufffd") else ready[len(emitted):]  # a character not complete yet waits
            emitted += delta
            out.append((token, delta, "length" if n == body["max_tokens"] else None, None))
        return out

    def choice(self, answer: Answer, tokens, text: str, finish, stop) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": stop}
        if answer.with_ids:
            choice["token_ids"] = [token for token, *_ in tokens]
        return choice

    def whole(self, body: dict, answer: Answer, tokens) -> web.Response:
        finish, stop = tokens[-1][2], tokens[-1][3]
        choice = self.choice(answer, tokens, "".join(delta for _, delta, *_ in tokens), finish, stop)
        self.finished += 1
        return web.json_response({
            "id": "cmpl-fake", "object": "text_completion", "created": int(time.time()), "model": body["model"],
            "choices": [choice],
            "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(tokens),
                      "total_tokens": len(body["prompt"]) + len(tokens)}})

    async def stream(self, request: web.Request, body: dict, answer: Answer, tokens) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(event) -> None:
            data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
            await response.write(f"data: {data}\n\n".encode())

        head = {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()), "model": body["model"]}
        k = answer.tokens_per_chunk
        try:
            for n, group in enumerate(tokens[i : i + k] for i in range(0, len(tokens), k)):
                if n == answer.cut_off_after:
                    return response
                if answer.error_in_stream and n == 1:
                    await send({"error": {"message": "engine died mid-reply", "type": "InternalServerError",
                                          "code": 500}})
                    await send("[DONE]")
                    return response
                choice = self.choice(answer, group, "".join(delta for _, delta, *_ in group), group[-1][2], group[-1][3])
                if n == 0 and answer.with_ids:
                    choice["prompt_token_ids"] = body["prompt"]
                await send({**head, "choices": [choice], "usage": None})
                await asyncio.sleep(answer.piece_delay_s)
            if body.get("stream_options", {}).get("include_usage"):
                await send({**head, "choices": [], "usage": {"prompt_tokens": len(body["prompt"]),
                                                             "completion_tokens": len(tokens),
                                                             "total_tokens": len(body["prompt"]) + len(tokens)}})
            await send("[DONE]")
            await response.write_eof()
            self.finished += 1
        except (ConnectionResetError, ConnectionError, RuntimeError):  # "Cannot write to closing transport"
            self.left_early += 1
        return response


async def serve(engine: FakeEngine) -> web.AppRunner:
    runner = web.AppRunner(engine.app(), handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    engine.url = f"http://127.0.0.1:{port}"
    return runner


@pytest.fixture
async def engine(tokenizer):
    fake = FakeEngine(tokenizer)
    runner = await serve(fake)
    yield fake
    await runner.cleanup()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remote_config(folder: Path, base_url: str, **model) -> BotConfig:
    return BotConfig.from_dict({
        "model": {"adapter": str(folder), "engine": "openai", "base_url": base_url, "remote_model": SERVED,
                  "max_concurrency": 4, "timeout_s": 5.0, **model},
    }, source="test.toml")


# --------------------------------------------------------------------------- helpers


def chat(text: str, earlier: int = 1) -> list[ChatTurn]:
    turns = []
    for i in range(earlier):
        turns += [ChatTurn(FRIEND, f"おはよう{i}"), ChatTurn(PERSONA, f"おはよう！今日もがんばろう{i}")]
    return turns + [ChatTurn(FRIEND, text)]


def submit(worker: Worker, turns: list[ChatTurn]) -> asyncio.Future:
    now = time.monotonic()
    return worker.submit(turns, deadline=now + 30, received=now)


def errors(metrics: BotMetrics, kind: str) -> float:
    return metrics.registry.get_sample_value("bunshin_errors_total", {"kind": kind}) or 0.0


class running:
    """A real Worker over the remote backend; the stepper's loop and session are released afterwards."""

    def __init__(self, backend, metrics: BotMetrics | None = None) -> None:
        self.metrics = metrics or BotMetrics()
        self.worker = Worker(backend, self.metrics)

    async def __aenter__(self) -> Worker:
        await self.worker.start()
        return self.worker

    async def __aexit__(self, *exc) -> None:
        await self.worker.stop(timeout=10)
        await asyncio.to_thread(self.worker.stepper.release)


def local_cut(tokenizer, ids: list[int], speakers) -> int:
    """How many of `ids` the slot engine generates before it stops: at EOS, or the token that starts a turn."""
    for n, token in enumerate(ids, 1):
        if token == tokenizer.eos_id:
            return n - 1
        if turn_end(tokenizer.from_model_text(tokenizer.decode(ids[:n])), speakers) is not None:
            return n
    return len(ids)


# --------------------------------------------------------------------------- what is sent


async def test_the_prompt_is_bunshins_token_ids_with_the_adapters_settings_and_turn_stops(
        engine, merged, weightless, local, tokenizer, monkeypatch):
    monkeypatch.setenv("BUNSHIN_ENGINE_KEY", "sk-test-engine")
    backend = RemoteBackend.from_config(remote_config(weightless, engine.url + "/v1/", api_key_env="BUNSHIN_ENGINE_KEY"))
    assert backend.persona == PERSONA and backend.prompting.max_prompt_tokens == local.max_prompt_tokens
    short, long = chat("ラーメン食べに行こうよ"), chat("明日の予定って空いてる？", earlier=40)
    assert len(local.prompt_ids(long)) < len(tokenizer.encode(tokenizer.to_model_text(
        "\n".join(f"{t.speaker}: {t.text}" for t in long))))  # the long chat really is cut to fit

    async with running(backend) as worker:
        replies = await asyncio.wait_for(asyncio.gather(submit(worker, short), submit(worker, long)), 20)
    assert all(isinstance(r, GeneratedReply) and r.text == "うん、いいよ" for r in replies)

    sent = {tuple(b["prompt"]) for b in engine.bodies}
    assert sent == {tuple(local.prompt_ids(short)), tuple(local.prompt_ids(long))}
    # What bot/api.py asks of a backend (its usage counts and finish reason) is the local one's too.
    assert backend.prompt_ids(long) == local.prompt_ids(long) and backend.settings == local.settings
    body = engine.bodies[0]
    assert body["model"] == SERVED and body["stream"] is True and body["return_token_ids"] is True
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["repetition_penalty"]) == (40, 0.0, 0.9, 1.1)
    assert "top_k" not in body  # 0 (off) is left out: older vLLM refuses 0
    assert body["stop_token_ids"] == [tokenizer.eos_id]
    # Where turn_end cuts (`\nname: `), in the model's spelling: rinna writes a line break as <NL>.
    assert set(body["stop"]) == {f"<NL>{FRIEND}: ", f"<NL>{PERSONA}: "}
    assert engine.headers[0]["Authorization"] == "Bearer sk-test-engine"


async def test_a_reply_is_cut_where_the_local_engine_cuts_it(engine, weightless, tokenizer):
    speakers = sorted({PERSONA, FRIEND})
    known = "うん、いいよ\n健太: じゃあ駅で"  # a known speaker: the engine's stop string ends it
    invented = "うん、いいよ\n太郎: 僕も行く\nそれな"  # an invented one: no stop string, cut here as it streams
    two_lines = "うん、いいよ\n駅前の新しいお店"  # a line break that is no turn: kept
    engine.script = [
        Answer(known), Answer(known, with_ids=False), Answer(known, stream=False),
        Answer(invented, piece_delay_s=0.05, eos=False), Answer(invented, with_ids=False, piece_delay_s=0.05, eos=False),
        Answer(two_lines), Answer(two_lines, with_ids=False),
        Answer(known, with_ids=False, hold_back=False), Answer(known, with_ids=False, stream=False, hold_back=False),
    ]
    backend = RemoteBackend.from_config(remote_config(weightless, engine.url + "/v1", max_concurrency=1))
    async with running(backend) as worker:
        replies = [await asyncio.wait_for(submit(worker, chat(f"メッセージ{i}")), 20) for i in range(9)]

    def local_reply(text: str) -> tuple[str, int]:
        ids = tokenizer.encode(tokenizer.to_model_text(text))
        n = local_cut(tokenizer, ids, speakers)
        return reply_text(tokenizer, ids[:n], speakers), n

    expected = [local_reply(known)] * 3 + [local_reply(invented)] * 2 + [local_reply(two_lines)] * 2 + [
        local_reply(known)] * 2
    assert [r.text for r in replies] == [text for text, _ in expected]
    assert [r.text for r in replies[:5]] == ["うん、いいよ"] * 5 and replies[5].text == "うん、いいよ\n駅前の新しいお店"
    # With token ids the count is the local engine's exactly; with text only, one per streamed piece.
    assert [replies[i].tokens for i in (0, 2, 3, 5)] == [expected[i][1] for i in (0, 2, 3, 5)]
    # The invented turn: the client left mid-stream (vLLM then aborts the request), not reading to max_tokens.
    for _ in range(100):  # the fake notices at its next write
        if engine.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.left_early == 2 and engine.finished == 7


async def test_a_turn_cut_here_counts_the_tokens_the_local_engine_generates_however_they_are_chunked(
        engine, weightless, tokenizer):
    invented = "うん、いいよ\n太郎: 僕も行く\nそれな"  # no stop string lists 太郎: cut here, from chunks of 3 tokens
    engine.script = [Answer(invented, eos=False, tokens_per_chunk=3, piece_delay_s=0.05)]
    backend = RemoteBackend.from_config(remote_config(weightless, engine.url + "/v1"))
    async with running(backend) as worker:
        reply = await asyncio.wait_for(submit(worker, chat("行く？")), 20)
    ids = tokenizer.encode(tokenizer.to_model_text(invented))
    n = local_cut(tokenizer, ids, sorted({PERSONA, FRIEND}))
    assert n % 3 != 0  # the turn starts inside a chunk: the chunk brought tokens past it
    assert (reply.text, reply.tokens) == ("うん、いいよ", n)


async def test_four_stop_strings_at_most_go_to_the_engine_and_a_turn_of_another_speaker_is_cut_here(
        engine, weightless, tokenizer):
    """A group chat has more speakers than an engine takes stop strings (vLLM and OpenAI: 4). Those who spoke last
    go to the engine; a turn the model starts for one of the others is cut here, where the local engine cuts it."""
    others = ["一郎", "二郎", "三郎", "四郎"]
    turns = [ChatTurn(name, f"{name}です") for name in others] + chat("みんなで行こう")
    engine.script = [Answer(f"うん、いいよ\n{others[0]}: 僕も", piece_delay_s=0.05, eos=False)]
    backend = RemoteBackend.from_config(remote_config(weightless, engine.url + "/v1"))
    async with running(backend) as worker:
        reply = await asyncio.wait_for(submit(worker, turns), 20)
    [body] = engine.bodies
    # Latest first: 健太 (the last message), 美咲, then 四郎 and 三郎; 一郎 and 二郎 spoke earlier.
    assert body["stop"] == [f"<NL>{name}: " for name in (FRIEND, PERSONA, others[3], others[2])]
    assert reply.text == "うん、いいよ"
    ids = tokenizer.encode(tokenizer.to_model_text(f"うん、いいよ\n{others[0]}: 僕も"))
    assert reply.tokens == local_cut(tokenizer, ids, sorted({*others, FRIEND, PERSONA}))
    for _ in range(100):  # the fake notices at its next write
        if engine.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.left_early == 1  # closed at 一郎's turn, not read to the end


async def test_prompts_are_fitted_to_an_engine_that_serves_less_than_the_models_context(
        engine, weightless, local, caplog):
    """vLLM refuses a prompt over its --max-model-len and silently shortens a reply whose prompt + max_tokens pass
    it: told a smaller max_model_len, the stepper fits prompts to it less max_new_tokens (the reply's whole room)."""
    engine.max_model_len = 200
    backend = RemoteBackend.from_config(remote_config(weightless, engine.url + "/v1"))
    long = chat("明日の予定って空いてる？", earlier=40)
    assert len(backend.prompt_ids(long)) > 200
    async with running(backend) as worker:
        await asyncio.wait_for(submit(worker, long), 20)
    assert backend.prompting.max_prompt_tokens == 200 - 40
    [body] = engine.bodies
    assert len(body["prompt"]) <= 160 and body["max_tokens"] == 40
    local_prompt = dataclasses.replace(local, max_prompt_tokens=160).prompt_ids(long)
    assert body["prompt"] == local_prompt  # the local rule, on the engine's context
    assert "prompts are fitted to 160 tokens" in caplog.text and "--max-model-len 512" in caplog.text


async def test_requests_in_flight_never_exceed_max_concurrency(engine, weightless):
    engine.default = Answer(piece_delay_s=0.02)
    backend = RemoteBackend.from_config(remote_config(weightless, engine.url + "/v1", max_concurrency=3))
    async with running(backend) as worker:
        assert worker.stepper.capacity == 3
        replies = await asyncio.wait_for(asyncio.gather(*(submit(worker, chat(f"質問{i}")) for i in range(12))), 30)
    assert all(r.text == "うん、いいよ" for r in replies)
    assert len(engine.bodies) == 12 and engine.max_in_flight == 3


# --------------------------------------------------------------------------- an engine that fails


@pytest.mark.parametrize("fault", ["down", "http-500", "hang", "error-in-stream", "cut-off"])
async def test_a_failing_engine_fails_that_request_with_kind_engine_and_the_worker_goes_on(
        engine, weightless, fault):
    base_url = f"http://127.0.0.1:{closed_port()}/v1" if fault == "down" else engine.url + "/v1"
    engine.script = {
        "down": [],
        "http-500": [Answer(status=500)],
        "hang": [Answer(hang_s=3)],
        "error-in-stream": [Answer(error_in_stream=True)],
        "cut-off": [Answer(cut_off_after=2)],
    }[fault]
    backend = RemoteBackend.from_config(remote_config(weightless, base_url, timeout_s=0.5))
    metrics = BotMetrics()
    async with running(backend, metrics) as worker:
        bad = submit(worker, chat("一通目"))
        with pytest.raises(GenerationFailed) as failed:
            await asyncio.wait_for(bad, 20)
        assert failed.value.kind == "engine"
        assert errors(metrics, "engine") == 1 and errors(metrics, "generation") == 0
        assert metrics.registry.get_sample_value("bunshin_reply_latency_seconds_count") == 0
        if fault != "down":  # the engine is well again: the next message is answered
            after = await asyncio.wait_for(submit(worker, chat("二通目")), 20)
            assert after.text == "うん、いいよ"
    expected = {"down": "cannot connect", "http-500": "HTTP 500: engine exploded", "hang": "sent nothing for 0.5 s",
                "error-in-stream": "engine died mid-reply", "cut-off": "ended the stream before the reply"}[fault]
    assert expected in failed.value.message
    assert "127.0.0.1" in failed.value.message


async def test_one_failed_request_does_not_fail_the_others_in_flight(engine, weightless):
    engine.script = [Answer(piece_delay_s=0.1), Answer(status=500)]
    backend = RemoteBackend.from_config(remote_config(weightless, engine.url + "/v1"))
    metrics = BotMetrics()
    async with running(backend, metrics) as worker:
        slow = submit(worker, chat("ゆっくり"))
        await asyncio.sleep(0.2)  # the slow one is streaming when the other fails
        failing = submit(worker, chat("失敗する"))
        results = await asyncio.wait_for(asyncio.gather(slow, failing, return_exceptions=True), 20)
    assert isinstance(results[0], GeneratedReply) and results[0].text == "うん、いいよ"
    assert isinstance(results[1], GenerationFailed) and results[1].kind == "engine"
    assert errors(metrics, "engine") == 1


# --------------------------------------------------------------------------- configuration


def test_engine_openai_needs_an_endpoint_and_a_model_name():
    with pytest.raises(ConfigError) as problem:
        BotConfig.from_dict({"model": {"engine": "openai"}}, source="bot.toml")
    assert str(problem.value) == 'bot.toml: [model]: engine = "openai" needs base_url and remote_model'
    with pytest.raises(ConfigError, match=r"\[model\] base_url: must be an http\(s\) URL"):
        BotConfig.from_dict({"model": {"engine": "openai", "base_url": "127.0.0.1:8000", "remote_model": "x"}})
    with pytest.raises(ConfigError, match=r"\[model\] api_key_env: must name an environment variable"):
        BotConfig.from_dict({"model": {"engine": "openai", "base_url": "http://h/v1", "remote_model": "x",
                                       "api_key_env": "sk-123"}})
    config = BotConfig.from_dict({"model": {"engine": "openai", "base_url": "http://h/v1", "remote_model": "x",
                                            "api_key_env": "ENGINE_KEY"}, "persona": {"name": PERSONA}}, source="bot.toml")
    with pytest.raises(ConfigError, match=r"\[model\] api_key_env: environment variable ENGINE_KEY is not set"):
        config.check_ready(environ={})
    config.check_ready(environ={"ENGINE_KEY": "sk-1"})
    # The local engines ask for no key, whatever api_key_env says.
    BotConfig.from_dict({"model": {"api_key_env": "ENGINE_KEY"}, "persona": {"name": PERSONA}}).check_ready(environ={})


def test_a_tokenizer_other_than_the_adapters_is_refused(weightless, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(weightless, folder)
    manifest = json.loads((folder / "bunshin.json").read_text(encoding="utf-8"))
    manifest["tokenizer_fingerprint"] = "0" * 64
    (folder / "bunshin.json").write_text(json.dumps(manifest), encoding="utf-8")
    from finetune.model_loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="refusing to mix"):
        RemoteBackend.from_config(remote_config(folder, "http://127.0.0.1:1/v1"))


# --------------------------------------------------------------------------- the daemon


# `python -m bot` as an operator runs it, reporting at exit whether torch was ever imported.
DAEMON = ("import sys; from bot.cli import main; rc = main(sys.argv[1:]); "
          "print('torch imported:', 'torch' in sys.modules, file=sys.stderr); sys.exit(rc)")


def daemon_on(fake: FakeEngine, weightless: Path, tmp_path: Path, lines: str, **sections):
    """`python -m bot` with the console (as 健太) in front of `fake`, `lines` typed in; `sections` add keys."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = asyncio.run_coroutine_threadsafe(serve(fake), loop).result(10)
    table = {
        "model": {"adapter": str(weightless), "engine": "openai", "base_url": fake.url + "/v1",
                  "remote_model": SERVED, "api_key_env": "BUNSHIN_ENGINE_KEY"},
        "memory": {"path": str(tmp_path / "memory.sqlite3")},
        "console": {"enabled": True, "user_name": FRIEND},
        "server": {"port": 0},
    }
    for name, values in sections.items():
        table.setdefault(name, {}).update(values)
    try:
        config = write_toml(tmp_path / "bot.toml", table)
        import subprocess

        return subprocess.run(
            [sys.executable, "-c", DAEMON, "--config", str(config)], cwd=REPO, input=lines,
            capture_output=True, text=True, encoding="utf-8", timeout=120,
            env={**os.environ, "PYTHONIOENCODING": "utf-8", "BUNSHIN_ENGINE_KEY": "sk-daemon"},
        )
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_the_daemon_serves_from_the_remote_engine_without_weights_or_torch(weightless, tokenizer, tmp_path):
    assert not list(weightless.glob("*.safetensors"))
    fake = FakeEngine(tokenizer, script=[Answer("うん、いいよ\n健太: またね"), Answer(status=500)])
    done = daemon_on(fake, weightless, tmp_path, "おはよう\n今日ひま？\n")
    assert done.returncode == 0, done.stderr
    replies = [line for line in done.stdout.splitlines() if line.startswith(f"{PERSONA}: ")]
    assert replies == [f"{PERSONA}: うん、いいよ", f"{PERSONA}: {ERROR_REPLY}"]
    assert "torch imported: False" in done.stderr
    assert f"remote engine at {fake.url} serves {SERVED!r}" in done.stderr
    assert "sk-daemon" not in done.stderr and fake.headers[0]["Authorization"] == "Bearer sk-daemon"
    # The second message's prompt holds the first exchange, as the local engines' would.
    second = tokenizer.decode(fake.bodies[1]["prompt"])
    assert "おはよう" in second and "うん、いいよ" in second and second.endswith(f"{PERSONA}: ")


def test_the_engine_is_sent_the_profile_and_each_replys_recalled_notes(weightless, tokenizer, tmp_path):
    """The daemon's router recalls the chat's own past beyond the window and the remote engine gets it in the
    prompt, with the profile on top, as the local engines would (bot/reply_memory.py)."""
    profile = tmp_path / "profile.txt"
    profile.write_text("# 美咲のこと\n新潟出身\n", encoding="utf-8")
    said = ["うちの猫はこむぎって名前", "今日は雨", "お昼なに食べた？", "電車こんでた", "眠い", "また明日ね",
            "猫の名前おぼえてる？"]
    fake = FakeEngine(tokenizer, default=Answer("うん"))
    done = daemon_on(fake, weightless, tmp_path, "".join(line + "\n" for line in said),
                     memory={"max_turns": 2, "notes": 2, "profile": str(profile)},
                     limits={"messages_per_minute": 6000.0, "burst": 1000})
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stderr
    prompts = [tokenizer.from_model_text(tokenizer.decode(body["prompt"])) for body in fake.bodies]
    assert len(prompts) == len(said)
    assert all(p.startswith(f"［{PERSONA}のプロフィール］\n新潟出身\n［ここまで］\n") for p in prompts)
    last = prompts[-1]
    # Past the 2-turn window by now, the cat's name is a note: after the older turn, right before the latest message.
    assert "こむぎ" in last[last.index("［記憶］"):] and last.endswith(f"［ここまで］\n{FRIEND}: {said[-1]}\n{PERSONA}: ")
    assert "こむぎ" not in last[: last.index("［記憶］")]


@pytest.mark.parametrize("with_ids", [True, False], ids=["token-ids", "text-only"])
async def test_a_streamed_reply_comes_piece_by_piece_and_never_shows_a_part_of_another_speakers_turn(
        engine, weightless, tokenizer, with_ids):
    """`stream: true` through the remote engine: the pieces come while the engine still generates, add up to the
    reply, and hold back a line that may still become someone's turn (太郎 is no known speaker: no stop string)."""
    invented = "うん、いいよ。駅の前で待ってるね\n太郎: 僕も行く\nそれな"
    engine.script = [Answer(invented, eos=False, piece_delay_s=0.05, with_ids=with_ids)]
    backend = RemoteBackend.from_config(remote_config(weightless, engine.url + "/v1"))
    pieces: list[tuple[float, str]] = []
    async with running(backend) as worker:
        now = time.monotonic()
        future = worker.submit(chat("行く？"), deadline=now + 30, received=now,
                               on_text=lambda text: pieces.append((time.monotonic(), text)))
        reply = await asyncio.wait_for(future, 20)
        done = time.monotonic()
    speakers = sorted({PERSONA, FRIEND})
    ids = tokenizer.encode(tokenizer.to_model_text(invented))
    expected = reply_text(tokenizer, ids[: local_cut(tokenizer, ids, speakers)], speakers)
    assert reply.text == expected == "うん、いいよ。駅の前で待ってるね"
    assert "".join(text for _, text in pieces).strip() == reply.text
    assert len(pieces) >= 3 and pieces[0][0] < done - 0.2  # the first piece well before the reply's end
    assert not any("太郎" in text or text.endswith("\n") for _, text in pieces)
    assert reply.finish_reason == "stop"
    if with_ids:
        assert reply.tokens == local_cut(tokenizer, ids, speakers)
