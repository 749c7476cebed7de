"""`finetune eval` end to end: a planted signature learned by a real (tiny) training run shows in the report.

The persona of a synthetic chat ends every reply with a made-up catchphrase (にゃも). A short LoRA run on
the tiny model learns it; the report must then put the tuned system closer to the real replies than the
base, on the features that see a catchphrase, and `train`'s own short eval must say so in the manifest.
The scoring itself is tested without a model in test_scoring.py and test_style.py.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from finetune.cli import main as finetune_main
from finetune.tiny_model import build_tiny_model

PERSONA, FRIEND, CATCHPHRASE = "美咲", "健太", "にゃも"
FRIEND_LINES = ["おはよう！今日も一日がんばろう", "今どこにいるの？", "ラーメン食べに行こうよ", "明日は雨らしいよ", "駅に着いたよ",
                "映画どうだった？", "週末ひま？", "昨日はありがとう", "お腹すいたね", "宿題おわった？", "今日さむいね",
                "新しいお店が気になってる"]
PERSONA_LINES = ["いいね行こう", "まだ家だよ", "楽しかった", "わかった", "ありがとう", "ちょっと待って", "いま向かってる",
                 "それな", "眠いよ", "おつかれ", "ほんとに？", "また明日"]
# Trained without memory notes: the catchphrase is learned from the replies alone, and notes in every prompt add
# tokens to each of its 20 epochs (the memory systems still run in the report: they recall at eval time).
TRAIN_ARGS = ("--pack-length", "256", "--batch-tokens", "512", "--lr", "3e-3", "--eval-every", "0", "--no-progress",
              "--epochs", "20", "--save-every", "1000", "--memory-notes", "0")


def signature_chat(path: Path, conversations: int = 80, seed: int = 0) -> Path:
    """A `Name:text` export: the friend says something, the persona answers with the catchphrase at the end."""
    rng = random.Random(seed)
    lines = []
    for _ in range(conversations):
        for _ in range(rng.randint(2, 4)):
            lines.append(f"{FRIEND}:{rng.choice(FRIEND_LINES)}")
            lines.append(f"{PERSONA}:{rng.choice(PERSONA_LINES)}{CATCHPHRASE}")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def ends_with_catchphrase(replies: list[str]) -> float:
    return sum(r.strip().splitlines()[0].endswith(CATCHPHRASE) if r.strip() else False for r in replies) / len(replies)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("signature")
    out = folder / "ds"
    proc = run_cli("prepare", signature_chat(folder / "chat.txt"), "--persona", PERSONA, "--eval-fraction", "0.2",
                   "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset) -> tuple[Path, subprocess.CompletedProcess]:
    folder = tmp_path_factory.mktemp("signature-model")
    texts = [json.loads(line)["target"] for line in (dataset / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    tiny = build_tiny_model(folder / "tiny", texts + FRIEND_LINES, head_std=0.5)
    out = folder / "adapter"
    proc = run_cli("train", dataset, "--base", tiny, "--out", out, *TRAIN_ARGS, timeout=900)  # 20 epochs: slow on a busy machine
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.fixture(scope="module")
def report(tmp_path_factory, trained, dataset) -> tuple[Path, dict]:
    adapter, _ = trained
    folder = tmp_path_factory.mktemp("report")
    echo = folder / "echo.jsonl"  # a "bot" that repeats what it was told: the copying feature must see it
    samples = [json.loads(line) for line in (dataset / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    echo.write_text("".join(json.dumps({"id": s["id"], "reply": s["context"][-1]["text"]}, ensure_ascii=False) + "\n"
                            for s in samples), encoding="utf-8")
    out = folder / "report"
    proc = run_cli("eval", adapter, "--data", dataset, "--out", out, "--system", f"echo={echo}", "--no-progress",
                   timeout=900)  # four systems on two cores: slow on a busy machine, as the training above
    assert proc.returncode == 0, proc.stderr
    return out, json.loads((out / "report.json").read_text(encoding="utf-8"))


def test_train_ends_with_a_short_eval_that_finds_the_signature_learned(trained):
    adapter, proc = trained
    manifest = json.loads((adapter / "bunshin.json").read_text(encoding="utf-8"))
    summary = manifest["style_eval"]
    base, tuned = summary["systems"]["base"], summary["systems"]["tuned"]
    assert summary["samples"] > 0
    assert tuned["style_distance"] < base["style_distance"]
    assert tuned["chrf"] > base["chrf"]
    assert f"style distance {base['style_distance']:.3f} (base) -> {tuned['style_distance']:.3f} (tuned)" in proc.stdout


def test_the_report_has_its_promised_shape_and_every_system(report, dataset):
    out, data = report
    eval_count = len((dataset / "eval.jsonl").read_text(encoding="utf-8").splitlines())
    assert data["samples"] == eval_count  # fewer than --samples' 256: all of them
    # The dataset has the persona's memory, so all four model systems run by default; given systems come last.
    assert list(data["systems"]) == ["base", "tuned", "prompt-only", "hybrid", "echo"]
    for name, system in data["systems"].items():
        assert system["style_distance"] >= 0
        assert 0 <= system["chrf"] <= 100
        assert set(system["style"]) == set(data["features"])
        has_loss = name != "echo"
        assert ("loss" in system) == has_loss and ("perplexity" in system) == has_loss
    assert data["systems"]["tuned"]["loss"] < data["systems"]["base"]["loss"]
    assert len(data["examples"]) == eval_count and data["blind"]
    assert {p["real_is"] for p in data["blind"]} <= {"first", "second"}
    for pair in data["blind"]:
        real = next(e["real"] for e in data["examples"] if e["id"] == pair["id"])
        assert pair[pair["real_is"]] == real
    assert (out / "report.html").read_text(encoding="utf-8").count(PERSONA) > 0
    for name in data["systems"]:
        lines = (out / "replies" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line)["reply"] for line in lines] == [e["replies"][name] for e in data["examples"]]


def test_the_tuned_model_is_closer_than_the_base_where_a_catchphrase_shows(report):
    _, data = report
    base, tuned = data["systems"]["base"], data["systems"]["tuned"]
    tuned_replies = [e["replies"]["tuned"] for e in data["examples"]]
    base_replies = [e["replies"]["base"] for e in data["examples"]]
    # The signature itself, counted directly: the tuned model ends its replies with it, the base does not.
    assert ends_with_catchphrase(tuned_replies) >= 0.5 > ends_with_catchphrase(base_replies)
    # ... and the report sees it: closer character n-grams, length and endings, closer overall, higher chrF.
    for feature in ("ngrams", "length", "endings"):
        assert tuned["style"][feature]["distance"] < base["style"][feature]["distance"], feature
    assert tuned["style_distance"] < base["style_distance"]
    assert tuned["chrf"] > base["chrf"]


def test_a_system_that_echoes_the_context_is_caught_copying(report):
    _, data = report
    echo, tuned = data["systems"]["echo"], data["systems"]["tuned"]
    assert echo["style"]["copying"]["distance"] > tuned["style"]["copying"]["distance"]
    assert echo["style"]["copying"]["system"]["copied_chars"] == pytest.approx(1.0)


def test_saved_replies_score_the_same_as_a_system_and_need_no_model(report, dataset, tmp_path):
    out, data = report
    again = tmp_path / "again"
    code = (
        "import sys; from finetune.cli import main; "
        f"rc = main(['eval', '--data', {str(dataset)!r}, '--out', {str(again)!r}, "
        f"'--system', 'earlier=' + {str(out / 'replies' / 'tuned.jsonl')!r}]); "
        "print('torch loaded' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("no torch")
    second = json.loads((again / "report.json").read_text(encoding="utf-8"))
    assert list(second["systems"]) == ["earlier"]
    for key in ("style_distance", "chrf", "stock_rate"):
        assert second["systems"]["earlier"][key] == pytest.approx(data["systems"]["tuned"][key])


# --------------------------------------------------------------------------- bad input: clear errors, nothing written


def _first_ids(dataset: Path, n: int = 3) -> list[str]:
    return [json.loads(line)["id"] for line in (dataset / "eval.jsonl").read_text(encoding="utf-8").splitlines()[:n]]


def _all_replies(dataset: Path) -> str:
    samples = [json.loads(line) for line in (dataset / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    return "".join(json.dumps({"id": s["id"], "reply": "うん"}, ensure_ascii=False) + "\n" for s in samples)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (lambda ds: "", "empty: no replies"),
        (lambda ds: _all_replies(ds) + "{not json\n", ":{line}: not JSON"),
        (lambda ds: _all_replies(ds) + '{"id": "nope", "reply": "x"}\n', ":{line}: id 'nope' is not a sample"),
        (lambda ds: _all_replies(ds) + json.dumps({"id": _first_ids(ds)[0], "reply": "x"}) + "\n", ":{line}: id "),
        (lambda ds: _all_replies(ds) + json.dumps({"id": _first_ids(ds)[0]}) + "\n", ':{line}: expected {"id"'),
        (lambda ds: "".join(_all_replies(ds).splitlines(keepends=True)[1:]), "no reply for 1 of the"),
    ],
    ids=["empty", "malformed", "unknown-id", "duplicate-id", "no-reply-key", "missing-id"],
)
def test_a_bad_replies_file_is_an_error_naming_file_and_line(dataset, tmp_path, capsys, content, expected):
    replies = tmp_path / "other.jsonl"
    text = content(dataset)
    replies.write_text(text, encoding="utf-8")
    out = tmp_path / "report"
    assert finetune_main(["eval", "--data", str(dataset), "--out", str(out), "--system", f"other={replies}"]) == 1
    err = capsys.readouterr().err
    assert str(replies) in err
    assert expected.replace("{line}", str(len(text.splitlines()))) in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "nothing to score"),
        (["--system", "real=x.jsonl"], "'real' is taken"),
        (["--system", "a b=x.jsonl"], "a name is"),
        (["--system", "x.jsonl"], "expected NAME=REPLIES.jsonl"),
        (["--system", "other=/no/such.jsonl"], "/no/such.jsonl: no such file"),
    ],
)
def test_bad_arguments_are_clear_errors(dataset, tmp_path, capsys, args, expected):
    out = tmp_path / "report"
    assert finetune_main(["eval", "--data", str(dataset), "--out", str(out), *args]) == 1
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_an_existing_report_is_kept_without_force(dataset, tmp_path, capsys):
    replies = tmp_path / "other.jsonl"
    replies.write_text(_all_replies(dataset), encoding="utf-8")
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.json").write_text("{}", encoding="utf-8")
    args = ["eval", "--data", str(dataset), "--out", str(out), "--system", f"other={replies}"]
    assert finetune_main(args) == 1
    assert "--force" in capsys.readouterr().err
    assert (out / "report.json").read_text(encoding="utf-8") == "{}"
    assert finetune_main([*args, "--force", "--samples", "5", "--seed", "3"]) == 0
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert data["samples"] == 5 and data["seed"] == 3
