"""Every model family `finetune tiny-model --arch` builds, taken the whole way a user goes.

prepare -> train -> eval -> chat -> merge -> the daemon (console and the OpenAI-compatible API), on a tiny random
base of each family: gpt_neox (rinna's shape, SentencePiece with `<NL>`), llama (SentencePiece with byte fallback
and a BOS before every text, grouped-query attention) and qwen2 (byte-level BPE `tokenizer.json`, no BOS,
grouped-query attention). The daemon's config names only the adapter: the base comes from its bunshin.json.
The `finetune` commands run in this process through the CLI's own `main()` (torch starts once for the whole
matrix, not once per command); the daemon runs as the real process an operator starts.

Replies are greedy, so each is compared with what the same model generates here for the same conversation:
a reply from the wrong base, the wrong prompt (a missing BOS) or an adapter left out would differ.
"""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, FAMILIES, REPO, write_toml

from finetune.cli import main as finetune_main
from finetune.config import BotConfig, ConfigError, load_config
from finetune.model_backend import ModelBackend
from finetune.model_loading import load_persona_model
from finetune.prompt import ChatTurn, encode_prompt, encode_sample
from finetune.tokenization import load_tokenizer

PERSONA = "美咲"
FRIEND = "健太"  # the console's user in the daemon's config
# Small rows, a high learning rate, few steps: enough for the adapter to beat the random base on eval loss.
TRAIN_ARGS = ("--pack-length", "256", "--batch-tokens", "512", "--lr", "3e-3", "--max-steps", "12", "--eval-every", "0",
              "--save-every", "100", "--style-eval-samples", "4", "--no-progress")
GREEDY = {"max_new_tokens": 12, "temperature": 0.0}
API_KEY = "family-matrix-key"


def finetune(*args, stdin: str = "") -> subprocess.CompletedProcess:
    """`python -m finetune ARGS` in this process, through the CLI's main(); stdin, stdout and stderr are its own.
    On one thread: for 64-wide models threads cost more than they save (several times more on a busy machine)."""
    out, err = io.StringIO(), io.StringIO()
    real_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = finetune_main([str(a) for a in args])
    except SystemExit as exc:  # argparse
        code = exc.code
    finally:
        sys.stdin = real_stdin
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("families") / "data"
    done = finetune("prepare", EXAMPLES / "line_demo.txt", EXAMPLES / "discord_demo.json", "--persona", PERSONA,
                    "--alias", "misaki", "--timezone", "Asia/Tokyo", "--out", out)
    assert done.returncode == 0, done.stderr
    return out


class Pipeline:
    """One family's run of the pipeline: its base, adapter, report and merged folders, and what each command said."""

    def __init__(self, arch: str, base: Path, folder: Path):
        self.arch, self.base, self.folder = arch, base, folder
        self.adapter, self.report, self.merged = folder / "adapter", folder / "report", folder / "merged"
        self.done: dict[str, subprocess.CompletedProcess] = {}

    def manifest(self, folder: Path | None = None) -> dict:
        return json.loads(((folder or self.adapter) / "bunshin.json").read_text(encoding="utf-8"))

    @functools.cached_property
    def tuned(self):
        """The adapter on its base, loaded here once (as `finetune chat` loads it)."""
        return load_persona_model(self.adapter, device="cpu")


@pytest.fixture(scope="module", params=FAMILIES)
def pipeline(request, tiny_base, dataset, tmp_path_factory) -> Pipeline:
    run = Pipeline(request.param, tiny_base(request.param), tmp_path_factory.mktemp(request.param))
    run.done["train"] = finetune("train", dataset, "--base", run.base, "--out", run.adapter, "--device", "cpu", *TRAIN_ARGS)
    assert run.done["train"].returncode == 0, run.done["train"].stderr
    run.done["eval"] = finetune("eval", run.adapter, "--data", dataset, "--out", run.report, "--samples", "4",
                                "--device", "cpu", "--no-progress")
    # Without the persona's notes, as expected_reply prompts (tests/test_bot_memory.py and test_training.py check
    # chat's and the bot's notes): what is compared here is the LoRA on its base.
    run.done["chat"] = finetune("chat", run.adapter, "--device", "cpu", "--temperature", "0", "--max-new-tokens",
                                GREEDY["max_new_tokens"], "--memory-notes", "0", stdin="おはよう\n/reset\n明日ひま？\n")
    run.done["merge"] = finetune("merge", run.adapter, "--out", run.merged, "--device", "cpu")
    return run


def expected_reply(loaded, speaker: str, text: str) -> tuple[str, int]:
    """(reply, tokens) the model gives, greedily, to one message: the bot's own prompting, in this process."""
    backend = ModelBackend.from_loaded(loaded, generation_overrides=GREEDY, engine="plain")
    [(reply, tokens)] = backend.generate([[ChatTurn(speaker, text)]])
    return reply, tokens


