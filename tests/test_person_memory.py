"""The persona's memory: the n-gram BM25 index, the notes prepare writes, and how they are refused when wrong."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from finetune.person_memory import (
    INDEX_FILE,
    MEMORY_FILE,
    MemoryEntry,
    PersonMemory,
    PersonMemoryError,
    rebuild_index,
    write_memory,
)
from finetune.prompt import ChatTurn, render_prompt
from finetune.recall_index import FORMAT_VERSION, RecallIndex

REPO = Path(__file__).resolve().parents[1]


def _top(index: RecallIndex, docs: list[str], query: str, k: int = 1, **kw) -> list[str]:
    return [docs[d] for d, _ in index.search(query, k, **kw)]


def test_two_character_names_and_places_are_found():
    # SQLite FTS5's trigram tokenizer finds nothing for these; character bigrams must.
    docs = ["新潟出身だよ", "柏木さんと会った", "今日は雨", "ラーメン食べたい", "東京に行く"]
    index = RecallIndex.build(docs)
    assert _top(index, docs, "新潟") == ["新潟出身だよ"]
    assert _top(index, docs, "柏木って誰？") == ["柏木さんと会った"]


def test_one_character_words_and_english_words_are_found():
    docs = ["猫がかわいい", "柏に住んでる", "I work at Acme now", "working from home", "ねむい"]
    index = RecallIndex.build(docs)
    assert _top(index, docs, "猫") == ["猫がかわいい"]
    assert _top(index, docs, "柏") == ["柏に住んでる"]
    assert _top(index, docs, "where is ACME?") == ["I work at Acme now"]
    assert _top(index, docs, "home") == ["working from home"]
    assert index.search("ぬ", 3) == []  # nothing shares a token: nothing comes back, not a random note


def test_width_and_case_are_folded():
    docs = ["ｶﾀｶﾅで書いた", "ＡＢＣマート行った", "その他"]
    index = RecallIndex.build(docs)
    assert _top(index, docs, "カタカナ") == ["ｶﾀｶﾅで書いた"]
    assert _top(index, docs, "abcマート") == ["ＡＢＣマート行った"]


def test_limit_searches_only_the_past_and_ties_go_to_the_later_note():
    docs = ["銀行で働いてる", "銀行で働いてる", "物流の会社にいる"]
    index = RecallIndex.build(docs)
    hits = index.search("銀行", 5)
    assert [d for d, _ in hits] == [1, 0]  # the same text twice: the later one first
    assert [d for d, _ in index.search("銀行", 5, limit=1)] == [0]
    assert index.search("物流", 5, limit=2) == []  # said after the cut: invisible
    mask = np.array([True, False, True])
    assert [d for d, _ in index.search("銀行", 5, allowed=mask)] == [0]


def test_index_round_trips_and_refuses_damage():
    docs = ["新潟出身だよ", "猫の名前はこむぎ"]
    index = RecallIndex.build(docs)
    buf = io.BytesIO()
    index.save(buf, source_sha256="abc")
    loaded, meta = RecallIndex.load(io.BytesIO(buf.getvalue()))
    assert meta == {"source_sha256": "abc"}
    assert loaded.search("こむぎ", 1) == index.search("こむぎ", 1)
    for damaged in (buf.getvalue()[: len(buf.getvalue()) // 2], b"not an npz", b""):
        with pytest.raises(ValueError, match="unreadable"):
            RecallIndex.load(io.BytesIO(damaged))


def test_index_with_inconsistent_arrays_is_refused(tmp_path):
    index = RecallIndex.build(["新潟出身だよ", "猫"])
    index.postings_doc = index.postings_doc + 5  # points past the last note
    path = tmp_path / "x.npz"
    with open(path, "wb") as f:
        index.save(f)
    with pytest.raises(ValueError, match="inconsistent"):
        RecallIndex.load(path)


def test_a_lone_surrogate_is_indexed_and_searched():
    # A JSON "\ud83d" cut from its pair decodes to a lone surrogate; it must not make the index or a search crash.
    docs = ["絵文字が\ud83d切れた", "新潟だよ"]
    index = RecallIndex.build(docs)
    assert _top(index, docs, "\ud83d切れ") == ["絵文字が\ud83d切れた"]


def test_an_index_of_another_format_version_is_refused_with_the_rebuild_command(tmp_path):
    when = datetime(2024, 1, 1, tzinfo=timezone.utc)
    write_memory(tmp_path, [MemoryEntry(0, when, when, "line", (ChatTurn("ゆうと", "出身どこ？"),), "新潟だよ", "彩花")])
    index = tmp_path / INDEX_FILE
    with np.load(index) as data:
        arrays = {name: data[name] for name in data.files}
    rebuild = re.escape(f"rebuild it with `python -m finetune memory rebuild {tmp_path}`")
    for version in (FORMAT_VERSION - 1, FORMAT_VERSION + 1, None):
        with open(index, "wb") as f:
            np.savez(f, **{k: v for k, v in arrays.items() if k != "version"},
                     **({"version": np.array(version)} if version is not None else {}))
        with pytest.raises(PersonMemoryError, match=rf"{INDEX_FILE}: unreadable \(not a bunshin recall index of this version\); {rebuild}"):
            PersonMemory.load(tmp_path)
    # the command the message names makes it usable again
    subprocess.run([sys.executable, "-m", "finetune", "memory", "rebuild", str(tmp_path)], check=True, capture_output=True, cwd=REPO)
    assert [e.text for e in PersonMemory.load(tmp_path).recall([ChatTurn("x", "新潟？")], 1)] == ["新潟だよ"]


def _prepare(tmp_path: Path, export: Path, persona: str, *extra: str) -> Path:
    out = tmp_path / "dataset"
    subprocess.run(
        [sys.executable, "-m", "finetune", "prepare", str(export), "--persona", persona, "--out", str(out),
         "--timezone", "Asia/Tokyo", *extra],
        check=True, capture_output=True, text=True, cwd=REPO,
    )
    return out


FACT_CHAT = """[LINE] みんなのトーク履歴
保存日時：2024/06/02 23:10

