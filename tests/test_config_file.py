"""One config file, read one way: the bot, `finetune prepare --config` and `finetune train --config` all read it
through finetune/config.py's model of the whole file, so they report the same problems and read the same values."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXAMPLES, REPO, run_cli, write_toml

from finetune.cli import _parse_args
from finetune.config import load_config

LINE = EXAMPLES / "line_demo.txt"
BAD_PREPARE = "[prepare]\nmax_context_turn = 5\nsession_gap = true\n"
BAD_PREPARE_PROBLEMS = [  # what FILE is followed by: a misspelt key gets its line
    ": [prepare] session_gap: must be a duration",
    ":2: [prepare] max_context_turn: unknown key (did you mean max_context_turns?)",
]


def _bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(BAD_PREPARE, encoding="utf-8")
    return path


@pytest.mark.parametrize("command", ["prepare", "train", "bot"])
def test_a_bad_prepare_table_is_the_same_clear_error_from_each_reader(tmp_path, command):
    config = _bad_config(tmp_path)
    if command == "bot":
        proc = run_cli("--config", config, module="bot")
    elif command == "prepare":
        proc = run_cli("prepare", LINE, "--persona", "美咲", "--out", tmp_path / "out", "--config", config)
    else:
        proc = run_cli("train", tmp_path / "data", "--out", tmp_path / "adapter", "--config", config)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().removeprefix("error: ").splitlines()
    assert len(lines) == len(BAD_PREPARE_PROBLEMS), proc.stderr
    for line, problem in zip(lines, BAD_PREPARE_PROBLEMS, strict=True):
        assert line.startswith(f"{config}{problem}"), proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "adapter").exists()


def test_bot_prepare_and_train_read_the_same_values(tmp_path):
    config = write_toml(tmp_path / "c.toml", {
        "model": {"base": "some/base-model"},
        "prepare": {"session_gap": "30m", "max_context_turns": 3, "redact": False, "timezone": "Asia/Tokyo",
                    "export": "alpaca"},
    })
    bot = load_config(config)
    assert (bot.model.base, bot.prepare.session_gap, bot.prepare.max_context_turns) == ("some/base-model", 1800, 3)

    prepare = _parse_args(["prepare", str(LINE), "--persona", "美咲", "--out", "o", "--config", str(config)])
    assert (prepare.session_gap, prepare.max_context_turns, prepare.no_redact) == (1800, 3, True)
    assert (prepare.timezone, prepare.export) == ("Asia/Tokyo", ["alpaca"])
    assert prepare.max_context_chars == 1500  # a key the file leaves out keeps the flag's default
    train = _parse_args(["train", "data", "--out", "a", "--config", str(config)])
    assert train.base == bot.model.base

    # Flags win over the file.
    prepare = _parse_args(["prepare", str(LINE), "--persona", "美咲", "--out", "o", "--config", str(config),
                           "--max-context-turns", "7", "--session-gap", "2h"])
    assert (prepare.max_context_turns, prepare.session_gap) == (7, 7200)
    assert _parse_args(["train", "data", "--out", "a", "--config", str(config), "--base", "other"]).base == "other"


def test_prepare_writes_what_the_config_file_asks_for(tmp_path):
    config = write_toml(tmp_path / "c.toml", {"prepare": {"session_gap": "30m", "max_context_turns": 3,
                                                          "redact": False, "timezone": "Asia/Tokyo"}})
    out = tmp_path / "out"
    proc = run_cli("prepare", LINE, "--persona", "美咲", "--out", out, "--config", config, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    options = json.loads((out / "stats.json").read_text(encoding="utf-8"))["options"]
    assert options["session_gap_s"] == 1800 and options["max_context_turns"] == 3
    assert options["redact"] is False and options["timezone"] == "Asia/Tokyo"


def test_without_a_base_in_the_file_train_uses_the_default_base(tmp_path):
    from finetune.model_loading import DEFAULT_BASE

    for table in ({}, {"model": {"base": ""}}, {"prepare": {"max_context_turns": 3}}):
        config = write_toml(tmp_path / "c.toml", table)
        assert _parse_args(["train", "data", "--out", "a", "--config", str(config)]).base == DEFAULT_BASE
    assert _parse_args(["train", "data", "--out", "a"]).base == DEFAULT_BASE
    assert load_config(write_toml(tmp_path / "e.toml", {})).model.base_model == DEFAULT_BASE


def test_one_toml_reader():
    readers = [str(path.relative_to(REPO)) for folder in ("bot", "finetune") for path in (REPO / folder).rglob("*.py")
               if re.search(r"^\s*import tom(llib|li)\b", path.read_text(encoding="utf-8"), flags=re.MULTILINE)]
    assert readers == ["finetune/config.py"]


def test_inspect_loads_neither_torch_nor_pydantic():
    code = ("import sys\nfrom finetune.cli import main\nrc = main(['inspect', sys.argv[1]])\n"
            "print('loaded:', [m for m in ('torch', 'transformers', 'pydantic', 'finetune.config') if m in sys.modules])\n"
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(LINE)], cwd=REPO, capture_output=True, text=True,
                          encoding="utf-8", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "loaded: []"
