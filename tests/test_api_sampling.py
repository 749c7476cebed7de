"""The API honours what it validates: temperature, top_p, max_tokens, seed and stop change the reply as OpenAI
documents, `stream: true` sends the text as the engine decodes it, and usage and finish_reason are the engine's.

The real daemon serves the tiny model through the slot engine (tests/support/api_daemon.py); the official `openai`
client talks to it over HTTP.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.support.api_daemon import PERSONA, client, serving, tiny_backend

MESSAGES = [{"role": "user", "name": "健太", "content": "おはよう、今日ひま?"}]


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return tiny_backend(tmp_path_factory.mktemp("tiny"))  # greedy by default, at most 12 new tokens


@pytest.fixture(scope="module")
def api(tmp_path_factory, backend):
    with serving(tmp_path_factory.mktemp("api"), backend) as url:
        yield url


def ask(url: str, **fields):
    return client(url).chat.completions.create(model=PERSONA, messages=MESSAGES, **fields)


def test_a_seeded_sampled_reply_repeats_and_another_seed_gives_another(api):
    first = ask(api, temperature=1.5, seed=42).choices[0].message.content
    assert ask(api, temperature=1.5, seed=42).choices[0].message.content == first
    others = {ask(api, temperature=1.5, seed=seed).choices[0].message.content for seed in range(5)}
    assert len(others | {first}) > 2  # sampled, not greedy: the seeds draw different replies
    greedy = ask(api, temperature=0).choices[0].message.content
    assert {ask(api, temperature=0, seed=seed).choices[0].message.content for seed in range(3)} == {greedy}


def test_max_tokens_cuts_the_reply_with_finish_reason_length(api):
    whole = ask(api, temperature=0)
    short = ask(api, temperature=0, max_tokens=3)
    assert (short.usage.completion_tokens, short.choices[0].finish_reason) == (3, "length")
    assert whole.choices[0].message.content.startswith(short.choices[0].message.content.strip())
    assert whole.usage.completion_tokens > 3 and short.usage.prompt_tokens == whole.usage.prompt_tokens


def test_a_stop_string_ends_the_reply_and_is_not_in_it_streamed_or_not(api):
    text = ask(api, temperature=0).choices[0].message.content
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip() and text.find(text[i:i + 2]) == i)
    stopped = ask(api, temperature=0, stop=[stop, "never-said"])
    assert stopped.choices[0].message.content == text[: text.index(stop)].strip()
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].message.content
    chunks = [c.choices[0].delta.content or "" for c in ask(api, temperature=0, stop=stop, stream=True) if c.choices]
    assert "".join(chunks) == stopped.choices[0].message.content


def test_top_p_near_zero_is_greedy_however_hot(api):
    greedy = ask(api, temperature=0).choices[0].message.content
    assert ask(api, temperature=2, top_p=0).choices[0].message.content == greedy


def slowed(calls: list, seconds: float):
    """A forward pre-hook that notes each forward pass and makes it take `seconds` longer."""
    def hook(module, args) -> None:
        calls.append(time.monotonic())
        time.sleep(seconds)
    return hook


def test_tokens_arrive_in_several_chunks_before_the_reply_ends(tmp_path, backend):
    """Each engine step is slowed to 40 ms: the client holds its first piece of text while the engine has steps
    of the reply still to go, and the pieces come over the reply's time, not all at its end."""
    model = backend.loaded.model
    steps = []
    hook = model.register_forward_pre_hook(slowed(steps, 0.04))
    try:
        with serving(tmp_path, backend) as url:
            steps.clear()
            started = time.monotonic()
            arrivals = []
            stream = client(url).chat.completions.create(model=PERSONA, messages=MESSAGES, stream=True, temperature=0,
                                                         stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    arrivals.append((time.monotonic(), len(steps)))
                if not chunk.choices:
                    usage = chunk.usage
            finished = time.monotonic()
    finally:
        hook.remove()
    assert len(arrivals) >= 3, arrivals
    first_at, steps_then = arrivals[0]
    assert steps_then < len(steps) - 2  # the engine went on decoding after the first piece was read
    assert finished - first_at > 0.1 and first_at - started < finished - started  # not all at the end
    assert usage.completion_tokens == 12 and usage.prompt_tokens > 0
    print(f"time to first chunk {first_at - started:.3f} s of {finished - started:.3f} s")


def test_a_client_that_leaves_mid_stream_frees_its_slot(tmp_path, backend):
    model = backend.loaded.model
    calls = []
    hook = model.register_forward_pre_hook(slowed(calls, 0.05))
    try:
        with serving(tmp_path, backend) as url:
            calls.clear()
            stream = client(url).chat.completions.create(model=PERSONA, messages=MESSAGES, stream=True, temperature=0)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    break
            stream.close()  # the client goes away after its first piece
            left_at = len(calls)
            time.sleep(0.8)
            # The engine stopped within a step or two of the disconnect, well before the 12 tokens.
            assert len(calls) <= left_at + 3, (left_at, len(calls))
            reply = client(url).chat.completions.create(model=PERSONA, messages=MESSAGES, temperature=0)
            assert reply.usage.completion_tokens == 12
    finally:
        hook.remove()


def test_a_stream_that_fails_before_any_text_gets_an_error_status(tmp_path, backend):
    import openai

    failing = threading.Event()  # armed once the daemon is serving (its warm-up runs the model too)

    def fail(module, args):
        if failing.is_set():
            failing.clear()
            raise RuntimeError("injected failure")

    hook = backend.loaded.model.register_forward_pre_hook(fail)
    try:
        with serving(tmp_path, backend) as url:
            failing.set()
            with pytest.raises(openai.InternalServerError) as failed:
                list(client(url).chat.completions.create(model=PERSONA, messages=MESSAGES, stream=True))
            assert failed.value.status_code == 500
    finally:
        hook.remove()