2023/01/10(火)
10:00\tゆうと\t出身どこだっけ？
10:01\t彩花\t新潟だよ〜 電話は090-1234-5678
10:02\tけん\t秘密の話: 柏木さんの住所しってる
10:03\t彩花\tへー
2023/05/10(水)
10:00\tゆうと\t仕事なにしてるの？
10:01\t彩花\t銀行の窓口だよ
2024/05/10(金)
10:00\tゆうと\t仕事どう？
10:01\t彩花\t転職して物流の会社にいる！
2024/05/20(月)
10:00\tゆうと\tひま？
10:01\t彩花\tひま〜
"""


def test_prepare_writes_the_personas_notes_redacted_and_without_excluded_speakers(tmp_path):
    export = tmp_path / "chat.txt"
    export.write_text(FACT_CHAT, encoding="utf-8")
    out = _prepare(tmp_path, export, "彩花", "--exclude-speaker", "けん")
    rows = [json.loads(line) for line in (out / MEMORY_FILE).read_text(encoding="utf-8").splitlines()]
    # with けん's line gone, her two messages are one burst, as in the training samples
    assert [r["text"] for r in rows] == ["新潟だよ〜 電話は<PHONE>\nへー", "銀行の窓口だよ", "転職して物流の会社にいる！", "ひま〜"]
    assert rows[0]["answered"] == [{"speaker": "ゆうと", "text": "出身どこだっけ？"}]
    assert all("けん" not in json.dumps(r, ensure_ascii=False) and "柏木" not in r["text"] for r in rows)
    assert json.loads((out / "stats.json").read_text())["memory"]["notes"] == 4
    # every training sample says when its conversation began: its memory may only be older than that
    sample = json.loads((out / "train.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    assert sample["conversation_start"] <= sample["time"]

    memory = PersonMemory.load(out)
    ask = [ChatTurn("ゆうと", "そういえば仕事なにしてるんだっけ？")]
    assert [e.text for e in memory.recall(ask, 2)] == ["銀行の窓口だよ", "転職して物流の会社にいる！"]  # oldest first
    before_change = datetime(2024, 5, 10, tzinfo=timezone.utc)
    assert [e.text for e in memory.recall(ask, 2, before=before_change)] == ["銀行の窓口だよ"]
    assert memory.recall([ChatTurn("ゆうと", "新潟？")], 3, before=datetime(2023, 1, 1, tzinfo=timezone.utc)) == []

    prompt = render_prompt(ask, "彩花", memory=[e.note() for e in memory.recall(ask, 2)])
    assert prompt.index("銀行") < prompt.index("物流") < prompt.rindex("彩花: ")  # the later fact is read last
    assert "2024-05-10: ゆうと「仕事どう？」 → 彩花「転職して物流の会社にいる！」" in prompt



HOBBY_CHAT = """[LINE] みんなのトーク履歴
保存日時：2024/06/02 23:10

