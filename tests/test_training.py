"""Training and serving on a real tiny model: prepare -> train -> chat / merge, from the command line.

The base is a random GPT-NeoX with a rinna-shaped SentencePiece tokenizer (finetune/tiny_model.py),
built once per module; training runs the real `python -m finetune train` on the CPU.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, REPO, run_cli
from safetensors.torch import load_file, save_file

from finetune.generation import GenerationSettings, fit_context, generate_replies
from finetune.manifest import DEFAULT_GENERATION
from finetune.model_loading import ModelLoadError, load_base_model, load_persona_model
from finetune.packing import FlatCollator, PackedCollator, pack_samples
from finetune.prompt import (
    IGNORE_INDEX,
    ChatTurn,
    as_turns,
    encode_prompt,
    encode_reply,
    encode_sample,
    render_prompt,
)
from finetune.reply_loss import token_weighted_loss
from finetune.tiny_model import build_tiny_model
from finetune.tokenization import load_tokenizer
from finetune.train import checkpoint_dir

PERSONA = "美咲"
# Small rows and a high learning rate: a random 2-layer model learns something in ~90 CPU steps.
TRAIN_ARGS = ("--pack-length", "256", "--batch-tokens", "512", "--lr", "3e-3", "--eval-every", "0", "--no-progress")


def run_cli_input(*args: str, stdin: str, timeout: float = 300, module: str = "finetune") -> subprocess.CompletedProcess:
    """run_cli with text piped to stdin (`finetune chat` reads one message per line)."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        timeout=timeout,
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def step_logs(stdout: str) -> list[dict]:
    """The Trainer's per-step log lines (`{'loss': ..., 'epoch': ...}`), without the throughput that varies."""
    logs = [ast.literal_eval(line) for line in stdout.splitlines() if line.startswith("{'loss'")]
    return [{k: v for k, v in log.items() if k != "useful_tokens_per_s"} for log in logs]


def chat_replies(stdout: str) -> list[str]:
    """Each `美咲: ...` reply in chat's output (a reply may span lines); `/reset` notices are dropped."""
    replies: list[list[str]] = []
    for line in stdout.splitlines():
        if line.startswith(f"{PERSONA}: "):
            replies.append([line.removeprefix(f"{PERSONA}: ")])
        elif line == "(forgot the conversation)":
            replies.append([])  # a marker, removed below, so a reply never swallows the notice
        elif replies:
            replies[-1].append(line)
    return ["\n".join(r) for r in replies if r]