def untuned_reply(loaded, speaker: str, text: str) -> tuple[str, int]:
    """The same with the LoRA switched off: the control that makes a comparison with expected_reply mean something."""
    with loaded.model.disable_adapter():
        return expected_reply(loaded, speaker, text)


# --------------------------------------------------------------------------- the base each family builds


def test_the_tiny_base_has_its_familys_tokenizer_and_attention(pipeline):
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = load_tokenizer(str(pipeline.base))
    config = AutoConfig.from_pretrained(pipeline.base)
    assert config.model_type == pipeline.arch
    prompt = encode_prompt(tokenizer, [ChatTurn(FRIEND, "おはよう\n元気？")], PERSONA, "transcript")
    # The model's own tokenizer (transformers') decides whether a text starts with BOS; the prompt follows it.
    own = AutoTokenizer.from_pretrained(pipeline.base)("a")["input_ids"]
    assert tokenizer.add_bos == (tokenizer.bos_id is not None and own[0] == tokenizer.bos_id)
    assert (prompt[0] == tokenizer.bos_id) == tokenizer.add_bos
    assert prompt.count(tokenizer.bos_id) == tokenizer.add_bos  # one BOS, at the start, or none
    ids, labels = encode_sample(tokenizer, [ChatTurn(FRIEND, "おはよう")], PERSONA, "またね", "transcript", 256)
    assert ids[0] == prompt[0] and labels[-1] == tokenizer.eos_id  # training samples start as prompts do
    if pipeline.arch == "gpt_neox":
        assert (tokenizer.backend, tokenizer.newline, tokenizer.add_bos) == ("sentencepiece", "<NL>", False)
        assert (pipeline.base / "spiece.model").is_file()
    elif pipeline.arch == "llama":
        assert (tokenizer.backend, tokenizer.newline, tokenizer.add_bos) == ("sentencepiece", "\n", True)
        assert (pipeline.base / "tokenizer.model").is_file() and not (pipeline.base / "tokenizer.json").exists()
        assert tokenizer.pad_id == tokenizer.eos_id  # Llama's vocabulary has no padding piece
        assert tokenizer.sp.is_byte(tokenizer.encode("𩸽")[-1])  # byte fallback for a character it never saw
    else:
        assert (tokenizer.backend, tokenizer.newline, tokenizer.bos_id, tokenizer.add_bos) == ("transformers", "\n", None, False)
        assert (pipeline.base / "tokenizer.json").is_file() and not list(pipeline.base.glob("*.model"))
        spec = json.loads((pipeline.base / "tokenizer.json").read_text(encoding="utf-8"))
        assert spec["model"]["type"] == "BPE" and spec["decoder"]["type"] == "ByteLevel"
        assert config.vocab_size > tokenizer.vocab_size  # an embedding wider than the tokenizer, as Qwen2.5's
    if pipeline.arch != "gpt_neox":  # grouped-query attention
        assert config.num_key_value_heads < config.num_attention_heads


def test_a_prompt_cut_to_fit_keeps_the_bos_it_starts_with(tiny_base):
    from finetune.generation import fit_context

    tokenizer = load_tokenizer(str(tiny_base("llama")))
    # The instruction template's header alone is over this budget: every turn is dropped and the rest is cut.
    turns = [ChatTurn(FRIEND, "おはよう")]
    whole = encode_prompt(tokenizer, [], PERSONA, "instruction")
    cut = fit_context(tokenizer, turns, PERSONA, "instruction", budget=16)
    assert len(whole) > 16 and len(cut) == 16
    assert cut[0] == tokenizer.bos_id and cut[1:] == whole[-15:]  # the BOS, then the prompt's end


# --------------------------------------------------------------------------- finetune: train, eval, chat, merge


def test_train_writes_an_adapter_of_its_base_that_beats_it(pipeline, dataset):
    manifest = pipeline.manifest()
    tokenizer = load_tokenizer(str(pipeline.base))
    assert manifest["base_model"] == str(pipeline.base)
    assert manifest["tokenizer_fingerprint"] == tokenizer.fingerprint
    assert manifest["tokenizer_backend"] == tokenizer.backend and manifest["newline"] == tokenizer.newline
    assert manifest["base_shape"]["model_type"] == pipeline.arch
    targets = ["query_key_value"] if pipeline.arch == "gpt_neox" else ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert manifest["lora"]["targets"] == targets
    assert manifest["eval_loss"]["tuned"] < manifest["eval_loss"]["base"]
    assert set(manifest["style_eval"]["systems"]) == {"base", "tuned"}  # the short eval ran on both