2023/01/10(火)
10:00\tゆうと\t週末なにしてた？
10:01\t彩花\tボルダリング行ってた！腕パンパン
2023/03/10(金)
10:00\tゆうと\t週末なにしてた？
10:01\t彩花\t家でゴロゴロしてた
2023/06/10(土)
10:00\tゆうと\t最近どう？
10:01\t彩花\tまたボルダリング行ってきた〜
"""


def test_training_notes_recalled_with_the_reply_hold_what_it_drew_on_and_never_its_own_conversation(tmp_path):
    """train --memory-from-reply: the reply to learn joins the query, so the note it drew on is the one recalled
    ("最近どう？" alone finds nothing about climbing); the cut-off is the same, nothing from the sample's own
    conversation or later, so the reply itself is never a note."""
    from finetune.person_memory import sample_notes

    export = tmp_path / "chat.txt"
    export.write_text(HOBBY_CHAT, encoding="utf-8")
    out = _prepare(tmp_path, export, "彩花")
    memory = PersonMemory.load(out)
    samples = [json.loads(line) for name in ("train.jsonl", "eval.jsonl")
               for line in (out / name).read_text(encoding="utf-8").splitlines()]
    [again] = [s for s in samples if s["target"].startswith("また")]

    def said(notes):
        return [t.text for note in notes for t in note.turns if t.speaker == "彩花"]

    assert said(sample_notes(memory, again, 1, with_reply=True)) == ["ボルダリング行ってた！腕パンパン"]
    assert "ボルダリング行ってた！腕パンパン" not in said(sample_notes(memory, again, 1))
    for sample in samples:
        for with_reply in (False, True):
            for note in sample_notes(memory, sample, 4, with_reply=with_reply):
                assert note.date < sample["conversation_start"][:10]  # only the past, the reply never among them
    [first] = [s for s in samples if s["target"].startswith("ボルダリング")]
    assert sample_notes(memory, first, 3, with_reply=True) == []  # nothing was said before its conversation

def test_a_missing_corrupt_or_foreign_index_is_refused_with_the_rebuild_command(tmp_path):
    export = tmp_path / "chat.txt"
    export.write_text(FACT_CHAT, encoding="utf-8")
    out = _prepare(tmp_path, export, "彩花")
    index = out / INDEX_FILE
    good = index.read_bytes()

    index.unlink()
    with pytest.raises(PersonMemoryError, match=rf"{INDEX_FILE}: the memory index is missing; rebuild it with `python -m finetune memory rebuild"):
        PersonMemory.load(out)

    index.write_bytes(good[:100])
    with pytest.raises(PersonMemoryError, match="unreadable.*rebuild it with"):
        PersonMemory.load(out)

    index.write_bytes(good)
    notes = out / MEMORY_FILE
    notes.write_text(notes.read_text(encoding="utf-8").replace("銀行", "病院"), encoding="utf-8")  # another dataset's notes
    with pytest.raises(PersonMemoryError, match="built from another memory.jsonl"):
        PersonMemory.load(out)
    assert rebuild_index(out) == 5
    assert [e.text for e in PersonMemory.load(out).recall([ChatTurn("x", "病院")], 1)] == ["病院の窓口だよ"]

    notes.write_text('{"text": "x"}\n', encoding="utf-8")
    with pytest.raises(PersonMemoryError, match=rf"{MEMORY_FILE}:1: not a memory note"):
        PersonMemory.load(out)
    notes.unlink()
    with pytest.raises(PersonMemoryError, match="no memory file"):
        PersonMemory.load(out)


REPEAT_CHAT = """[LINE] みんなのトーク履歴
保存日時：2024/06/02 23:10