# --------------------------------------------------------------------------- fixtures (built once)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    # = `python -m finetune tiny-model DIR --corpus examples/line_demo.txt`, in-process (faster).
    corpus = (EXAMPLES / "line_demo.txt").read_text(encoding="utf-8").splitlines()
    return build_tiny_model(tmp_path_factory.mktemp("base") / "tiny", corpus)


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory) -> Path:
    # Another corpus, another tokenizer: a different base model as far as an adapter is concerned.
    corpus = ["Completely different English corpus.", "Nothing like the chat logs at all, really."] * 3
    return build_tiny_model(tmp_path_factory.mktemp("other") / "other", corpus, seed=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ds"
    proc = run_cli("prepare", EXAMPLES / "line_demo.txt", EXAMPLES / "discord_demo.json", "--persona", PERSONA,
                   "--alias", "misaki", "--timezone", "Asia/Tokyo", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny, dataset) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("adapter") / "misaki"
    proc = run_cli("train", dataset, "--base", tiny, "--out", out, *TRAIN_ARGS, "--epochs", "30", "--save-every", "50")
    return out, proc


@pytest.fixture(scope="module")
def adapter(trained) -> Path:
    out, proc = trained
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return load_tokenizer(str(tiny))


@pytest.fixture(scope="module")
def samples(dataset, tokenizer) -> list[tuple[list[int], list[int]]]:
    encoded = [encode_sample(tokenizer, as_turns(s["context"]), s["persona"], s["target"], "transcript", 256)
               for s in read_jsonl(dataset / "train.jsonl")]
    assert all(e is not None for e in encoded)
    return encoded


# --------------------------------------------------------------------------- 1. prepare -> train -> chat


def test_train_writes_an_adapter_that_beats_the_base_and_a_complete_manifest(trained, tiny, dataset):
    out, proc = trained
    assert proc.returncode == 0, proc.stderr
    assert {"adapter_config.json", "adapter_model.safetensors", "bunshin.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.parent.glob(".*partial"))  # the atomic staging folder is gone
    assert not checkpoint_dir(out).exists()  # a finished run takes its checkpoints (optimizer state too) with it
    manifest = json.loads((out / "bunshin.json").read_text(encoding="utf-8"))
    stats = json.loads((dataset / "stats.json").read_text(encoding="utf-8"))

    base_loss, tuned_loss = manifest["eval_loss"]["base"], manifest["eval_loss"]["tuned"]
    assert math.isfinite(base_loss) and math.isfinite(tuned_loss)
    assert tuned_loss < base_loss
    assert f"eval loss {base_loss:.4f} (base) -> {tuned_loss:.4f} (tuned)" in proc.stdout

    assert manifest["base_model"] == str(tiny)
    assert manifest["tokenizer_fingerprint"] == load_tokenizer(str(tiny)).fingerprint
    assert manifest["tokenizer_backend"] == "sentencepiece"
    assert manifest["template"] == "transcript"
    assert manifest["persona"] == PERSONA
    assert manifest["newline"] == "<NL>"
    assert manifest["dataset_fingerprint"] == stats["fingerprint"] and stats["fingerprint"]
    assert manifest["generation"] == DEFAULT_GENERATION
    assert manifest["merged"] is False
    assert manifest["dataset"]["train_samples"] == stats["samples"]["train"] == len(read_jsonl(dataset / "train.jsonl"))
    assert manifest["dataset"]["eval_samples"] == stats["samples"]["eval"] > 0
    # 30 epochs of ceil(rows / rows per step) optimizer steps; 512 batch tokens / 256 per row = 2 rows.
    assert manifest["training"]["rows_per_step"] == 2
    assert manifest["training"]["steps"] == 30 * math.ceil(manifest["dataset"]["train_rows"] / 2)
    assert PERSONA in manifest["speakers"] and "健太" in manifest["speakers"]
    # One process: the whole run's throughput is that process's; the progress line says so too.
    training = manifest["training"]
    assert training["world_size"] == 1 and len(training["useful_tokens_per_second_by_process"]) == 1
    assert training["useful_tokens_per_second"] == training["useful_tokens_per_second_by_process"][0] > 0
    assert training["mixed_precision"] == "no" and training["dtype"] == "float32"  # the CPU: no autocast
    assert all(log["world_size"] == 1 for log in step_logs(proc.stdout))


def test_chat_answers_each_piped_message_and_reset_forgets(adapter):
    # Same seed per reply: after /reset the same first message gets the same reply; with history it differs.
    proc = run_cli_input("chat", adapter, "--seed", "0", "--max-new-tokens", "24",
                         stdin="おはよう\n/reset\nおはよう\nおはよう\n/quit\nnever read\n")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sum(line.startswith(f"{PERSONA}: ") for line in proc.stdout.splitlines()) == 3
    assert proc.stdout.count("(forgot the conversation)") == 1
    first, after_reset, with_history = chat_replies(proc.stdout)
    assert first == after_reset
    assert with_history != after_reset


def _reply_lines(stdout: str) -> list[str]:
    return [line.removeprefix(f"{PERSONA}: ") for line in stdout.splitlines() if line.startswith(f"{PERSONA}: ")]


def test_chat_prompt_only_needs_no_adapter_and_prompts_as_the_eval_does(tiny, dataset, tmp_path):
    """`chat DATASET --system prompt-only --base BASE`: the base with the dataset's memory, the notes recalled for the
    message and four of the persona's messages as examples (person_memory.reply_notes, as eval's probes get them),
    within the context the model serves."""
    from finetune.eval_models import PROMPT_EXAMPLES
    from finetune.generation import served_context
    from finetune.person_memory import PersonMemory, reply_notes
    from finetune.prompt import MEMORY_SHARE, fit_notes

    message = "映画いかない？"
    proc = run_cli_input("chat", dataset, "--system", "prompt-only", "--base", tiny, "--name", "健太", "--echo",
                         "--show-memory", "--temperature", "0", "--max-new-tokens", "8", stdin=f"{message}\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"健太: {message}"  # --echo: the transcript, the message before its notes and reply
    [reply] = _reply_lines(proc.stdout)

    loaded = load_base_model(str(tiny), device="cpu")
    turns = [ChatTurn("健太", message)]
    notes = reply_notes(PersonMemory.load(dataset), turns, 3, examples=PROMPT_EXAMPLES, seed=0, key="健太")
    assert len(notes) > 3 and "いくいく！なに見るの？" in [n.turns[-1].text for n in notes]  # said when asked the same
    budget = served_context(loaded.model, 2048) - 8
    fitted = fit_notes(loaded.tokenizer, notes, budget // MEMORY_SHARE)  # the tiny model's context is short
    assert fitted and [line for line in lines if line.startswith("  (memory 20")] == [
        f"  (memory {n.date}) {t.speaker}: {t.text}" for n in fitted for t in n.turns]
    settings = GenerationSettings(max_new_tokens=8, temperature=0.0)
    prompt = fit_context(loaded.tokenizer, turns, PERSONA, "transcript", budget, memory=notes)
    [(expected, _)] = generate_replies(loaded.model, loaded.tokenizer, [prompt], settings, ["健太"])
    assert reply == (expected or "…")


def test_chat_system_base_on_an_adapter_switches_its_lora_off(adapter):
    proc = run_cli_input("chat", adapter, "--system", "base", "--temperature", "0", "--max-new-tokens", "8",
                         "--show-memory", stdin="おはよう\n")
    assert proc.returncode == 0, proc.stderr
    assert "  (memory: nothing recalled)" in proc.stdout.splitlines()  # base: no notes, though the adapter has some
    [reply] = _reply_lines(proc.stdout)
    loaded = load_persona_model(adapter, device="cpu")
    manifest = loaded.manifest
    settings = GenerationSettings.from_manifest(manifest.generation, max_new_tokens=8, temperature=0.0)
    prompt = fit_context(loaded.tokenizer, [ChatTurn("あなた", "おはよう")], PERSONA, manifest.template,
                         manifest.max_length - 8)
    with loaded.model.disable_adapter():
        [(untuned, _)] = generate_replies(loaded.model, loaded.tokenizer, [prompt], settings,
                                          [*manifest.speakers, "あなた"])
    [(tuned, _)] = generate_replies(loaded.model, loaded.tokenizer, [prompt], settings, [*manifest.speakers, "あなた"])
    assert reply == (untuned or "…") and untuned != tuned  # the LoRA was off, and that changes the reply


def test_chat_without_an_adapter_says_what_it_needs(tiny, dataset, tmp_path):
    no_adapter = run_cli_input("chat", dataset, stdin="おはよう\n")
    assert no_adapter.returncode == 1 and "no adapter" in no_adapter.stderr
    assert "--system base or --system prompt-only" in no_adapter.stderr
    no_base = run_cli_input("chat", dataset, "--system", "prompt-only", stdin="おはよう\n")
    assert no_base.returncode == 1 and "needs --base" in no_base.stderr and "get-base gemma-3-270m" in no_base.stderr
    no_memory = tmp_path / "ds"
    shutil.copytree(dataset, no_memory)
    (no_memory / "memory.jsonl").unlink()
    forgot = run_cli_input("chat", no_memory, "--system", "prompt-only", "--base", tiny, stdin="おはよう\n")
    assert forgot.returncode == 1 and f"{no_memory} holds no memory.jsonl" in forgot.stderr
    assert all("Traceback" not in p.stderr and p.stdout == "" for p in (no_adapter, no_base, forgot))
    home = tmp_path / "home"  # a persona home with a dataset and no adapter: its dataset is used
    home.mkdir()
    shutil.copytree(dataset, home / "dataset")
    proc = run_cli_input("chat", home, "--system", "base", "--base", tiny, "--max-new-tokens", "4", stdin="おはよう\n")
    assert proc.returncode == 0 and len(_reply_lines(proc.stdout)) == 1, proc.stderr


# --------------------------------------------------------------------------- 2. packing is exact


def _reply_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position loss of predicting labels[i + 1] from position i (0 where unlabelled)."""
    targets = labels[1:]
    losses = torch.nn.functional.cross_entropy(logits[:-1].float(), targets.clamp(min=0), reduction="none")
    return torch.where(targets != IGNORE_INDEX, losses, torch.zeros_like(losses))


def test_packed_rows_give_each_sample_the_loss_it_has_alone(tiny, tokenizer, samples):
    model = load_base_model(str(tiny), device="cpu", dtype="fp32").model.eval()
    rows = pack_samples(samples, 256)
    assert len(rows) < len(samples) and max(r.samples for r in rows) >= 3  # real packing, several per row
    batch = PackedCollator(tokenizer.pad_id)(rows)
    assert (batch["input_ids"] == tokenizer.pad_id).any()  # the shorter row is padded, too

    with torch.no_grad():
        alone = {}
        for ids, labels in samples:
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            alone.setdefault(tuple(ids), []).append(_reply_losses(logits, torch.tensor(labels)).sum().item())
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        # The control: one long sequence per row, so later samples see the earlier ones.
        leaky_positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
        leaky_logits = model(input_ids=batch["input_ids"], position_ids=leaky_positions, use_cache=False).logits

    packed_total, leaky_total, worst_leak = 0.0, 0.0, 0.0
    found = []
    for r, row in enumerate(rows):
        packed = _reply_losses(packed_logits[r], batch["labels"][r])
        leaky = _reply_losses(leaky_logits[r], batch["labels"][r])
        starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
        for a, b in zip(starts, starts[1:], strict=False):
            ids = tuple(row.input_ids[a:b])
            # Loss of this sample's tokens: predicted from positions a .. b-2 (b-1 predicts the next sample).
            own, leaked = packed[a : b - 1].sum().item(), leaky[a : b - 1].sum().item()
            assert own == pytest.approx(alone[ids][0], rel=1e-4), f"sample at {r}:{a} is not independent"
            if b - 1 < len(packed):  # the next sample's first token (or padding) is unlabelled: no loss across
                assert packed[b - 1].item() == 0.0
            worst_leak = max(worst_leak, abs(leaked - own) / own)
            packed_total += own
            leaky_total += leaked
            found.append(ids)
    assert sorted(found) == sorted(tuple(ids) for ids, _ in samples)  # every sample packed exactly once
    solo_total = sum(sum(v) for v in alone.values())
    assert packed_total == pytest.approx(solo_total, rel=1e-4)
    assert worst_leak > 1e-3 and leaky_total != pytest.approx(solo_total, rel=1e-4)  # the check can fail

    # What the Trainer computes (model loss on the collated batch) and what train reports as eval loss.
    reply_tokens = sum(sum(label != IGNORE_INDEX for label in labels[1:]) for _, labels in samples)
    with torch.no_grad():
        hf = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                   use_cache=False).loss.item()
    assert hf * reply_tokens == pytest.approx(solo_total, rel=1e-4)
    assert model.config.use_cache  # as loaded: token_weighted_loss must not depend on the caller turning it off
    assert token_weighted_loss(model, rows, tokenizer.pad_id, 2) * reply_tokens == pytest.approx(solo_total, rel=1e-4)


def test_flat_batches_carry_exact_sample_boundaries_and_the_same_loss(tiny, tokenizer, samples):
    """The varlen layout (one flat sequence + cu_seq_lens): boundaries are the samples', padding is
    its own unlabelled span, and the loss equals the samples' losses alone (checked here through
    masked SDPA; on a GPU, bench/attention_probe.py checks varlen against it)."""
    model = load_base_model(str(tiny), device="cpu", dtype="fp32").model.eval()
    rows = pack_samples(samples, 256)
    length = sum(len(r.input_ids) for r in rows) + 7
    batch = FlatCollator(tokenizer.pad_id, length)(rows)
    assert batch["input_ids"].shape == (1, length)
    assert int(batch["useful_tokens"]) == length - 7
    cu = batch["cu_seq_lens_q"].tolist()
    sizes = sorted(b - a for a, b in zip(cu, cu[1:], strict=False))
    assert sizes == sorted([len(ids) for ids, _ in samples] + [7])  # every sample, plus the padding span
    assert batch["max_length_q"] == max(sizes) and cu[0] == 0 and cu[-1] == length
    assert (batch["labels"][0, -7:] == IGNORE_INDEX).all()
    with torch.no_grad():
        flat = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                     use_cache=False).loss.item()
        solo = sum(_reply_losses(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0],
                                 torch.tensor(labels)).sum().item() for ids, labels in samples)
    reply_tokens = sum(sum(label != IGNORE_INDEX for label in labels[1:]) for _, labels in samples)
    assert flat * reply_tokens == pytest.approx(solo, rel=1e-4)


# --------------------------------------------------------------------------- 3. loss on reply + EOS only


def test_labels_cover_exactly_the_reply_and_eos_and_the_prompt_is_what_chat_sends(dataset, tokenizer):
    train = read_jsonl(dataset / "train.jsonl")
    multiline = [s for s in train if any("\n" in c["text"] for c in s["context"]) or "\n" in s["target"]]
    assert multiline  # the demo data has line breaks inside messages: they must become <NL>
    nl_id = tokenizer.encode("<NL>")
    assert len(nl_id) == 1
    for s in train:
        turns = as_turns(s["context"])
        ids, labels = encode_sample(tokenizer, turns, s["persona"], s["target"], "transcript", 512)
        served = fit_context(tokenizer, turns, s["persona"], "transcript", budget=512)  # what chat / the bot send
        n = len(served)
        assert ids[:n] == served == encode_prompt(tokenizer, turns, s["persona"], "transcript")
        assert labels[:n] == [IGNORE_INDEX] * n
        assert IGNORE_INDEX not in labels[n:] and labels[n:] == ids[n:]
        assert labels[-1] == tokenizer.eos_id and tokenizer.eos_id not in labels[n:-1]
        assert tokenizer.decode(served) == render_prompt(turns, s["persona"]).replace("\n", "<NL>")
        assert tokenizer.decode(labels[n:]) == s["target"].replace("\n", "<NL>")
        assert tokenizer.decode(served).endswith(f"{PERSONA}: ")
        if s in multiline:
            assert nl_id[0] in ids

    # Too long: the oldest turns go first, one at a time, exactly as generation.fit_context drops them
    # from the bot's memory: no more context is lost in training than chat would keep.
    truncated, no_context = 0, encode_prompt(tokenizer, [], PERSONA, "transcript")
    for s in train:
        turns, reply = as_turns(s["context"]), encode_reply(tokenizer, s["target"])
        full = len(encode_sample(tokenizer, turns, PERSONA, s["target"], "transcript", 512)[0])
        for max_length in range(len(reply) + 1, full):
            pair = encode_sample(tokenizer, turns, PERSONA, s["target"], "transcript", max_length)
            if len(no_context) + len(reply) > max_length:
                assert pair is None  # not even the reply with no context fits
                continue
            ids, labels = pair
            n = labels.count(IGNORE_INDEX)
            assert len(ids) <= max_length and ids[n:] == reply
            assert ids[:n] == fit_context(tokenizer, turns, PERSONA, "transcript", max_length - len(reply))
            truncated += 1
    assert truncated > 100


# --------------------------------------------------------------------------- 4. --resume


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(tmp_path, tiny, dataset):
    # One row per step (256 / 256): step 3 is mid-epoch, so the resumed run must also skip the right rows.
    args = ("train", dataset, "--base", tiny, "--out", tmp_path / "a", *TRAIN_ARGS, "--batch-tokens", "256",
            "--max-steps", "6", "--save-every", "3", "--seed", "7")
    whole = run_cli(*args, "--keep-checkpoints")  # kept, to play the crash below
    assert whole.returncode == 0, whole.stdout + whole.stderr
    adapter, checkpoints = tmp_path / "a", tmp_path / "a.checkpoints"
    assert {p.name for p in checkpoints.glob("checkpoint-*")} == {"checkpoint-3", "checkpoint-6"}
    assert f"{checkpoints}: checkpoints kept" in whole.stdout
    # Weights and optimizer state learnt from the chats, as the Trainer saved them: readable by their owner only.
    for path in [checkpoints, *checkpoints.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
    weights_a = load_file(adapter / "adapter_model.safetensors")
    logs_a = step_logs(whole.stdout)
    assert len(logs_a) == 6

    # The crash: killed after the step-3 checkpoint, before step 6 and the adapter were written.
    shutil.rmtree(adapter)
    shutil.rmtree(checkpoints / "checkpoint-6")

    fresh = run_cli(*args)  # neither --resume nor --force: the checkpoints must not be silently thrown away
    assert fresh.returncode != 0
    assert str(checkpoints) in fresh.stderr and "--resume" in fresh.stderr and "--force" in fresh.stderr
    changed = run_cli(*args, "--resume", "--lora-r", "8")
    assert changed.returncode != 0 and "other settings" in changed.stderr and "lora_r" in changed.stderr
    for proc in (fresh, changed):
        assert "Traceback" not in proc.stderr
    assert (checkpoints / "checkpoint-3").is_dir() and not adapter.exists()  # the refusals touched nothing

    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert step_logs(resumed.stdout) == logs_a[3:]  # it ran steps 4-6 only, exactly as the first run did
    weights_b = load_file(adapter / "adapter_model.safetensors")
    assert weights_a.keys() == weights_b.keys() and weights_a
    for name, tensor in weights_a.items():
        assert torch.allclose(tensor, weights_b[name]), name
    assert any(t.abs().sum() > 0 for name, t in weights_b.items() if "lora_B" in name)  # it did train
    manifest = json.loads((adapter / "bunshin.json").read_text(encoding="utf-8"))
    assert manifest["training"]["steps"] == 6


def test_resume_without_checkpoints_is_a_clear_error(tmp_path, tiny, dataset):
    proc = run_cli("train", dataset, "--base", tiny, "--out", tmp_path / "never", *TRAIN_ARGS, "--max-steps", "2",
                   "--resume")
    assert proc.returncode != 0
    assert "--resume: no checkpoint" in proc.stderr and str(tmp_path / "never.checkpoints") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "never").exists()


# --------------------------------------------------------------------------- 5. another base model is refused


def test_an_adapter_is_refused_on_another_base_model(adapter, tiny, other_tiny):
    assert load_tokenizer(str(other_tiny)).fingerprint != load_tokenizer(str(tiny)).fingerprint
    proc = run_cli_input("chat", adapter, "--base", other_tiny, stdin="おはよう\n")
    assert proc.returncode != 0
    (message,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert "refusing to mix them" in message and str(adapter) in message
    assert str(tiny) in message and str(other_tiny) in message
    assert "Traceback" not in proc.stderr and f"{PERSONA}:" not in proc.stdout

    with pytest.raises(ModelLoadError, match="refusing to mix them"):
        load_persona_model(adapter, base=str(other_tiny), device="cpu")


# --------------------------------------------------------------------------- 6. broken adapter folders


def _drop_manifest(folder: Path) -> None:
    (folder / "bunshin.json").unlink()


def _garble_manifest(folder: Path) -> None:
    (folder / "bunshin.json").write_text('{"base_model": "x", ', encoding="utf-8")


def _strip_manifest(folder: Path) -> None:
    manifest = json.loads((folder / "bunshin.json").read_text(encoding="utf-8"))
    del manifest["persona"], manifest["tokenizer_fingerprint"]
    (folder / "bunshin.json").write_text(json.dumps(manifest), encoding="utf-8")


def _drop_weights(folder: Path) -> None:
    (folder / "adapter_model.safetensors").unlink()


def _truncate_weights(folder: Path) -> None:
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (_drop_manifest, ["bunshin.json is missing"]),
        (_garble_manifest, ["bunshin.json is corrupt"]),
        (_strip_manifest, ["bunshin.json is corrupt", "missing", "persona", "tokenizer_fingerprint"]),
        (_drop_weights, ["adapter_model.safetensors is missing"]),
        (_truncate_weights, ["cannot be loaded", "Safetensor"]),
    ],
    ids=["no-manifest", "manifest-not-json", "manifest-missing-keys", "no-weights", "truncated-weights"],
)
def test_a_broken_adapter_folder_is_a_clear_error(tmp_path, adapter, damage, expected):
    broken = shutil.copytree(adapter, tmp_path / "broken")
    damage(broken)
    proc = run_cli_input("chat", broken, stdin="おはよう\n")
    assert proc.returncode != 0
    (message,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert str(broken) in message
    for phrase in expected:
        assert phrase in message
    assert "Traceback" not in proc.stderr and f"{PERSONA}:" not in proc.stdout


# --------------------------------------------------------------------------- 7. merge


@pytest.fixture(scope="module")
def merged(tmp_path_factory, adapter) -> Path:
    out = tmp_path_factory.mktemp("merged") / "m"
    proc = run_cli("merge", adapter, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


def test_merged_model_chats_and_computes_what_base_plus_adapter_does(merged, adapter, tiny):
    manifest = json.loads((merged / "bunshin.json").read_text(encoding="utf-8"))
    assert manifest["merged"] is True and manifest["persona"] == PERSONA
    assert {"model.safetensors", "config.json", "spiece.model"} <= {p.name for p in merged.iterdir()}
    assert not list(merged.glob("adapter_*"))
    # The persona's memory comes along: the bot serving the merged folder recalls from it as from the adapter.
    assert manifest["memory"]["notes"] > 0
    assert all((merged / name).read_bytes() == (adapter / name).read_bytes() for name in ("memory.jsonl", "memory.index.npz"))

    proc = run_cli_input("chat", merged, "--seed", "0", "--max-new-tokens", "8", stdin="おはよう\n")
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stdout.splitlines() if line.startswith(f"{PERSONA}: ")]

    with_adapter = load_persona_model(adapter, device="cpu")
    folded = load_persona_model(merged, device="cpu")
    plain = load_base_model(str(tiny), device="cpu")
    assert folded.tokenizer.fingerprint == with_adapter.tokenizer.fingerprint
    prompt = torch.tensor([encode_prompt(with_adapter.tokenizer, [ChatTurn("健太", "映画いかない？\n土曜とか")], PERSONA,
                                         "transcript")])
    with torch.no_grad():
        expected = with_adapter.model(input_ids=prompt).logits
        got = folded.model(input_ids=prompt).logits
        untuned = plain.model(input_ids=prompt).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert (untuned - expected).abs().max() > 1e-3  # the adapter changed the model: the comparison means something


def test_the_merged_folder_has_a_tokenizer_transformers_loads_with_bunshins_ids(merged, tiny):
    """An engine (vLLM) loads the folder's tokenizer through transformers: merge writes a tokenizer.json that gives
    bunshin's ids and text, while bunshin itself still runs the base's spiece.model (its fingerprint unchanged)."""
    from transformers import AutoTokenizer

    base, ours = load_tokenizer(str(tiny)), load_tokenizer(str(merged))
    assert (ours.backend, ours.fingerprint, ours.add_bos, ours.newline) == (
        "sentencepiece", base.fingerprint, base.add_bos, "<NL>")
    theirs = AutoTokenizer.from_pretrained(str(merged))
    lines = [line.split("\t")[-1] for line in (EXAMPLES / "line_demo.txt").read_text(encoding="utf-8").splitlines()]
    texts = ["健太: 映画いかない？\n土曜とか\n美咲: いくいく！", "改行\n\nふたつ", "  空白  も  ", *lines]
    for text in texts:
        model_text = ours.to_model_text(text)
        ids = ours.encode(model_text)
        assert theirs.encode(model_text, add_special_tokens=False) == ids, text
        assert theirs.decode(ids) == ours.decode(ids) == model_text
    assert theirs.eos_token_id == ours.eos_id and theirs("a")["input_ids"] == ours.encode("a")  # no BOS, as rinna


def test_merge_never_overwrites_an_existing_folder_without_force(tmp_path, merged, adapter):
    before = snapshot(merged)
    proc = run_cli("merge", adapter, "--out", merged)
    assert proc.returncode != 0 and "already exists" in proc.stderr and "--force" in proc.stderr
    assert snapshot(merged) == before

    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "keep.txt").write_text("mine", encoding="utf-8")
    proc = run_cli("merge", adapter, "--out", unrelated)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert snapshot(unrelated) == {"keep.txt": hashlib.sha256(b"mine").hexdigest()}


# --------------------------------------------------------------------------- 8. the instruction template


def test_instruction_template_renders_its_headers_and_trains(tmp_path, tiny, dataset, tokenizer):
    sample = next(s for s in read_jsonl(dataset / "train.jsonl") if len(s["context"]) >= 2)
    turns = as_turns(sample["context"])
    text = render_prompt(turns, PERSONA, "instruction")
    assert text.startswith(f"### 指示:\n{PERSONA}として")
    assert text.endswith("### 回答:\n")
    assert all(f"{t.speaker}: {t.text}" in text for t in turns)
    ids, labels = encode_sample(tokenizer, turns, PERSONA, sample["target"], "instruction", 512)
    n = labels.count(IGNORE_INDEX)
    assert ids[:n] == fit_context(tokenizer, turns, PERSONA, "instruction", 512)
    assert tokenizer.decode(ids[:n]) == text.replace("\n", "<NL>")
    assert labels[n:] == ids[n:] and labels[-1] == tokenizer.eos_id

    out = tmp_path / "instructed"
    proc = run_cli("train", dataset, "--base", tiny, "--out", out, "--template", "instruction", *TRAIN_ARGS,
                   "--max-steps", "3", "--save-every", "100")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "bunshin.json").read_text(encoding="utf-8"))
    assert manifest["template"] == "instruction" and manifest["training"]["steps"] == 3
    assert all(math.isfinite(manifest["eval_loss"][k]) for k in ("base", "tuned"))
    assert load_persona_model(out, device="cpu").manifest.template == "instruction"  # chat would render with it


def test_a_reply_ends_where_the_model_starts_another_turn():
    from finetune.prompt import turn_end

    text = "いいね！\n明日は10時に集合\n健太: 了解\n美咲: ok"
    assert text[: turn_end(text, ["健太", "美咲"])] == "いいね！\n明日は10時に集合"
    # A short unknown name also ends the reply (models invent speakers); a long line with a colon does not.
    assert turn_end("うん\nたろう: やあ", ["健太"]) == len("うん")
    assert turn_end("うん\nこの前に話してた駅前のカフェの新しいメニューだけど: 抹茶", ["健太"]) is None
    assert turn_end("ひとことだけ", ["健太"]) is None


# --------------------------------------------------------------------------- 9. training refuses to lie


def error_line(stderr: str) -> str:
    (message,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    return message


# Real divergence, no faked loss: Adam moves each LoRA weight by about the learning rate per step, so
# at 1e30 the second step's logits overflow float32 (NaN loss); at 1e3 the second step's gradient does (on the
# tiny model's heads of 32: from about 850 to 1200 it is inf, above and below it NaN in the forward pass first).
DIVERGING = [("1e30", 2, "the loss was nan"), ("1e3", 2, "the gradient norm was inf")]


@pytest.mark.parametrize(("lr", "step", "what"), DIVERGING, ids=["nan-loss", "inf-gradient"])
def test_a_diverging_run_stops_at_its_step_exits_non_zero_and_writes_no_adapter(tmp_path, tiny, dataset, lr, step, what):
    out = tmp_path / "diverged"
    # TRAIN_ARGS' own --lr comes first; argparse keeps the last one given.
    proc = run_cli("train", dataset, "--base", tiny, "--out", out, *TRAIN_ARGS, "--lr", lr, "--max-steps", "20",
                   "--save-every", "1")
    assert proc.returncode == 1
    message = error_line(proc.stderr)
    assert f"training stopped at step {step} of 20: {what}" in message
    assert "no adapter was written" in message
    for cause in (f"--lr {float(lr):g}", "float16", "accelerate"):
        assert cause in message
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".diverged*"))  # no adapter, no staging folder

    # It stopped before logging or checkpointing the bad step (logging and saving are every step here):
    # the steps before it logged finite losses, and the checkpoints kept hold finite weights.
    logs = step_logs(proc.stdout)
    assert len(logs) == step - 1 and all(math.isfinite(float(log["loss"])) for log in logs)
    checkpoints = sorted((tmp_path / "diverged.checkpoints").glob("checkpoint-*"))
    assert [p.name for p in checkpoints] == [f"checkpoint-{n}" for n in range(max(1, step - 2), step)]
    for folder in checkpoints:
        assert all(t.isfinite().all() for t in load_file(folder / "adapter_model.safetensors").values())


def _poison(path: Path, value: float) -> str:
    """Write `value` into one weight of a safetensors file; returns the tensor's name."""
    weights = load_file(path)
    name = sorted(n for n in weights if "lora_B" in n or "query_key_value.weight" in n)[0]
    weights[name].view(-1)[0] = value
    save_file(weights, path, metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_load_adapter_refuses_non_finite_weights_naming_the_file(tmp_path, adapter, value):
    poisoned = shutil.copytree(adapter, tmp_path / "poisoned")
    name = _poison(poisoned / "adapter_model.safetensors", value)
    with pytest.raises(ModelLoadError) as refused:
        load_persona_model(poisoned, device="cpu")
    message = str(refused.value)
    assert str(poisoned / "adapter_model.safetensors") in message and name in message
    assert "NaN or inf" in message and "\n" not in message
    load_persona_model(adapter, device="cpu")  # the control: the untouched adapter loads


def test_chat_and_the_bot_refuse_an_adapter_with_nan_weights(tmp_path, adapter):
    poisoned = shutil.copytree(adapter, tmp_path / "poisoned")
    _poison(poisoned / "adapter_model.safetensors", float("nan"))
    weights = str(poisoned / "adapter_model.safetensors")

    chat = run_cli_input("chat", poisoned, stdin="おはよう\n")
    assert chat.returncode == 1
    assert weights in error_line(chat.stderr) and "NaN or inf" in error_line(chat.stderr)
    assert "Traceback" not in chat.stderr and f"{PERSONA}:" not in chat.stdout

    config = tmp_path / "bot.toml"
    config.write_text(f"""[model]
adapter = {json.dumps(str(poisoned))}
device = "cpu"
[memory]
path = {json.dumps(str(tmp_path / "memory.sqlite3"))}
[console]
enabled = true
[server]
port = 0
""", encoding="utf-8")
    bot = run_cli_input("--config", config, stdin="おはよう\n", module="bot")
    assert bot.returncode != 0
    assert weights in error_line(bot.stderr) and "NaN or inf" in error_line(bot.stderr)
    assert "Traceback" not in bot.stderr and f"{PERSONA}:" not in bot.stdout


def test_a_merged_model_with_nan_weights_is_refused(tmp_path, merged):
    poisoned = shutil.copytree(merged, tmp_path / "merged-poisoned")
    name = _poison(poisoned / "model.safetensors", float("nan"))
    with pytest.raises(ModelLoadError, match="NaN or inf") as refused:
        load_persona_model(poisoned, device="cpu")
    assert str(poisoned) in str(refused.value) and name in str(refused.value)


def test_two_processes_report_the_whole_run_and_stop_together(tmp_path, tiny, dataset):
    """torchrun on the CPU (gloo): the manifest and progress line sum both processes' throughput; a
    diverging run stops on both at the same step with one message, and neither hangs."""
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "finetune")

    def launch(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*torchrun, "train", str(dataset), "--base", str(tiny), "--out", str(out), *TRAIN_ARGS,
                               "--device", "cpu", "--save-every", "100", *extra], cwd=REPO, capture_output=True,
                              text=True, encoding="utf-8", timeout=300,
                              env={**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"})

    whole = launch(tmp_path / "ddp", "--max-steps", "12")
    assert whole.returncode == 0, whole.stdout + whole.stderr
    training = json.loads((tmp_path / "ddp" / "bunshin.json").read_text(encoding="utf-8"))["training"]
    by_process = training["useful_tokens_per_second_by_process"]
    assert training["world_size"] == 2 and len(by_process) == 2 and min(by_process) > 0
    assert training["useful_tokens_per_second"] == pytest.approx(sum(by_process), abs=0.2)
    printed = re.search(r"([\d,]+) useful tokens/s \(2 processes: ([\d,]+), ([\d,]+)\)", whole.stdout)
    assert printed, whole.stdout
    # Printed from the unrounded rates, the manifest's are rounded to 0.1: they agree to within a token a second.
    assert [float(x.replace(",", "")) for x in printed.groups()[1:]] == pytest.approx(by_process, abs=1)
    logs = step_logs(whole.stdout)
    assert logs and all(log["world_size"] == 2 and len(log["useful_tokens_per_s_per_process"]) == 2 for log in logs)

    diverged = launch(tmp_path / "ddp-nan", "--max-steps", "20", "--lr", "1e30")
    assert diverged.returncode != 0
    assert "training stopped at step 2 of 20: the loss was nan" in error_line(diverged.stderr)  # rank 0 alone says it
    assert not (tmp_path / "ddp-nan").exists()


def test_the_default_epochs_shrink_for_a_large_dataset_and_never_below_one():
    from finetune.train import DEFAULT_EPOCHS, SAMPLE_PASSES, default_epochs

    assert default_epochs(300) == DEFAULT_EPOCHS == 3.0
    assert default_epochs(SAMPLE_PASSES // 3) == 3.0  # the edge: still three
    assert default_epochs(SAMPLE_PASSES // 3 + 100) == 2.9
    assert default_epochs(4500) == 2.0 and default_epochs(6000) == 1.5
    assert default_epochs(16_461) == 1.0 and default_epochs(1_000_000) == 1.0


def test_the_default_eval_interval_gives_a_few_evals_a_run_and_never_more_often_than_every_100_steps():
    from finetune.train import default_eval_every

    assert default_eval_every(12) == 100 and default_eval_every(400) == 100  # the floor, and its edge
    assert default_eval_every(401) == 101  # past it: four evals, the last at the end
    assert default_eval_every(972) == 243  # a 100,000-message export's run: 4 evals, not 10
    parser = __import__("argparse").ArgumentParser()
    __import__("finetune.train", fromlist=["add_arguments"]).add_arguments(parser)
    assert parser.parse_args(["data"]).eval_every is None  # the default is the rule above
    assert parser.parse_args(["data", "--eval-every", "0"]).eval_every == 0