def test_eval_scores_base_and_tuned(pipeline):
    assert pipeline.done["eval"].returncode == 0, pipeline.done["eval"].stderr
    report = json.loads((pipeline.report / "report.json").read_text(encoding="utf-8"))
    assert list(report["systems"])[:2] == ["base", "tuned"]
    assert report["adapter"]["base_model"] == str(pipeline.base)
    assert report["systems"]["tuned"]["loss"] < report["systems"]["base"]["loss"]


def test_chat_answers_as_the_adapter_on_its_base(pipeline):
    done = pipeline.done["chat"]
    assert done.returncode == 0, done.stderr
    replies = [line.removeprefix(f"{PERSONA}: ") for line in done.stdout.splitlines() if line.startswith(f"{PERSONA}: ")]
    tuned = pipeline.tuned
    # After /reset each message is the whole conversation: one reply each, as generated here.
    expected = [expected_reply(tuned, "あなた", text) for text in ("おはよう", "明日ひま？")]
    assert replies == [reply or "…" for reply, _ in expected]
    assert expected != [untuned_reply(tuned, "あなた", text) for text in ("おはよう", "明日ひま？")]


def test_merge_folds_the_adapter_into_a_model_that_computes_the_same(pipeline):
    done = pipeline.done["merge"]
    assert done.returncode == 0, done.stderr
    assert pipeline.manifest(pipeline.merged)["merged"] is True
    tuned = pipeline.tuned
    merged = load_persona_model(pipeline.merged, device="cpu")
    assert merged.tokenizer.fingerprint == tuned.tokenizer.fingerprint  # the base's tokenizer files came along
    prompt = torch.tensor([encode_prompt(tuned.tokenizer, [ChatTurn(FRIEND, "映画いかない？\n土曜とか")], PERSONA,
                                         "transcript")])
    with torch.no_grad():
        torch.testing.assert_close(merged.model(input_ids=prompt).logits, tuned.model(input_ids=prompt).logits,
                                   atol=1e-4, rtol=1e-4)
        with tuned.model.disable_adapter():  # the control: the adapter changes what the base computes
            assert (tuned.model(input_ids=prompt).logits - merged.model(input_ids=prompt).logits).abs().max() > 1e-3


# --------------------------------------------------------------------------- the daemon, configured with the adapter only


def start_daemon(config: Path) -> subprocess.Popen:
    # Offline, as the machines the tests run on are: a bot that went for rinna (the default base) would fail here.
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "BUNSHIN_API_KEY": API_KEY, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "bot", "--config", str(config)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", env=env)