2023/01/10(火)
10:00\tゆうと\t出身どこだっけ？
10:01\t彩花\t新潟だよ〜
2023/03/10(金)
10:00\tけん\t出身って新潟だよね？
10:01\t彩花\t新潟だよ〜
2023/08/10(木)
10:00\tゆうと\t出身どこだっけ？
10:01\t彩花\t新潟だよ〜
2024/02/10(土)
10:00\tゆうと\t出身どこだっけ？実家の方？
10:01\t彩花\t実家は長岡！
"""


def test_recall_gives_k_notes_that_say_different_things_each_repeat_at_its_latest(tmp_path):
    """The same words said three times take one place, not three (as the bot keeps one of two notes alike), so
    the other place goes to something else said about it; the one kept is the latest of the three."""
    export = tmp_path / "chat.txt"
    export.write_text(REPEAT_CHAT, encoding="utf-8")
    memory = PersonMemory.load(_prepare(tmp_path, export, "彩花"))
    found = memory.recall([ChatTurn("ゆうと", "出身どこだっけ？")], 2)
    assert [e.text for e in found] == ["新潟だよ〜", "実家は長岡！"]
    assert found[0].time == datetime(2023, 8, 10, 1, 1, tzinfo=timezone.utc)  # 10:01 in Tokyo


def test_a_reply_draws_on_a_note_when_its_own_words_are_there_and_a_stock_phrase_never_does():
    """train --memory-drill's choice: the reply's lines that are no stock phrase share DRAWN_SHARE of their
    character pairs with one of the persona's lines in the notes; the question's words in a note do not count."""
    from collections import Counter

    from finetune.person_memory import drawn_on_notes
    from finetune.prompt import MemoryNote

    climbing = MemoryNote("2023-01-10", (ChatTurn("ゆうと", "週末なにしてた？"), ChatTurn("彩花", "ボルダリング行ってた！腕パンパン")))
    asked = MemoryNote("2023-01-10", (ChatTurn("ゆうと", "家でゴロゴロしてた"), ChatTurn("彩花", "へー")))
    laugh = MemoryNote("2023-01-11", (ChatTurn("ゆうと", "見て"), ChatTurn("彩花", "笑った笑")))
    said = Counter({"笑った笑": 5, "またボルダリング行ってきた〜": 1})

    def drawn(target, *notes, times=said):
        return drawn_on_notes({"persona": "彩花", "target": target}, notes, times)

    assert drawn("またボルダリング行ってきた〜", laugh, climbing)  # 8 of its 13 pairs are in the note
    assert not drawn("またボルダリング行ってきた〜", laugh)
    assert not drawn("家でゴロゴロしてた", asked)  # only a friend said it
    assert not drawn("笑った笑", laugh)  # said 5 times: a stock phrase
    assert drawn("笑った笑", laugh, times=Counter({"笑った笑": 2}))  # said twice: not yet one
    assert drawn("笑った笑\nまたボルダリング行ってきた〜", laugh, climbing)  # its stock line left out, the rest drawn
    assert not drawn("笑った笑\nへー", laugh, asked)  # what is left has under 3 pairs
    # The share: 3 of 10 pairs (30%) draw on it, 3 of 11 (27%) do not.
    assert drawn("ボルダリあいうえおかき", climbing) and not drawn("ボルダリあいうえおかきく", climbing)


def test_memory_drill_repeats_exactly_the_replies_drawn_from_their_notes(tmp_path):
    """train --memory-drill N: the samples drill_samples picks are encoded N times, the rest once; the manifest's
    train_samples stays the count of distinct samples."""
    from types import SimpleNamespace

    from finetune.model_loading import load_tokenizer
    from finetune.person_memory import sample_notes
    from finetune.prompt import as_turns, encode_sample
    from finetune.tiny_model import build_tiny_model
    from finetune.train import drill_samples, memory_recall, pack

    export = tmp_path / "chat.txt"
    export.write_text(HOBBY_CHAT, encoding="utf-8")
    out = _prepare(tmp_path, export, "彩花")
    memory = PersonMemory.load(out)
    samples = [json.loads(line) for name in ("train.jsonl", "eval.jsonl")
               for line in (out / name).read_text(encoding="utf-8").splitlines()]
    recall = memory_recall(memory, 3, with_reply=True)
    assert [s["target"] for s in drill_samples(samples, memory, recall)] == ["またボルダリング行ってきた〜"]
    assert drill_samples(samples, memory, memory_recall(memory, 3)) == []  # the conversation alone recalls nothing

    tiny = build_tiny_model(tmp_path / "tiny", HOBBY_CHAT.splitlines() * 20)
    setup = SimpleNamespace(loaded=SimpleNamespace(tokenizer=load_tokenizer(str(tiny))), max_length=256,
                            pack_length=256)
    plan = SimpleNamespace(train_samples=samples, eval_samples=[], memory=memory)
    packed = {}
    for drill in (1, 4):
        args = SimpleNamespace(template="transcript", memory_notes=3, memory_from_reply=True, memory_drill=drill)
        packed[drill] = pack(args, plan, setup)
    once, drilled = packed[1], packed[4]
    assert (once.train_samples, once.drilled) == (drilled.train_samples, 0) == (len(samples), 0)
    assert drilled.drilled == 1
    [again] = [s for s in samples if s["target"].startswith("また")]
    ids, _ = encode_sample(setup.loaded.tokenizer, as_turns(again["context"]), "彩花", again["target"], "transcript",
                           256, memory=sample_notes(memory, again, 3, with_reply=True))
    assert drilled.useful_tokens - once.useful_tokens == 3 * len(ids)


def _memory(notes: list[tuple[str, str]]) -> PersonMemory:
    """A memory of (question asked, persona's answer) notes, a day apart, in the order given."""
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    entries = []
    for i, (asked, said) in enumerate(notes):
        when = start.replace(day=1 + i)
        answered = (ChatTurn("ゆうと", asked),) if asked else ()
        entries.append(MemoryEntry(i, when, when, "line", answered, said, "彩花"))
    return PersonMemory(entries, RecallIndex.build([e.search_text() for e in entries]))


def test_the_same_question_answered_twice_gives_only_the_later_answer():
    memory = _memory([("スマホなに使ってる？", "iPhoneだよ〜"), ("猫の名前なに？", "こむぎだよ"),
                      ("スマホなに使ってる?", "Pixelに変えた！カメラいい")])  # half-width "?" the second time
    got = memory.recall([ChatTurn("さくら", "ねえ、スマホなに使ってる？")], 3)
    assert [e.text for e in got] == ["Pixelに変えた！カメラいい"]  # the old value is not shown beside it
    # not a question: two answers to "おっけー" are two different things said, both kept, oldest first
    memory = _memory([("おっけー", "スマホ買い替えたい"), ("おっけー", "スマホ割れた笑")])
    assert [e.text for e in memory.recall([ChatTurn("さくら", "スマホどう？")], 3)] == ["スマホ買い替えたい", "スマホ割れた笑"]


def test_an_answer_said_again_to_another_question_is_one_note_at_its_latest_time():
    memory = _memory([("猫の名前なに？", "こむぎだよ"), ("誰の写真？", "こむぎだよ"), ("今日なにしてた？", "ねてた")])
    got = memory.recall([ChatTurn("さくら", "こむぎ元気？")], 3)
    assert [(e.id, e.text) for e in got] == [(1, "こむぎだよ")]
