"""SIGKILL, the signal nothing can catch: the daemon, `finetune prepare` and `finetune train` are killed as real
processes at their most fragile moment, then run again. Memory survives, no half-written output appears at
the final path, and training resumes from its last whole checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import pytest
from conftest import EXAMPLES, REPO, run_cli

from bot.inbox import Inbox
from bot.memory import ConversationMemory
from bot.router import ERROR_REPLY
from finetune.tiny_model import build_tiny_model
from tests.support.daemon import PERSONA, converse, replies, start_bot, write_config

TRAIN_ARGS = ("--pack-length", "256", "--batch-tokens", "256", "--lr", "3e-3", "--eval-every", "0", "--no-progress",
              "--seed", "7")


def wait_for(condition, what: str, timeout: float = 60):
    """Poll a file-system or database condition another process brings about (no event to await across processes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.001)
    raise AssertionError(f"timed out waiting for {what}")


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "finetune", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            env={**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    corpus = (EXAMPLES / "line_demo.txt").read_text(encoding="utf-8").splitlines()
    return build_tiny_model(tmp_path_factory.mktemp("base") / "tiny", corpus)


# --- the daemon ---------------------------------------------------------------------------------------------


def test_daemon_killed_mid_reply_keeps_its_memory_and_answers_it_once_after_a_restart(tmp_path, tiny):
    memory_file = tmp_path / "memory.sqlite3"
    quick = write_config(tmp_path, tiny)
    assert converse(quick, ["一回目のメッセージ"]).returncode == 0

    # A long reply, so the kill lands while it is being generated.
    (tmp_path / "long").mkdir()
    slow = write_config(tmp_path / "long", tiny, memory={"path": str(memory_file)},
                        generation={"max_new_tokens": 400, "temperature": 0.0, "repetition_penalty": 1.0})
    proc = start_bot(slow)
    try:
        assert any("serving as" in line for line in proc.stderr), "the daemon stopped before serving"
        proc.stdin.write("二回目のメッセージ\n")
        proc.stdin.flush()

        def saved_question() -> bool:  # committed before the reply is generated; read as another process would
            with sqlite3.connect(f"file:{memory_file}?mode=ro", uri=True) as db:
                return db.execute("SELECT COUNT(*) FROM turns WHERE text = '二回目のメッセージ'").fetchone()[0] == 1

        wait_for(saved_question, "the second message in memory")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        out = proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
        with contextlib.suppress(BrokenPipeError):  # closing stdin flushes it into a dead process
            proc.stdin.close()
    assert proc.returncode == -signal.SIGKILL
    assert replies(out) == []  # killed before the reply went out

    with ConversationMemory(memory_file) as memory:  # opens: quick_check finds the file whole
        turns = [(r.speaker, r.text) for r in memory.recent("console:local", 10)]
    assert [t for _, t in turns[:1]] == ["一回目のメッセージ"] and turns[1][0] == PERSONA
    assert turns[2:] == [("健太", "二回目のメッセージ")]  # the question kept, no half-written answer

    # The restart answers the message the kill interrupted (it waited in the inbox), once, then the new one.
    done = converse(quick, ["三回目のメッセージ"])
    assert done.returncode == 0, done.stderr
    assert len(replies(done.stdout)) == 2
    assert "1 message(s) left unanswered by the last run" in done.stderr
    with ConversationMemory(memory_file) as memory:
        turns = [(r.speaker, r.text) for r in memory.recent("console:local", 10)]
    assert [t for _, t in turns].count("二回目のメッセージ") == 1
    assert [s for s, _ in turns] == ["健太", PERSONA, "健太", PERSONA, "健太", PERSONA]
    assert turns[2][1] == "二回目のメッセージ" and turns[4][1] == "三回目のメッセージ"


def test_restart_onto_a_damaged_memory_file_stops_naming_it_and_leaves_it_alone(tmp_path, tiny):
    memory_file = tmp_path / "memory.sqlite3"
    config = write_config(tmp_path, tiny)
    with ConversationMemory(memory_file, keep=None) as memory:
        for i in range(2000):
            memory.append("console:local", "健太", f"大事な話 {i} " * 5)
    Inbox(Inbox.path_for(str(memory_file))).close()  # the inbox a daemon keeps beside its memory
    damaged = memory_file.read_bytes()[: memory_file.stat().st_size // 2]  # a disk that stopped half-way
    memory_file.write_bytes(damaged)

    done = converse(config, ["こんにちは"])
    assert done.returncode != 0
    assert f"error: {memory_file}: the memory database is damaged" in done.stderr and "move it aside" in done.stderr
    assert "Traceback" not in done.stderr and replies(done.stdout) == []
    assert memory_file.read_bytes() == damaged  # not overwritten with an empty memory


def test_a_memory_whose_inbox_is_gone_is_refused_saying_how_to_start_fresh_and_nothing_is_created(tmp_path, tiny):
    memory_file, inbox_file = tmp_path / "memory.sqlite3", tmp_path / "memory.inbox.sqlite3"
    config = write_config(tmp_path, tiny)
    assert converse(config, ["覚えててね"]).returncode == 0
    inbox_file.unlink()  # deleted by hand, or lost with a volume that held only it
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    done = converse(config, ["こんにちは"])
    assert done.returncode != 0 and replies(done.stdout) == []
    assert f"error: the inbox {inbox_file} is missing, but the memory beside it ({memory_file}) exists" in done.stderr
    assert f"rm {memory_file}*" in done.stderr and "--new-inbox" in done.stderr  # how to start fresh, both ways
    assert "Traceback" not in done.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # nothing created or changed

    proc = start_bot(config, "--new-inbox")  # keeps the conversations, starts an empty inbox
    out, err = proc.communicate("こんにちは\n", timeout=120)
    assert proc.returncode == 0, err
    assert len(replies(out)) == 1 and inbox_file.exists()
    with ConversationMemory(memory_file) as memory:
        assert [r.text for r in memory.recent("console:local", 10)][0] == "覚えててね"


MARKER = "ひみつ-MARKER-7f3a"  # a message's text; stored with a byte that is not UTF-8 after it


def _damage_text(db_file: Path, table: str, row_id: int) -> None:
    """The row's text column as the marker plus an invalid UTF-8 byte: what a damaged page or another program
    leaves. Python's sqlite3 quotes such a value in its decoding error."""
    with sqlite3.connect(db_file) as db:
        db.execute(f"UPDATE {table} SET text = CAST(? AS TEXT) WHERE id = ?", (MARKER.encode() + b"\xff", row_id))


def test_a_damaged_inbox_row_is_set_aside_by_its_ids_and_its_text_never_reaches_a_log(tmp_path, tiny):
    from bot.messages import IncomingMessage

    inbox_file = tmp_path / "memory.inbox.sqlite3"
    config = write_config(tmp_path, tiny)
    assert converse(config, ["はじめまして"]).returncode == 0

    async def left_unanswered():  # two lines a killed run accepted and never answered
        inbox = Inbox(inbox_file)
        entries = await inbox.accept([IncomingMessage("console", "local", "local", "健太", text, True)
                                      for text in ("壊れる行", "残る行")])
        inbox.close()
        return entries

    damaged, kept = asyncio.run(left_unanswered())
    _damage_text(inbox_file, "entries", damaged.id)

    done = converse(config, ["新しい行"])
    assert done.returncode == 0, done.stderr
    assert MARKER not in done.stderr + done.stdout and "MARKER" not in done.stderr + done.stdout
    assert re.search(rf"inbox entry {damaged.id} \(event {damaged.message.event_id}\) cannot be read back \(text "
                     r"that is not UTF-8\): set aside as 'unreadable'", done.stderr), done.stderr
    assert len(replies(done.stdout)) == 2  # the readable one left over, and the new one
    with sqlite3.connect(inbox_file) as db:
        rows = dict(db.execute("SELECT id, outcome FROM entries WHERE id IN (?, ?)", (damaged.id, kept.id)))
        assert db.execute("SELECT text FROM entries WHERE id = ?", (damaged.id,)).fetchone() == ("",)
    assert rows == {damaged.id: "unreadable", kept.id: "replied"}


def test_a_damaged_memory_turn_gets_an_apology_and_its_text_never_reaches_a_log(tmp_path, tiny):
    memory_file = tmp_path / "memory.sqlite3"
    config = write_config(tmp_path, tiny)
    assert converse(config, ["覚えててね"]).returncode == 0
    _damage_text(memory_file, "turns", 1)

    done = converse(config, ["続きだよ"])
    assert done.returncode == 0, done.stderr
    assert MARKER not in done.stderr + done.stdout and "MARKER" not in done.stderr + done.stdout
    assert f"{memory_file}: the memory database is damaged (a stored value in column 'text' is not valid UTF-8" \
        in done.stderr, done.stderr
    assert replies(done.stdout) == [f"{PERSONA}: {ERROR_REPLY}"]  # said, so the user knows to try again


# --- finetune prepare -----------------------------------------------------------------------------------------


def big_line_export(path: Path) -> None:
    """1600 days of chat, 40 messages a day: about 45 MB of train.jsonl, so writing it takes ~0.1 s to kill it in."""
    words = "今日 明日 ご飯 行く 映画 どう 楽しい 眠い 仕事 雨 晴れ 電車 遅れた ありがとう また 今度".split()
    lines = ["[LINE] 健太とのトーク履歴", ""]
    for day in range(1600):
        lines.append((date(2020, 1, 1) + timedelta(days=day)).strftime("%Y/%m/%d(月)"))
        for i in range(40):
            text = "".join(words[(day * 7 + i * j) % len(words)] for j in range(3 + (day + i) % 27))
            lines.append(f"{10 + i // 4}:{(i * 7) % 60:02d}\t{'美咲' if i % 2 else '健太'}\t{text}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_prepare_killed_while_writing_leaves_no_output_and_the_next_run_cleans_up(tmp_path):
    export, out = tmp_path / "talk.txt", tmp_path / "dataset"
    big_line_export(export)
    args = ("prepare", export, "--persona", "美咲", "--timezone", "Asia/Tokyo", "--out", out)
    proc = start(*args)
    try:
        staging = wait_for(lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".dataset.")],
                           "the staging folder")
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed prepare must leave nothing at the output path"
    assert all(p.exists() for p in staging)  # the hidden staging folder is all that is left

    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "memory.index.npz", "memory.jsonl", "stats.json", "train.jsonl"]
    assert json.loads((out / "stats.json").read_text(encoding="utf-8"))["samples"]["train"] > 1000
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the dead run's staging removed


