"""Bad input gets a clear error that says what and where, a non-zero exit, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import EXAMPLES, run_cli

from finetune.atomic_output import atomic_directory

LINE = EXAMPLES / "line_demo.txt"


def _prepare_fails(tmp_path: Path, *args) -> str:
    out = tmp_path / "out"
    proc = run_cli("prepare", *args, "--out", out)
    assert proc.returncode != 0
    assert not out.exists(), "a failed prepare must not leave an output folder"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "no staging folder left behind"
    assert proc.stdout == ""
    return proc.stderr


def test_missing_file(tmp_path):
    err = _prepare_fails(tmp_path, tmp_path / "nope.txt", "--persona", "美咲")
    assert err.startswith("error: ") and "nope.txt" in err and "no such file" in err


def test_unknown_format(tmp_path):
    odd = tmp_path / "notes.md"
    odd.write_text("# shopping\n\n- milk\n- eggs\n", encoding="utf-8")
    err = _prepare_fails(tmp_path, odd, "--persona", "美咲")
    assert f"{odd}: cannot tell the export format" in err and "--format" in err


def test_undecodable_bytes_name_file_and_line(tmp_path):
    bad = tmp_path / "talk.txt"
    bad.write_bytes("[LINE] 佐藤とのトーク履歴\n\n2024/01/01(月)\n10:00\t佐藤\tok\n".encode() + b"10:01\t\xe4\xbd\tbroken\n")
    err = _prepare_fails(tmp_path, bad, "--persona", "佐藤")
    assert f"{bad}:5: bytes e4 bd" in err and "not valid utf-8" in err and "--encoding cp932" in err


def test_quote_that_never_closes_names_where_it_opened(tmp_path):
    bad = tmp_path / "talk.txt"
    bad.write_text('2024/01/01(月)\n10:00\t佐藤\tok\n10:01\t佐藤\t"first line\nsecond line\n10:02\t田中\tno closing quote\n',
                   encoding="utf-8")
    err = _prepare_fails(tmp_path, bad, "--persona", "佐藤")
    assert f"{bad}:3: a quoted multi-line message opens here and never closes" in err


def test_persona_not_in_data_suggests_closest_names(tmp_path):
    err = _prepare_fails(tmp_path, LINE, "--persona", "美唉")
    assert "persona '美唉' has no text messages in the inputs; closest names: 美咲" in err


def test_excluded_speaker_typo_is_an_error(tmp_path):
    err = _prepare_fails(tmp_path, LINE, "--persona", "美咲", "--exclude-speaker", "健汰")
    assert "--exclude-speaker '健汰' is not a speaker in the inputs; closest names: 健太" in err


def test_empty_result(tmp_path):
    only_stickers = tmp_path / "talk.txt"
    only_stickers.write_text("2024/01/01(月)\n10:00\tA\tこんにちは\n10:01\tB\t[スタンプ]\n10:02\tB\t[写真]\n", encoding="utf-8")
    err = _prepare_fails(tmp_path, only_stickers, "--persona", "B")
    # B has placeholders but no text: the persona check says so before any sample is built.
    assert "persona 'B' has no text messages" in err


def test_no_samples_after_filters(tmp_path):
    err = _prepare_fails(tmp_path, LINE, "--persona", "美咲", "--min-context-turns", "50")
    assert "no training samples" in err and "fewer than --min-context-turns" in err


def test_existing_output_is_kept_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.jsonl").write_text("precious\n", encoding="utf-8")
    proc = run_cli("prepare", LINE, "--persona", "美咲", "--out", out)
    assert proc.returncode != 0 and "already exists" in proc.stderr and "--force" in proc.stderr
    assert (out / "train.jsonl").read_text(encoding="utf-8") == "precious\n"
    proc = run_cli("prepare", LINE, "--persona", "美咲", "--out", out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "memory.index.npz", "memory.jsonl", "stats.json", "train.jsonl"]
    assert not [p for p in tmp_path.iterdir() if p.name != "out"], "no staging or old folder left behind"


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(out) as staging:
        (staging / "train.jsonl").write_text("half", encoding="utf-8")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_bad_config_names_the_key(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[prepare]\nmax_context_turns = "many"\n', encoding="utf-8")
    proc = run_cli("prepare", LINE, "--persona", "美咲", "--out", tmp_path / "o", "--config", config)
    assert proc.returncode == 2
    assert f"{config}: [prepare] max_context_turns: expected an integer, got a string" in proc.stderr


def test_inspect_json_on_multiple_paths_is_a_list():
    proc = run_cli("inspect", "--json", LINE, LINE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("[{") and proc.stdout.count('"format": "line"') == 2
