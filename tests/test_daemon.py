"""`python -m bot` end to end, as an operator runs it: a real process, real stdin, real HTTP, real SQLite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from finetune.tiny_model import build_tiny_model
from tests.support.daemon import PERSONA, converse, replies, start_bot, write_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("bot") / "tiny")


def test_console_answers_each_message_and_exits_cleanly_at_end_of_input(tmp_path, tiny):
    done = converse(write_config(tmp_path, tiny), ["おはよう", "今日ひま？"])
    assert done.returncode == 0, done.stderr
    assert len(replies(done.stdout)) == 2
    # The operator's log says what happened without the conversation itself.
    assert "serving as 美咲" in done.stderr and "stopped" in done.stderr
    assert "おはよう" not in done.stderr and "今日ひま" not in done.stderr


def test_memory_survives_a_restart_and_reset_clears_it(tmp_path, tiny):
    import sqlite3

    config = write_config(tmp_path, tiny)
    assert converse(config, ["一回目のメッセージ"]).returncode == 0
    assert converse(config, ["二回目のメッセージ"]).returncode == 0
    rows = sqlite3.connect(tmp_path / "memory.sqlite3").execute(
        "SELECT speaker, text FROM turns WHERE chat_key = 'console:local' ORDER BY id").fetchall()
    speakers = [s for s, _ in rows]
    texts = [t for _, t in rows]
    assert speakers == ["健太", PERSONA, "健太", PERSONA]
    assert texts[0] == "一回目のメッセージ" and texts[2] == "二回目のメッセージ"
    done = converse(config, ["/reset"])
    assert "会話の記憶をリセットしました。" in done.stdout
    assert sqlite3.connect(tmp_path / "memory.sqlite3").execute("SELECT COUNT(*) FROM turns").fetchone()[0] == 0


def test_the_second_turn_sees_the_first(tmp_path, tiny):
    """Greedy decoding: the same message gives another reply once the earlier turns are in the prompt."""
    config = write_config(tmp_path, tiny, generation={"max_new_tokens": 12, "temperature": 0.0})
    first = replies(converse(config, ["おはよう"]).stdout)
    converse(config, ["/reset"])
    again = replies(converse(config, ["おはよう", "おはよう"]).stdout)
    assert again[0] == first[0]
    assert len(again) == 2


def test_sigterm_lets_the_reply_in_flight_finish(tmp_path, tiny):
    # A long reply, so SIGTERM arrives while it is being generated.
    config = write_config(tmp_path, tiny, generation={"max_new_tokens": 400, "temperature": 0.0, "repetition_penalty": 1.0})
    proc = start_bot(config)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait for "serving" in the log before talking
        line = proc.stderr.readline()
        if "serving as" in line:
            break
    proc.stdin.write("長い返事をちょうだい\n")
    proc.stdin.flush()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert len(replies(out)) == 1  # the in-flight reply was delivered, not dropped
    assert "shutting down" in err


def test_healthz_and_metrics_are_served(tmp_path, tiny):
    config = write_config(tmp_path, tiny, server={"port": 0})
    proc = start_bot(config)
    url = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and url is None:
        line = proc.stderr.readline()
        if "health and metrics on" in line:
            url = line.split("on ", 1)[1].split(" ")[0]
    assert url, "the daemon logs where /healthz is"
    health = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback
                health = json.loads(r.read())
                break
        except urllib.error.HTTPError as exc:  # 503 while the model loads
            assert exc.code == 503
            assert json.loads(exc.read())["phase"] in ("loading", "warming_up")
            time.sleep(0.2)
    assert health["ok"] is True and health["phase"] == "serving"
    proc.stdin.write("こんにちは\n")
    proc.stdin.flush()
    proc.stdout.readline()
    with urllib.request.urlopen(url.replace("/healthz", "/metrics"), timeout=5) as r:  # noqa: S310
        text = r.read().decode()
    assert "bunshin_batch_size" in text and "bunshin_generated_tokens" in text
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


def test_bad_config_names_the_key(tmp_path, tiny):
    config = write_config(tmp_path, tiny, queue={"max_batch": 0})
    done = converse(config, [])
    assert done.returncode == 2
    assert "[queue] max_batch" in done.stderr


def test_unloadable_model_says_why_and_points_at_the_demo(tmp_path):
    config = write_config(tmp_path, tmp_path / "no-such-model")
    done = converse(config, ["hi"])
    assert done.returncode != 0
    assert "no-such-model" in done.stderr and "python -m bot --demo" in done.stderr
    assert not replies(done.stdout)  # never a silent fallback to another model


def test_demo_runs_offline_with_no_config(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONIOENCODING": "utf-8", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "bot", "--demo"], cwd=tmp_path, input="こんにちは\n", text=True,
                          encoding="utf-8", capture_output=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr
    assert len(replies(done.stdout)) == 1
    assert (tmp_path / "cache" / "bunshin" / "demo-tiny-model" / "spiece.model").is_file()
