"""A fact said once reaches a reply of a real pretrained base through the persona's memory, and a fact that changed
comes out new: Gemma 3 270M, no training, the prompt-only system of `finetune chat` (greedy).

The path is the one a user takes: a LINE export, `finetune prepare` (which writes the memory), then `finetune chat
DATASET --system prompt-only --base GEMMA`, asked in a new conversation (each question after `/reset`), with
`--show-memory` printing the notes each reply was given. The same questions to `--system base` (the same model, no
notes) are the control: what the base says without the memory does not hold the facts, so the memory carried them.

On 2 CPU cores each `chat` loads the model once (two loads in all) and writes at most MAX_NEW_TOKENS a reply.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import pytest
from conftest import REPO, run_cli

pytestmark = pytest.mark.real_base

PERSONA, FRIEND = "美咲", "健太"
WEEKDAYS = "月火水木金土日"
HOMETOWN, OLD_JOB, NEW_JOB = "新潟", "銀行", "本屋"
# Each said once, on its own day among months of small talk. The job changed: the new one was told later.
FACTS = [
    (date(2023, 4, 8), "美咲ちゃんって出身どこ？", f"{HOMETOWN}だよ！雪すごいとこ笑"),
    (date(2023, 6, 3), "仕事なにしてるの？", f"{OLD_JOB}の窓口で働いてるよ"),
    (date(2024, 5, 18), "最近仕事どう？", f"転職して今は{NEW_JOB}で働いてるよ！"),
]
SMALL_TALK = [
    ("今週末ひま？", "土曜ならあいてるよ"), ("映画いかない？", "いくいく！たのしみ"),
    ("昨日のラーメンうまかったね", "また行こ笑"), ("雨やばくない？", "やばい、傘忘れた笑"),
    ("夏休みどこか行く？", "海いきたいな〜"), ("おはよー", "おはよ〜ねむい笑"),
    ("駅前のカフェ行った？", "まだ！今度いこ"), ("今日寒いね", "ほんとそれ、マフラー出した"),
    ("なに食べたい？", "オムライス！"), ("おやすみ", "おやすみ〜また明日"),
    ("電車止まってるって", "えー最悪笑"), ("誕生日プレゼントなにがいい？", "なんでもうれしいよ〜"),
]
# Asked in new conversations by the same friend: the hometown in other words than when it was told; the job as when
# the new job was told, then as when the old one was.
HOMETOWN_QUESTIONS = ["そういえば出身どこだっけ？", "出身どこだっけ？"]
JOB_QUESTIONS = ["最近仕事どう？", "仕事なにしてるの？"]
MAX_NEW_TOKENS = 12


def line_export(path: Path) -> Path:
    """A LINE .txt export between 健太 and 美咲: the facts among two years of small talk, each day a conversation."""
    days = [(d, [(FRIEND, q), (PERSONA, a)]) for d, q, a in FACTS]
    for i in range(2 * len(SMALL_TALK)):
        q, a = SMALL_TALK[i % len(SMALL_TALK)]
        days.append((date(2023, 1, 5) + timedelta(days=29 * i + 3), [(FRIEND, q), (PERSONA, a)]))
    lines = [f"[LINE] {FRIEND}とのトーク履歴", "保存日時：2024/12/01 23:10", ""]
    for day, turns in sorted(days):
        lines.append(f"{day:%Y/%m/%d}({WEEKDAYS[day.weekday()]})")
        lines += [f"20:0{i}\t{speaker}\t{text}" for i, (speaker, text) in enumerate(turns)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def chat(dataset: Path, base: Path, system: str, questions: list[str]) -> list[tuple[list[str], str]]:
    """(the memory lines shown, the reply) for each question, each asked in a new conversation."""
    stdin = "".join(f"{q}\n/reset\n" for q in questions)
    proc = subprocess.run(
        [sys.executable, "-m", "finetune", "chat", str(dataset), "--system", system, "--base", str(base),
         "--name", FRIEND, "--temperature", "0", "--max-new-tokens", str(MAX_NEW_TOKENS), "--show-memory", "--echo"],
        cwd=REPO, input=stdin, capture_output=True, text=True, encoding="utf-8", timeout=900,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert proc.returncode == 0, proc.stderr
    answers, shown = [], []
    for line in proc.stdout.splitlines():
        if line.startswith("  (memory "):
            shown.append(line)  # a note's line; "  (memory: nothing recalled)" says there were none
        elif line.startswith(f"{PERSONA}: "):
            answers.append((shown, line.removeprefix(f"{PERSONA}: ")))
            shown = []
    assert len(answers) == len(questions), proc.stdout
    return answers


@pytest.fixture(scope="module")
def replies(gemma3_base, tmp_path_factory) -> dict[str, list[tuple[list[str], str]]]:
    folder = tmp_path_factory.mktemp("memory-real-base")
    dataset = folder / "dataset"
    done = run_cli("prepare", line_export(folder / "chat.txt"), "--persona", PERSONA, "--out", dataset,
                   "--timezone", "Asia/Tokyo")
    assert done.returncode == 0, done.stderr
    questions = [*HOMETOWN_QUESTIONS, *JOB_QUESTIONS]
    return {system: chat(dataset, gemma3_base, system, questions) for system in ("prompt-only", "base")}


def test_a_hometown_said_once_reaches_the_reply_through_the_memory(replies):
    for (shown, reply), question in zip(replies["prompt-only"][:2], HOMETOWN_QUESTIONS, strict=True):
        assert any(f"{PERSONA}: {HOMETOWN}だよ" in line for line in shown), (question, shown)  # recalled for it
        assert HOMETOWN in reply, (question, reply)
    for (shown, reply), question in zip(replies["base"][:2], HOMETOWN_QUESTIONS, strict=True):
        assert shown == [] and HOMETOWN not in reply, (question, reply)  # the model alone does not know it


def test_a_changed_job_comes_out_new(replies):
    # Asked as the new job was told: the new job is recalled and said; the old one (older, matching less) is not shown.
    shown, reply = replies["prompt-only"][len(HOMETOWN_QUESTIONS)]
    said = "\n".join(shown)
    assert NEW_JOB in said and OLD_JOB not in said, said
    assert NEW_JOB in reply and OLD_JOB not in reply, reply
    # Asked as the old job was told: that note matches best, and the new one, said later, is shown after it (a later
    # note is kept at a lower score: it may be what changed). The base model alone copies the note that matches the
    # question (the old job): what it answers here is the model's, not asserted.
    shown, _ = replies["prompt-only"][len(HOMETOWN_QUESTIONS) + 1]
    said = "\n".join(shown)
    assert OLD_JOB in said and NEW_JOB in said and said.index(OLD_JOB) < said.index(NEW_JOB), said
    for shown, reply in replies["base"][len(HOMETOWN_QUESTIONS):]:
        assert shown == [] and NEW_JOB not in reply and OLD_JOB not in reply, reply
