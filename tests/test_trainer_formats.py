"""`prepare --export`: the same samples in LLaMA-Factory's, axolotl's, TRL's and unsloth's formats,
loadable with `datasets.load_dataset("json", ...)` as those trainers load them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import EXAMPLES, run_cli

from finetune.trainer_formats import (
    FORMATS,
    alpaca_row,
    alternating_turns,
    llama_factory_dataset_info,
    messages_row,
    sharegpt_row,
)

LINE = EXAMPLES / "line_demo.txt"
DISCORD = EXAMPLES / "discord_demo.json"
PERSONA = "美咲"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("formats") / "ds"
    proc = run_cli("prepare", LINE, DISCORD, "--persona", PERSONA, "--alias", "misaki", "--timezone", "Asia/Tokyo",
                   "--out", out, "--export", "sharegpt,alpaca", "--export", "messages,sharegpt")
    assert proc.returncode == 0, proc.stderr
    assert "for other trainers: train.sharegpt.jsonl" in proc.stdout
    return out


def _samples(out: Path) -> dict[str, list[dict]]:
    return {split: _jsonl(out / f"{split}.jsonl") for split in ("train", "eval")}


def test_every_format_has_one_line_per_sample_in_the_same_order(prepared):
    samples = _samples(prepared)
    assert samples["eval"], "the examples hold a conversation out"
    for fmt in FORMATS:
        for split, rows in samples.items():
            exported = _jsonl(prepared / f"{split}.{fmt}.jsonl")
            assert len(exported) == len(rows), (fmt, split)
    sharegpt = _jsonl(prepared / "train.sharegpt.jsonl")
    assert [row["conversations"][-1]["value"] for row in sharegpt] == [s["target"] for s in samples["train"]]
    stats = json.loads((prepared / "stats.json").read_text(encoding="utf-8"))
    assert stats["exports"] == ["sharegpt", "alpaca", "messages"]  # named twice, written once


def test_roles_alternate_from_the_user_and_the_reply_is_last(prepared):
    for split in ("train", "eval"):
        for row in _jsonl(prepared / f"{split}.sharegpt.jsonl"):
            tags = [m["from"] for m in row["conversations"]]
            # LLaMA-Factory: human at odd positions, gpt at even, an even count (else the row is skipped).
            assert tags == ["human", "gpt"] * (len(tags) // 2) and len(tags) % 2 == 0
        for row in _jsonl(prepared / f"{split}.messages.jsonl"):
            messages = row["messages"]
            assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
            assert [m["train"] for m in messages] == [False] * (len(messages) - 1) + [True]


def test_persona_is_the_assistant_and_other_speakers_keep_their_names(prepared):
    samples = _samples(prepared)["train"] + _samples(prepared)["eval"]
    rows = _jsonl(prepared / "train.sharegpt.jsonl") + _jsonl(prepared / "eval.sharegpt.jsonl")
    for sample, row in zip(samples, rows, strict=True):
        said = [m["value"] for m in row["conversations"] if m["from"] == "gpt"]
        assert said == [t["text"] for t in sample["context"] if t["speaker"] == PERSONA] + [sample["target"]]
        others = "\n".join(m["value"] for m in row["conversations"] if m["from"] == "human")
        for turn in sample["context"]:
            if turn["speaker"] != PERSONA:
                assert f"{turn['speaker']}: {turn['text']}" in others
        assert f"{PERSONA}: " not in others
    (boss,) = [r for r in rows if r["conversations"][-1]["value"] == "回復役やるね\nポーション持ってく"]
    # Two people speaking in a row are one user turn, each line led by its speaker.
    assert boss["conversations"] == [
        {"from": "human", "value": "ryo_k: 今日のボス戦いける人いる？"},
        {"from": "gpt", "value": "いけるよ〜21時からなら"},
        {"from": "human", "value": "sora: おれも！\nryo_k: 助かる、装備そろえとく"},
        {"from": "gpt", "value": "回復役やるね\nポーション持ってく"},
    ]


def test_alpaca_puts_the_transcript_in_input_and_the_reply_in_output(prepared):
    samples = _samples(prepared)["train"]
    rows = _jsonl(prepared / "train.alpaca.jsonl")
    for sample, row in zip(samples, rows, strict=True):
        assert row["instruction"] == f"{PERSONA}として、次の会話の続きを返信してください。"
        assert row["input"] == "\n".join(f"{t['speaker']}: {t['text']}" for t in sample["context"])
        assert row["output"] == sample["target"]


def test_dataset_info_lets_llama_factory_read_the_folder(prepared):
    info = json.loads((prepared / "dataset_info.json").read_text(encoding="utf-8"))
    assert set(info) == {"bunshin_sharegpt_train", "bunshin_sharegpt_eval", "bunshin_alpaca_train", "bunshin_alpaca_eval"}
    for entry in info.values():
        assert (prepared / entry["file_name"]).is_file()
    assert info["bunshin_sharegpt_train"]["columns"] == {"messages": "conversations"}
    assert info["bunshin_alpaca_eval"]["columns"] == {"prompt": "instruction", "query": "input", "response": "output"}


def test_every_file_loads_with_datasets(prepared, tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    for name in ["train.jsonl", "eval.jsonl"] + [f"{s}.{f}.jsonl" for f in FORMATS for s in ("train", "eval")]:
        path = prepared / name
        rows = _jsonl(path)
        loaded = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path))
        assert loaded.num_rows == len(rows), name
        if name.count(".") == 2:  # the exports hold only strings (and `train` flags): they come back as written
            assert loaded.to_list() == rows, name
        else:  # bunshin's own: Arrow reads whole-second `time` strings as timestamps, the rest as written
            assert loaded["target"] == [r["target"] for r in rows] and loaded["context"] == [r["context"] for r in rows]


def test_bunshin_file_loads_with_explicit_features_where_type_guessing_fails(prepared, tmp_path):
    """`datasets` fixes each column's type from the file's first chunk (10 MB). Two ways that breaks on
    bunshin's own files: a first chunk of samples without context (a data package given first) types
    `context` as a list of nulls; a first chunk of whole-second times (LINE) types `time` as a timestamp,
    which Discord's `.500000+00:00` times later fail to parse as. The features the README gives make both
    load. (Arrow still reads whole-second times as timestamps before the cast to string: those come back
    as `2024-05-31 09:05:00`, UTC without the offset.) A tiny chunk size stands in for the 10 MB."""
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    samples = _samples(prepared)["train"]
    assert any("." in s["time"] for s in samples) and any(s["context"] for s in samples)
    string = datasets.Value("string")
    features = datasets.Features({"id": string, "persona": string, "time": string, "conversation_start": string,
                                  "source": string, "conversation": datasets.Value("int64"),
                                  "context": [{"speaker": string, "text": string}], "target": string})
    first_chunks = {
        "no context": {**samples[0], "context": []},
        "whole-second times": {**samples[0], "time": "2024-05-01T03:00:00+00:00"},
    }
    for case, first in first_chunks.items():
        path = tmp_path / case / "train.jsonl"
        path.parent.mkdir()
        rows = [first] * 200 + samples
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        with pytest.raises(datasets.exceptions.DatasetGenerationError):
            datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(path.parent / "a"),
                                  chunksize=4096)
        loaded = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(path.parent / "b"),
                                       chunksize=4096, features=features)
        for column in ("id", "context", "target"):
            assert loaded[column] == [r[column] for r in rows], (case, column)


def _sample(context: list[tuple[str, str]], target: str = "返信") -> dict:
    return {"persona": PERSONA, "context": [{"speaker": s, "text": t} for s, t in context], "target": target}


def test_a_sample_without_context_is_an_empty_user_turn_then_the_reply():
    sample = _sample([])
    assert alternating_turns(sample) == [("user", ""), ("assistant", "返信")]
    assert sharegpt_row(sample)["conversations"][0] == {"from": "human", "value": ""}
    assert messages_row(sample)["messages"][1] == {"role": "assistant", "content": "返信", "train": True}
    assert alpaca_row(sample)["input"] == ""


def test_persona_speaking_first_or_twice_in_a_row_gets_an_empty_user_turn_between():
    sample = _sample([(PERSONA, "着いた"), ("健太", "いま行く"), ("sora", "おれも"), (PERSONA, "了解"), (PERSONA, "[写真]")])
    assert alternating_turns(sample) == [
        ("user", ""), ("assistant", "着いた"),
        ("user", "健太: いま行く\nsora: おれも"), ("assistant", "了解"),
        ("user", ""), ("assistant", "[写真]"),
        ("user", ""), ("assistant", "返信"),
    ]


def test_unknown_format_is_a_usage_error_and_nothing_is_written(tmp_path):
    out = tmp_path / "ds"
    proc = run_cli("prepare", LINE, "--persona", PERSONA, "--out", out, "--export", "sharegpt,jsonl")
    assert proc.returncode == 2
    assert "argument --export: unknown export format 'jsonl'; known: sharegpt, alpaca, messages" in proc.stderr
    assert not out.exists()


def test_failed_prepare_writes_no_export(tmp_path):
    out = tmp_path / "ds"
    proc = run_cli("prepare", LINE, "--persona", "誰か", "--out", out, "--export", "sharegpt,messages")
    assert proc.returncode == 1 and "has no text messages" in proc.stderr
    assert not out.exists()


def test_an_error_while_writing_exports_leaves_no_folder(tmp_path, monkeypatch):
    import finetune.prepare
    from finetune.cli import main

    def failing_writer(folder, formats, train, held_out):
        (folder / "train.sharegpt.jsonl").write_text("half", encoding="utf-8")
        raise OSError("disk full")

    monkeypatch.setattr(finetune.prepare, "write_exports", failing_writer)
    out = tmp_path / "ds"
    with pytest.raises(OSError, match="disk full"):
        main(["prepare", str(LINE), "--persona", PERSONA, "--timezone", "Asia/Tokyo", "--out", str(out),
              "--export", "sharegpt", "--no-progress"])
    assert list(tmp_path.iterdir()) == []  # no output, no staging folder left behind


def test_without_eval_samples_dataset_info_names_only_train():
    # `datasets` cannot load a JSON file without rows, so LLaMA-Factory must not be pointed at one.
    info = llama_factory_dataset_info(["messages", "alpaca"], has_eval=False)
    assert list(info) == ["bunshin_alpaca_train"]
    assert llama_factory_dataset_info(["messages"], has_eval=True) == {}


def test_config_file_can_ask_for_exports(tmp_path):
    from conftest import write_toml

    from finetune.config import ConfigError
    from finetune.prepare_args import prepare_defaults_from_config

    assert prepare_defaults_from_config(write_toml(tmp_path / "a.toml", {"prepare": {"export": ["sharegpt", "messages"]}})) == {
        "export": ["sharegpt", "messages"]
    }
    assert prepare_defaults_from_config(write_toml(tmp_path / "b.toml", {"prepare": {"export": []}})) == {"export": []}
    with pytest.raises(ConfigError, match="unknown export format 'csv'"):
        prepare_defaults_from_config(write_toml(tmp_path / "c.toml", {"prepare": {"export": "alpaca,csv"}}))
