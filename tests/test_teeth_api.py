"""The API's request checks at their bounds, over HTTP with OpenAI's own client, on the daemon's server while the
model is still loading: a request that passes every check gets 503 "still loading", one that fails a check gets
400 naming the field. So each bound is seen from both sides without a model (the checks come first)."""

from __future__ import annotations

import contextlib

import openai
import pytest

from bot.api import OpenAIApi
from bot.metrics import BotMetrics
from bot.server import build_app, start_server
from finetune.config import BotConfig

PERSONA = "美咲"
KEY = "sk-teeth-5d1e"
MESSAGES = [{"role": "user", "content": "おはよう"}]


@contextlib.asynccontextmanager
async def loading_api():
    """The daemon's app (health, metrics, the API's routes) on loopback, no worker attached yet."""
    config = BotConfig.from_dict({"persona": {"name": PERSONA}, "api": {"enabled": True}}, source="test")
    metrics = BotMetrics()
    api = OpenAIApi(config, metrics, PERSONA, KEY)
    app = build_app(metrics, lambda: (False, {"phase": "loading"}), middlewares=[api.errors])  # as bot/daemon.py does
    app.router.add_routes(api.web_routes())
    runner, port = await start_server(app, "127.0.0.1", 0, metrics)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=30)
    try:
        yield client
    finally:
        await client.close()
        await runner.cleanup()


async def outcome(client: openai.AsyncOpenAI, **fields) -> tuple[int, str | None]:
    """(status, the param a 400 names) for a chat completion with `fields`; 503 means every check passed."""
    try:
        await client.chat.completions.create(model=PERSONA, messages=MESSAGES, **fields)
    except openai.APIStatusError as exc:
        return exc.status_code, exc.body.get("param") if isinstance(exc.body, dict) else None
    raise AssertionError("a loading server answered a completion")


# (field, the lowest value OpenAI accepts, the highest or None, the step just past a bound)
BOUNDS = [
    ("max_tokens", 1, None, 1),
    ("max_completion_tokens", 1, None, 1),
    ("temperature", 0, 2, 0.01),
    ("top_p", 0, 1, 0.01),
    ("presence_penalty", -2, 2, 0.01),
    ("frequency_penalty", -2, 2, 0.01),
]


@pytest.mark.parametrize(("name", "lowest", "highest", "step"), BOUNDS, ids=[b[0] for b in BOUNDS])
async def test_sampling_fields_are_accepted_up_to_their_bounds_and_refused_past_them(name, lowest, highest, step):
    async with loading_api() as client:
        assert await outcome(client, **{name: lowest}) == (503, None)
        assert await outcome(client, **{name: lowest - step}) == (400, name)
        if highest is not None:
            assert await outcome(client, **{name: highest}) == (503, None)
            assert await outcome(client, **{name: highest + step}) == (400, name)


async def test_max_tokens_zero_is_refused_as_openai_refuses_it():
    """OpenAI answers max_tokens 0 with 400 (integer below minimum value 1); a client that sends it must hear so,
    not get a reply as if it had been honoured."""
    async with loading_api() as client:
        for name in ("max_tokens", "max_completion_tokens"):
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(model=PERSONA, messages=MESSAGES, **{name: 0})
            assert refused.value.param == name and "at least 1" in refused.value.message


@pytest.mark.parametrize("value", [1.5, True, "8"])
async def test_token_counts_must_be_integers(value):
    async with loading_api() as client:
        assert await outcome(client, max_tokens=value) == (400, "max_tokens")
