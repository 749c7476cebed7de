"""The train/eval split is by time, whatever order the exports are given in.

Every other test passes the LINE export (May-June 2 2024) before the Discord one (June 3-5), which is
also time order, so a split by input order would pass them all; here the order is reversed.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import EXAMPLES, run_cli


def _prepare(out: Path, *inputs: Path) -> tuple[list[dict], list[dict]]:
    proc = run_cli("prepare", *inputs, "--persona", "美咲", "--alias", "misaki", "--timezone", "Asia/Tokyo",
                   "--eval-fraction", "0.3", "--out", out)
    assert proc.returncode == 0, proc.stderr
    read = lambda name: [json.loads(line) for line in (out / name).read_text(encoding="utf-8").splitlines()]  # noqa: E731
    return read("train.jsonl"), read("eval.jsonl")


def test_eval_holds_the_latest_conversations_whatever_the_input_order(tmp_path):
    line, discord = EXAMPLES / "line_demo.txt", EXAMPLES / "discord_demo.json"
    train, held_out = _prepare(tmp_path / "time-order", line, discord)
    train_reversed, held_out_reversed = _prepare(tmp_path / "reversed", discord, line)
    assert held_out and train
    assert sorted(s["id"] for s in held_out_reversed) == sorted(s["id"] for s in held_out)
    assert sorted(s["id"] for s in train_reversed) == sorted(s["id"] for s in train)
    # Whole conversations, the latest ones: no held-out reply is older than the newest training one's day.
    assert min(s["time"] for s in held_out) > max(s["time"] for s in train)
