"""Fact probes (finetune/probes.py) and the synthetic persona that ships with them (finetune/synthetic_persona.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from finetune import synthetic_persona as synth
from finetune.probes import Probe, ProbeError, read_probes, score_reply, summarize
from finetune.prompt import ChatTurn

REPO = Path(__file__).resolve().parents[1]
JOB = Probe("job", (ChatTurn("ゆうと", "仕事なに？"),), right=("物流",), stale=("銀行",), wrong=("病院",))
BLOOD = Probe("blood", (ChatTurn("ゆうと", "血液型は？"),), right=(), wrong=("A型", "B型", "O型", "AB型"), never_stated=True)


@pytest.mark.parametrize(("probe", "reply", "outcome"), [
    (JOB, "物流の会社だよ〜", "right"),
    (JOB, "前は銀行だったけど今は物流！", "right"),  # the new value named: right, even beside the old
    (JOB, "銀行の窓口だよ", "stale"),
    (JOB, "病院で働いてる", "wrong"),
    (JOB, "えー、わかんない笑", "abstained"),
    (JOB, "ラーメン食べたい", "wrong"),  # answered, not with the fact
    (JOB, "ﾌﾞﾂﾘｭｳ", "wrong"),
    (BLOOD, "A型だよ", "wrong"),  # a value invented
    (BLOOD, "ＡＢ型！", "wrong"),  # full width folds
    (BLOOD, "ひみつ〜", "abstained"),
    (BLOOD, "なんで急に笑", "abstained"),  # named no value
])
def test_score_reply(probe, reply, outcome):
    assert score_reply(probe, reply) == outcome


def test_summary_rates():
    probes = [JOB, JOB, BLOOD, BLOOD]
    summary = summarize(probes, ["right", "stale", "wrong", "abstained"])
    assert summary["fact_accuracy"] == 0.5
    assert summary["stale_rate"] == 0.5
    assert summary["invented_rate"] == 0.5
    assert summary["counts"] == {"right": 1, "stale": 1, "wrong": 1, "abstained": 1}


def test_a_good_probes_file_reads(tmp_path):
    path = tmp_path / "probes.jsonl"
    path.write_text(
        '# comments and blank lines are fine\n\n'
        '{"id": "a", "turns": "猫の名前は？", "right": "こむぎ"}\n'
        '{"id": "b", "turns": [{"speaker": "ゆうと", "text": "血液型は？"}], "never_stated": true, "wrong": ["A型"]}\n',
        encoding="utf-8")
    a, b = read_probes(path)
    assert a.turns == (ChatTurn("友達", "猫の名前は？"),) and a.right == ("こむぎ",)
    assert b.never_stated and b.wrong == ("A型",)


@pytest.mark.parametrize(("line", "message"), [
    ("{", "not JSON"),
    ("[1]", "a probe is a JSON object"),
    ('{"turns": "x", "right": ["y"]}', "'id' must be a non-empty string"),
    ('{"id": "a", "right": ["y"]}', "'turns' must be the opener"),
    ('{"id": "a", "turns": [{"speaker": "", "text": "x"}], "right": ["y"]}', r"turns\[0\] needs"),
    ('{"id": "a", "turns": "x"}', "needs at least one accepted answer"),
    ('{"id": "a", "turns": "x", "right": [1]}', "'right' must be a list of non-empty strings"),
    ('{"id": "a", "turns": "x", "right": ["y"], "stale": ["Y"]}', "both a right answer and a stale/wrong one"),
    ('{"id": "a", "turns": "x", "never_stated": true, "right": ["y"]}', "a never-stated fact has no right answer"),
    ('{"id": "a", "turns": "x", "never_stated": "yes", "wrong": ["y"]}', "'never_stated' must be true or false"),
    ('{"id": "a", "turns": "x", "right": ["y"], "rigth": ["z"]}', "unknown key"),
    ("[" * 100_000, "not JSON"),
])
def test_a_malformed_probe_is_refused_at_its_line(tmp_path, line, message):
    path = tmp_path / "probes.jsonl"
    path.write_text('{"id": "ok", "turns": "x", "right": ["y"]}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ProbeError, match=rf"^{re.escape(str(path))}:2: .*{message}"):
        read_probes(path)


def test_repeated_ids_empty_files_and_bad_bytes_are_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "turns": "x", "right": ["y"]}\n{"id": "a", "turns": "x", "right": ["y"]}\n', encoding="utf-8")
    with pytest.raises(ProbeError, match=r":2: id 'a' is already used on line 1"):
        read_probes(path)
    path.write_text("\n# nothing\n", encoding="utf-8")
    with pytest.raises(ProbeError, match="no probes in the file"):
        read_probes(path)
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(ProbeError, match="not UTF-8"):
        read_probes(path)
    with pytest.raises(ProbeError, match="no such file"):
        read_probes(tmp_path / "missing.jsonl")


def _persona_lines(text: str) -> list[tuple[date, str]]:
    day = None
    said = []
    for line in text.splitlines():
        if m := re.match(r"(\d{4})/(\d{2})/(\d{2})\(", line):
            day = date(int(m[1]), int(m[2]), int(m[3]))
        elif line.count("\t") == 2 and line.split("\t")[1] == synth.PERSONA:
            said.append((day, line.split("\t")[2]))
    return said


def test_synthetic_persona_states_facts_sparsely_changes_some_and_never_states_others(tmp_path):
    out = tmp_path / "synth"
    done = subprocess.run([sys.executable, "-m", "finetune", "synth-persona", str(out)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = (out / "line_export.txt").read_text(encoding="utf-8")
    said = _persona_lines(text)
    assert len(said) > 500
    for fact in synth.FACTS:
        wordings = [w for _, ws in fact.values for w in ws]
        times = [d for d, s in said if s in wordings]
        assert 1 <= len(times) <= 4, fact.id  # sparse: a few times in two years
        for since, values in fact.values[1:]:
            assert any(d < since for d in times) and any(d >= since for d in times), fact.id  # old and new both said
            for d, s in said:
                if s in values:
                    assert d >= since  # the new value is never said before the change
    everything = "\n".join(s for _, s in said)
    for fact_id, _asks, invented in synth.NEVER_STATED:
        for value in invented:
            if len(value) > 1:  # one-character values (春, 赤) occur inside other words
                assert value not in everything, (fact_id, value)
    probes = read_probes(out / "probes.jsonl")
    assert len(probes) == 2 * (len(synth.FACTS) + len(synth.NEVER_STATED))
    chat_lines = {line.split("\t")[-1] for line in text.splitlines()}
    for probe in probes:
        assert probe.turns[-1].text.split("、", 1)[1] not in chat_lines  # asked in other words than the chats
    facts = json.loads((out / "facts.json").read_text(encoding="utf-8"))
    assert set(facts["stated"]) == {f.id for f in synth.FACTS}
    again = tmp_path / "again"
    subprocess.run([sys.executable, "-m", "finetune", "synth-persona", str(again)], cwd=REPO, check=True, capture_output=True)
    assert (again / "line_export.txt").read_bytes() == text.encode("utf-8")  # deterministic for a seed