def ask_api(url: str, text: str) -> dict:
    body = json.dumps({"model": PERSONA, "messages": [{"role": "user", "content": text}]}).encode()
    request = urllib.request.Request(f"{url}/chat/completions", data=body, method="POST", headers={
        "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - loopback
        return json.loads(response.read())


def test_the_daemon_serves_the_adapter_on_the_base_its_manifest_names(pipeline, tmp_path):
    config = write_toml(tmp_path / "bot.toml", {
        "model": {"adapter": str(pipeline.adapter), "device": "cpu"},  # no base: the adapter's bunshin.json names it
        "generation": GREEDY,
        # Recall off: the reply is compared with one generated from the window alone (tests/test_bot_memory.py
        # checks replies made with the persona's memory).
        "memory": {"path": str(tmp_path / "memory.sqlite3"), "person": False, "chat_recall": False},
        "console": {"enabled": True, "user_name": FRIEND},
        "server": {"port": 0},
        "api": {"enabled": True},
    })
    proc = start_daemon(config)
    try:
        proc.stdin.write("おはよう\n")  # taken at once, answered once the model is up
        proc.stdin.flush()
        api, log = None, []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not any("serving as" in line for line in log):
            line = proc.stderr.readline()
            if not line:
                break
            log.append(line)
            if "OpenAI-compatible API on " in line:
                api = line.split(" on ", 1)[1].split(" ")[0]
        assert api and any(f"serving as {PERSONA}" in line for line in log), "".join(log)
        answer = ask_api(api, "明日ひま？")
        out, err = proc.communicate(timeout=120)  # the console's input ends: it answers, drains and exits
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, "".join(log) + err
    served = load_persona_model(pipeline.adapter, device="cpu", merge=True)  # as the daemon loads it
    reply, tokens = expected_reply(served, "あなた", "明日ひま？")
    assert answer["choices"][0]["message"]["content"] == reply
    # The prompt it served was the one training used: BOS first where the family has one, then the transcript.
    prompt = encode_prompt(served.tokenizer, [ChatTurn("あなた", "明日ひま？")], PERSONA, "transcript")
    assert answer["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": tokens,
                               "total_tokens": len(prompt) + tokens}
    console = [line.removeprefix(f"{PERSONA}: ") for line in out.splitlines() if line.startswith(f"{PERSONA}: ")]
    assert console == [expected_reply(served, FRIEND, "おはよう")[0] or "…"]
    # The control: the base alone answers otherwise, so the daemon's replies were the adapter's.
    assert untuned_reply(pipeline.tuned, "あなた", "明日ひま？") != (reply, tokens)


# --------------------------------------------------------------------------- a config base that is not the adapter's


def test_a_config_base_that_is_not_the_adapters_is_refused_at_start_naming_both(pipeline, tiny_base, tmp_path):
    other = tiny_base(next(arch for arch in FAMILIES if arch != pipeline.arch))
    config = write_toml(tmp_path / "bot.toml", {
        "model": {"adapter": str(pipeline.adapter), "base": str(other), "device": "cpu"},
        "memory": {"path": str(tmp_path / "memory.sqlite3")},
        "console": {"enabled": True},
    })
    done = subprocess.run([sys.executable, "-m", "bot", "--config", str(config)], cwd=REPO, input="おはよう\n",
                          capture_output=True, text=True, encoding="utf-8", timeout=120,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert done.returncode == 2, done.stderr
    (message,) = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert f"{config}: [model] base" in message
    assert repr(str(other)) in message and repr(str(pipeline.base)) in message and str(pipeline.adapter) in message
    assert "Traceback" not in done.stderr and not done.stdout
    assert not list(tmp_path.glob("memory.sqlite3*"))  # refused before anything was opened
    # The base it was trained on, named, is no conflict.
    same = BotConfig.from_dict({"model": {"adapter": str(pipeline.adapter), "base": str(pipeline.base)}})
    assert same.adapter_manifest().base_model == str(pipeline.base)


def test_the_deploy_config_takes_the_base_from_the_adapter(pipeline, tmp_path):
    """deploy/config.toml names the adapter only: whatever base the adapter was trained on is served."""
    text = (REPO / "deploy" / "config.toml").read_text(encoding="utf-8")
    assert 'adapter = "/adapters/misaki"' in text
    copy = tmp_path / "config.toml"
    copy.write_text(text.replace('"/adapters/misaki"', json.dumps(str(pipeline.adapter))), encoding="utf-8")
    config = load_config(copy)
    assert config.model.base == ""
    assert config.adapter_manifest().base_model == str(pipeline.base)
    # The control: the same file naming rinna as its base is refused for this adapter (a Llama's, a Qwen's).
    copy.write_text(copy.read_text(encoding="utf-8").replace("[model]\n", '[model]\nbase = "rinna/japanese-gpt-neox-3.6b"\n'),
                    encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\[model\] base: 'rinna/japanese-gpt-neox-3.6b' is not"):
        load_config(copy).adapter_manifest()


# --------------------------------------------------------------------------- architectures outside the matrix


def _phi3():
    from transformers import Phi3Config  # one fused qkv_proj: not in the project's table nor in peft's

    return Phi3Config(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _rwkv():
    from transformers import RwkvConfig  # no attention projections at all: peft's own targets for it

    return RwkvConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, attention_hidden_size=64,
                      intermediate_size=128, context_length=64)


@pytest.mark.parametrize(("make_config", "targets"), [(_phi3, ["o_proj", "qkv_proj"]),
                                                      (_rwkv, ["key", "value", "receptance", "output"])],
                         ids=["phi3", "rwkv"])
def test_an_architecture_outside_the_matrix_gets_lora_targets_that_train(make_config, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.model_loading import LORA_TARGETS, lora_target_modules

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config())
    assert model.config.model_type not in LORA_TARGETS
    assert lora_target_modules(model) == targets
    tuned = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    ids = torch.randint(3, 300, (2, 16))
    tuned(input_ids=ids, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in tuned.named_parameters() if p.requires_grad}
    assert grads and all(name.count("lora_") for name in grads)  # only LoRA weights train...
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())  # ...and they do


def test_an_architecture_without_known_projections_is_a_clear_error_naming_its_layers():
    from transformers import AutoModelForCausalLM, MambaConfig

    from finetune.model_loading import ModelLoadError, lora_target_modules

    model = AutoModelForCausalLM.from_config(MambaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2))
    with pytest.raises(ModelLoadError, match=r"no known LoRA target modules in a 'mamba' model; pass --lora-targets") as refused:
        lora_target_modules(model)
    assert "in_proj" in str(refused.value) and "out_proj" in str(refused.value)
    assert lora_target_modules(model, ["in_proj", "out_proj"]) == ["in_proj", "out_proj"]  # named, they are used
