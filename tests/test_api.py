"""bunshin's OpenAI-compatible API, driven by the official `openai` client against the real daemon.

The daemon (bot.daemon.run_daemon) runs in a thread of this process with the real worker and the tiny
model's real backend, serving on 127.0.0.1 at a port it picks; the clients talk to it over HTTP as any tool
would. The backend is wrapped only to hold a generation in the worker's thread (a full queue, a deadline),
to fail one, and to record the turns it was given: the replies are the tiny model's, greedy, so a reply can
be compared with what the same backend generates for the same turns.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.request

import openai
import pytest
from conftest import run_cli, write_toml

from finetune.config import BotConfig
from finetune.prompt import ChatTurn
from tests.support.api_daemon import KEY, PERSONA, HeldBackend, client, get_json, serving, tiny_backend


@pytest.fixture(scope="module")
def inner(tmp_path_factory):
    return tiny_backend(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def held(inner):
    return HeldBackend(inner)


@pytest.fixture(scope="module")
def api(tmp_path_factory, held):
    with serving(tmp_path_factory.mktemp("api"), held, queue={"max_batch": 1, "max_size": 1}) as url:
        yield url


CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "name": "健太", "content": "おはよう、今日ひま?"},
    {"role": "assistant", "content": "ひまだよ"},
    {"role": "user", "content": [{"type": "text", "text": "じゃあ駅前のラーメン行こう"}]},
]
# What the persona reads: the system message dropped, the names as the prompt renderer takes them.
TURNS = [ChatTurn("健太", "おはよう、今日ひま?"), ChatTurn(PERSONA, "ひまだよ"), ChatTurn("あなた", "じゃあ駅前のラーメン行こう")]


def test_models_lists_the_persona(api):
    models = client(api).models.list()
    assert [(m.id, m.owned_by, m.object) for m in models.data] == [(PERSONA, "bunshin", "model")]
    assert client(api).models.retrieve(PERSONA).id == PERSONA
    with pytest.raises(openai.NotFoundError):
        client(api).models.retrieve("gpt-4o")


def test_a_reply_is_what_the_worker_generates_for_the_same_turns(api, held, inner):
    held.seen.clear()
    # temperature 0 and max_tokens over [generation] max_new_tokens (12): the reply the worker makes by default.
    raw = client(api).chat.completions.with_raw_response.create(model=PERSONA, messages=CONVERSATION, temperature=0,
                                                                 max_tokens=50, presence_penalty=0.5)
    completion = raw.parse()
    assert held.seen == [TURNS]
    [(text, tokens)] = inner.generate([TURNS])
    assert completion.object == "chat.completion" and completion.model == PERSONA
    assert completion.choices[0].message.role == "assistant" and completion.choices[0].message.content == text
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens == tokens
    assert completion.usage.prompt_tokens == len(inner.prompt_ids(TURNS))
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + tokens
    # Not applied, and said so: the system message and presence_penalty; temperature and max_tokens are applied.
    assert raw.headers["x-bunshin-ignored"] == "presence_penalty, messages[0] (system)"


def test_streaming_sends_the_same_reply_as_chunks(api, inner):
    [(text, tokens)] = inner.generate([TURNS])
    stream = client(api).chat.completions.create(model=PERSONA, messages=CONVERSATION, stream=True,
                                                 stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == text
    assert with_choices[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == tokens


def test_the_async_client_streams_and_not(api, inner):
    [(text, _)] = inner.generate([TURNS])

    async def talk():
        async with openai.AsyncOpenAI(base_url=api, api_key=KEY, max_retries=0, timeout=30) as aclient:
            whole = await aclient.chat.completions.create(model=PERSONA, messages=CONVERSATION)
            parts = [c.choices[0].delta.content or "" async for c in
                     await aclient.chat.completions.create(model=PERSONA, messages=CONVERSATION, stream=True)
                     if c.choices]
            return whole.choices[0].message.content, "".join(parts)

    assert asyncio.run(talk()) == (text, text)


def test_a_wrong_or_missing_key_is_refused_in_openais_shape(api):
    with pytest.raises(openai.AuthenticationError) as refused:
        client(api, key="sk-wrong").chat.completions.create(model=PERSONA, messages=CONVERSATION)
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(api, key=KEY + "x").models.list()
    status, body = get_json(api + "/models")
    assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}
    assert KEY not in json.dumps(body)


def test_malformed_requests_are_400_naming_the_field(api, held):
    held.seen.clear()
    with pytest.raises(openai.BadRequestError) as bad:
        client(api).chat.completions.create(model=PERSONA, messages=CONVERSATION, n=2)
    assert bad.value.param == "n"
    with pytest.raises(openai.BadRequestError) as bad:
        client(api).chat.completions.create(model=PERSONA, messages=[])
    assert bad.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as bad:
        client(api).chat.completions.create(model=PERSONA, messages=[{"role": "tool", "content": "42",
                                                                      "tool_call_id": "x"}])
    assert bad.value.param == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as bad:
        client(api).chat.completions.create(model=PERSONA, messages=CONVERSATION, temperature=5)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as bad:
        client(api).chat.completions.create(model=PERSONA, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
    assert bad.value.param == "messages[0].content[0]"
    with pytest.raises(openai.BadRequestError) as bad:
        client(api).chat.completions.create(model=PERSONA, messages=[{"role": "user", "name": "健太\n美咲",
                                                                      "content": "a"}])
    assert bad.value.param == "messages[0].name"
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    status, body = get_json(api + "/chat/completions", b'{"model": "x", "messages": [', auth)
    assert status == 400 and "the body is not JSON (" in body["error"]["message"]
    status, body = get_json(api + "/chat/completions", json.dumps({"model": PERSONA}).encode(), auth)
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = get_json(api + "/chat/completions", b"[" + b" " * (2 * 1024 * 1024) + b"]", auth)
    assert status == 413 and "max_body_bytes" in body["error"]["message"]
    assert held.seen == []  # none of them reached the model


def test_a_full_queue_is_429_with_retry_after(api, held):
    """max_batch 1, max_size 1: one reply generating (held at the gate), one waiting; the next is turned away."""
    held.gate.clear()
    held.generating.clear()
    replies: list = []

    def ask():
        replies.append(client(api).chat.completions.create(model=PERSONA, messages=CONVERSATION))

    first = threading.Thread(target=ask)
    first.start()
    assert held.generating.wait(10)
    second = threading.Thread(target=ask)
    second.start()
    health = api.replace("/v1", "/healthz")
    deadline = time.monotonic() + 10
    while get_json(health)[1].get("queue_depth") != 1:
        assert time.monotonic() < deadline, "the second request never reached the queue"
        time.sleep(0.02)
    with pytest.raises(openai.RateLimitError) as busy:
        client(api).chat.completions.create(model=PERSONA, messages=CONVERSATION)
    assert int(busy.value.response.headers["retry-after"]) >= 1 and busy.value.code == "rate_limit_exceeded"
    held.gate.set()
    first.join(30)
    second.join(30)
    assert len(replies) == 2  # the two accepted were answered
    with urllib.request.urlopen(api.replace("/v1", "/metrics"), timeout=10) as r:  # noqa: S310 - loopback
        metrics = r.read().decode()
    assert 'bunshin_messages_total{outcome="busy"} 1.0' in metrics
    assert 'bunshin_api_responses_total{status="429"} 1.0' in metrics


def test_a_failed_generation_is_500_and_a_missed_deadline_503(tmp_path, inner):
    backend = HeldBackend(inner)
    with serving(tmp_path, backend, queue={"max_batch": 1, "deadline_s": 0.5}) as url:
        backend.fail = RuntimeError("boom")
        with pytest.raises(openai.InternalServerError) as failed:
            client(url).chat.completions.create(model=PERSONA, messages=CONVERSATION)
        assert failed.value.status_code == 500 and "generation" in failed.value.message
        # One reply held past the other's deadline: the second is never started.
        backend.gate.clear()
        backend.generating.clear()
        first = threading.Thread(target=lambda: client(url).chat.completions.create(model=PERSONA,
                                                                                    messages=CONVERSATION))
        first.start()
        assert backend.generating.wait(10)
        threading.Timer(0.8, backend.gate.set).start()
        with pytest.raises(openai.InternalServerError) as late:
            client(url).chat.completions.create(model=PERSONA, messages=CONVERSATION)
        assert late.value.status_code == 503 and late.value.code == "timeout"
        first.join(30)


def test_the_slot_engine_answers_as_plain_generation(tmp_path, inner):
    """The backend unwrapped: the worker serves it with the slot engine, as the daemon does a real model."""
    [(text, tokens)] = inner.generate([TURNS])
    with serving(tmp_path, inner) as url:
        completion = client(url).chat.completions.create(model=PERSONA, messages=CONVERSATION)
        streamed = client(url).chat.completions.create(model=PERSONA, messages=CONVERSATION, stream=True)
        joined = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert (completion.choices[0].message.content, completion.usage.completion_tokens) == (text, tokens)
    assert joined == text


def test_clients_over_the_rate_get_429(tmp_path, inner):
    with serving(tmp_path, HeldBackend(inner), api={"requests_per_minute": 1.0, "burst": 1}) as url:
        client(url).chat.completions.create(model=PERSONA, messages=CONVERSATION)
        with pytest.raises(openai.RateLimitError) as limited:
            client(url).chat.completions.create(model=PERSONA, messages=CONVERSATION)
        assert int(limited.value.response.headers["retry-after"]) == 60


def test_start_up_names_a_missing_key_variable(tmp_path):
    config = write_toml(tmp_path / "bot.toml", {"persona": {"name": PERSONA}, "api": {"enabled": True}})
    env_before = os.environ.pop("BUNSHIN_API_KEY", None)
    try:
        done = run_cli("--config", config, module="bot", timeout=60)
    finally:
        if env_before is not None:
            os.environ["BUNSHIN_API_KEY"] = env_before
    assert done.returncode == 2
    assert "[api] key_env: environment variable BUNSHIN_API_KEY is not set" in done.stderr
    problems = BotConfig.from_dict({"persona": {"name": PERSONA}, "api": {"enabled": True},
                                    "server": {"enabled": False}}, source="t.toml")
    with pytest.raises(Exception, match=r"\[api\] enabled: needs \[server\] enabled"):
        problems.check_ready({"BUNSHIN_API_KEY": "k"})