# --- finetune train -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ds"
    proc = run_cli("prepare", EXAMPLES / "line_demo.txt", "--persona", PERSONA, "--timezone", "Asia/Tokyo", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


def test_train_killed_mid_run_resumes_from_its_last_whole_checkpoint(tmp_path, tiny, dataset):
    out, checkpoints = tmp_path / "adapter", tmp_path / "adapter.checkpoints"
    args = ("train", dataset, "--base", tiny, "--out", out, *TRAIN_ARGS, "--max-steps", "12", "--save-every", "2")
    proc = start(*args)
    try:
        logged = 0
        for line in proc.stdout:  # one log line per step, printed after that step's checkpoint was saved
            logged += line.startswith("{'loss'")
            if logged == 7:
                break
        assert logged == 7, proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "no adapter folder until training is done"
    saved = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    assert saved and saved[-1] >= 6

    # A kill inside the Trainer's save leaves checkpoint-N without its trainer_state.json (written last).
    # Make the newest one so: resume must go back to the one before, not fail on it.
    (checkpoints / f"checkpoint-{saved[-1]}" / "trainer_state.json").unlink()
    whole = [s for s in saved if s < saved[-1]][-1]

    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert sum(line.startswith("{'loss'") for line in resumed.stdout.splitlines()) == 12 - whole
    manifest = json.loads((out / "bunshin.json").read_text(encoding="utf-8"))
    assert manifest["training"]["steps"] == 12
    assert (out / "adapter_model.safetensors").is_file()
    assert not checkpoints.exists()  # kept through the kill for --resume; gone once the resumed run finished
