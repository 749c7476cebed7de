"""The recall index ranks exactly as a plain BM25 written the slow way: per text, per character, with dicts.

finetune/recall_index.py computes everything over numpy arrays (one code-point array, a table of character classes,
postings summed with np.add.at, a top-k that never sorts every document); this file holds the definition it must
keep: NFKC + casefold, bigrams of content characters, single kanji/katakana/Hangul/digits, Latin words, Okapi BM25
(k1 1.2, b 0.75, Lucene's idf), a query's 32 rarest terms, the latest turn plus half the two before it, the past
only under `before=`, the later note first on equal scores. Compared over a few thousand random Japanese and
English messages with many exact repeats (ties), two-character names, width and case variants, and long queries.
"""

from __future__ import annotations

import math
import random
import re
import unicodedata
from bisect import bisect_left
from collections import Counter
from datetime import datetime, timedelta, timezone
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.person_memory import DISTINCT_POOL, NOTE_FLOOR, MemoryEntry, PersonMemory
from finetune.prompt import ChatTurn
from finetune.recall_index import RELATIVE_FLOOR, RecallIndex, conversation_scores, relevant, top

K1, B, QUERY_TERMS = 1.2, 0.75, 32

# -- the reference: one text at a time -----------------------------------------------------------------------------


def _content(c: str) -> bool:
    o = ord(c)
    return not (o <= 0x2F or 0x3A <= o <= 0x40 or 0x5B <= o <= 0x60 or 0x7B <= o <= 0x7F or o in (0xA0, 0x3000)
                or 0x2000 <= o <= 0x200B)


def _alone(c: str) -> bool:
    o = ord(c)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x20000 <= o <= 0x2FFFF or 0x30A1 <= o <= 0x30FA
            or 0xAC00 <= o <= 0xD7A3 or 0x30 <= o <= 0x39)


_WORD = re.compile(r"[a-z0-9\u00e0-\u024f]{2,}")


def _word_key(word: str) -> int:
    h1 = sum(ord(c) * pow(131, i, 2_147_483_647) for i, c in enumerate(word)) % 2_147_483_647
    h2 = sum(ord(c) * pow(257, i, 2_147_483_629) for i, c in enumerate(word)) % 2_147_483_629
    return (1 << 62) | (h1 << 31) | h2


def reference_tokens(text: str) -> list[int]:
    """Every token of a text as its key (the index orders terms by key, so a query's rarest terms are cut alike)."""
    t = unicodedata.normalize("NFKC", text).casefold().replace("\0", " ")
    bigrams = [(ord(a) << 21) | ord(b) for a, b in pairwise(t) if _content(a) and _content(b)]
    singles = [ord(c) for c in t if _content(c) and _alone(c)]
    words = [_word_key(m.group()[:32]) for m in _WORD.finditer(t)]
    return bigrams + singles + words


class ReferenceBM25:
    def __init__(self, docs: list[str]):
        self.counts = [Counter(reference_tokens(d)) for d in docs]
        lengths = [sum(c.values()) for c in self.counts]
        self.n = len(docs)
        self.avg = max(sum(lengths) / self.n, 1e-9)
        self.lengths = lengths
        self.df = Counter(term for c in self.counts for term in c)
        self.postings: dict[int, list[tuple[int, int]]] = {}
        for doc, c in enumerate(self.counts):
            for term, tf in c.items():
                self.postings.setdefault(term, []).append((doc, tf))

    def weight(self, term: int, doc: int, tf: int) -> float:
        df = self.df[term]
        idf = math.log1p((self.n - df + 0.5) / (df + 0.5))
        norm = K1 * (1 - B + B * self.lengths[doc] / self.avg)
        return float(np.float32(idf * tf * (K1 + 1) / (tf + norm)))  # the index keeps its weights as float32

    def scores(self, query: str, limit: int | None = None) -> dict[int, float]:
        terms = sorted({t for t in reference_tokens(query) if t in self.df})
        terms = sorted(terms, key=lambda t: self.df[t])[:QUERY_TERMS]  # stable: equal counts keep key order
        out: dict[int, float] = {}
        for term in terms:
            for doc, tf in self.postings[term]:
                if limit is None or doc < limit:
                    out[doc] = out.get(doc, 0.0) + self.weight(term, doc, tf)
        return out

    def conversation(self, texts: list[str], limit: int | None = None) -> dict[int, float]:
        out = self.scores(texts[-1], limit)
        earlier = "\n".join(texts[-3:-1])
        if earlier.strip():
            for doc, score in self.scores(earlier, limit).items():
                out[doc] = out.get(doc, 0.0) + 0.5 * score
        return out


def reference_top(scores: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(((d, s) for d, s in scores.items() if s > 0), key=lambda p: (-p[1], -p[0]))[:k]


# -- the messages -------------------------------------------------------------------------------------------------

PLACES = ["新潟", "柏", "柏木", "船橋", "東京", "大阪", "札幌", "博多", "金沢", "神戸"]
NAMES = ["ゆうと", "さくら", "健太", "美咲", "Ken", "Mika", "小林", "佐藤", "ｶﾜｲ", "キム"]
THINGS = ["ラーメン", "カレー", "映画", "猫", "犬", "旅行", "コーヒー", "寿司", "ボルダリング", "バイト", "Switch",
          "iPhone", "ｺｰﾋｰ", "ＡＣＭＥ", "Acme", "café", "한국어", "𠮷野家", "か\u3099"]
WORDS = ["meeting", "deadline", "weekend", "coffee", "train", "party", "lunch", "project", "supercalifragilistic" * 2]
PATTERNS = [
    "{p}に行ってきた！{t}がよかった", "{n}と{t}の話してた", "明日{p}で{t}しよう", "今日の{t}まじで疲れたw",
    "{t}好きすぎる", "{n}さん、{p}のお土産ありがとう〜", "そういえば{t}どうなった？", "{p}駅に{h}時で",
    "え、{n}も{t}行くの？", "おやすみ〜", "それな", "わかる、{t}は{p}が一番", "{w} is at {h}", "I work at {t} now",
    "{t}と{t2}どっちがいい？", "昨日{p}で{n}に会ったよ😂", "{p}寒すぎ🥶", "{w}\0{w}", "{n}\ud83d{t}",
    "{p}　{t}　{h}時　{n}", "THE {W} WAS FINE",
]


def message(rng: random.Random) -> str:
    text = rng.choice(PATTERNS).format(
        n=rng.choice(NAMES), p=rng.choice(PLACES), t=rng.choice(THINGS), t2=rng.choice(THINGS),
        w=rng.choice(WORDS), W=rng.choice(WORDS).upper(), h=rng.randint(1, 23))
    return text + rng.choice(["", "！", "w", "…", "笑", "〜"])


def long_message(rng: random.Random) -> str:
    """More than 32 distinct terms: the query keeps its rarest ones."""
    return "、".join(message(rng) for _ in range(rng.randint(3, 6)))


def corpus(rng: random.Random, n: int) -> list[str]:
    docs: list[str] = []
    for _ in range(n):
        roll = rng.random()
        if docs and roll < 0.15:
            docs.append(rng.choice(docs))  # said again, word for word: equal scores, the later one must win
        elif roll < 0.2:
            docs.append(long_message(rng))
        else:
            docs.append(message(rng) + ("\n" + message(rng) if rng.random() < 0.5 else ""))
    return docs


def conversations(rng: random.Random, count: int) -> list[list[str]]:
    found = []
    for i in range(count):
        turns = [message(rng) for _ in range(rng.randint(1, 3))]
        if i % 5 == 0:
            turns[-1] = rng.choice(PLACES)  # a name alone, two characters or one
        elif i % 5 == 1:
            turns[-1] = long_message(rng)
        elif i % 5 == 2:
            turns[-1] = rng.choice(["where is ACME?", "Ｋｅｎ どこ", "ｶﾚｰ食べた", "ぬ", "", "!!!"])
        found.append(turns)
    return found


@pytest.fixture(scope="module")
def indexed():
    rng = random.Random(22)
    docs = corpus(rng, 3000)
    return docs, RecallIndex.build(docs), ReferenceBM25(docs), conversations(rng, 150)


def _assert_same(got: list[tuple[int, float]], want: list[tuple[int, float]], what: str) -> None:
    assert [d for d, _ in got] == [d for d, _ in want], what
    assert [s for _, s in got] == pytest.approx([s for _, s in want], rel=1e-9), what


def test_the_corpus_has_what_the_ranking_must_handle(indexed):
    docs, index, reference, talks = indexed
    assert len(set(docs)) < len(docs) - 300  # many exact repeats
    assert any(len(reference.scores(t[-1])) and len({x for x in reference_tokens(t[-1]) if x in reference.df}) > 32
               for t in talks)  # queries long enough to be cut to their rarest terms
    assert index.search("新潟", 1) and index.search("柏", 1)


def test_single_queries_rank_as_the_reference(indexed):
    docs, index, reference, talks = indexed
    rng = random.Random(5)
    for turns in talks:
        query = turns[-1]
        limit = rng.choice([None, rng.randrange(len(docs) + 1)])
        want = reference.scores(query, limit)
        for k in (1, 3, 10):
            _assert_same(index.search(query, k, limit=limit), reference_top(want, k), f"{query!r} k={k} limit={limit}")


def test_conversations_rank_as_the_reference(indexed):
    docs, index, reference, talks = indexed
    rng = random.Random(6)
    for turns in talks:
        limit = rng.choice([None, rng.randrange(len(docs) + 1)])
        got = conversation_scores(index, turns, limit=limit)
        want = reference.conversation(turns, limit)
        assert len(got) == (len(docs) if limit is None else limit)
        for k in (1, 3, 25):
            _assert_same(top(got, k), reference_top(want, k), f"{turns!r} k={k} limit={limit}")
        found = reference_top(want, 3)
        assert relevant(got, 3) == [d for d, s in found if s >= found[0][1] * RELATIVE_FLOOR]
        best_doc, best = found[0] if found else (0, 0.0)
        assert relevant(got, 3, 0.7) == [d for d, s in found if s >= best * 0.7 or (d > best_doc and s >= best * RELATIVE_FLOOR)]


def test_allowed_mask_keeps_only_those_documents(indexed):
    docs, index, reference, talks = indexed
    allowed = np.random.default_rng(1).random(len(docs)) < 0.3
    for turns in talks[:40]:
        want = {d: s for d, s in reference.scores(turns[-1]).items() if allowed[d]}
        _assert_same(index.search(turns[-1], 5, allowed=allowed), reference_top(want, 5), repr(turns[-1]))


def test_recall_before_a_time_is_the_reference_over_the_past(indexed):
    docs, index, reference, talks = indexed
    start = datetime(2022, 1, 1, tzinfo=timezone.utc)
    entries = [MemoryEntry(i, start + timedelta(hours=i), start + timedelta(hours=i), "test", (), text, "美咲")
               for i, text in enumerate(docs)]
    memory = PersonMemory(entries, index)
    rng = random.Random(7)
    for turns in talks:
        before = start + timedelta(hours=rng.randrange(len(docs)), minutes=30)
        limit = bisect_left([e.time for e in entries], before)
        # The best 12 within NOTE_FLOOR of the best (RELATIVE_FLOOR for those said after the best); of those, the
        # first 3 that say different things, each at its latest.
        found = reference_top(reference.conversation(turns, limit), 3 * DISTINCT_POOL)
        latest: dict[str, int] = {}
        best_doc, best = found[0] if found else (0, 0.0)
        for d, s in found:
            if s >= best * NOTE_FLOOR or (d > best_doc and s >= best * RELATIVE_FLOOR):
                text = " ".join(docs[d].split())
                if text in latest or len(latest) < 3:
                    latest[text] = max(latest.get(text, d), d)
        want = sorted(latest.values())
        got = memory.recall([ChatTurn("ゆうと", t) for t in turns], 3, before=before)
        assert [e.id for e in got] == want, turns
        assert all(e.time < before for e in got)


def test_a_loaded_index_scores_exactly_as_the_built_one(indexed, tmp_path):
    docs, index, _, talks = indexed
    with open(tmp_path / "i.npz", "wb") as f:
        index.save(f)
    loaded, _ = RecallIndex.load(tmp_path / "i.npz")
    for turns in talks[:30]:
        assert np.array_equal(conversation_scores(loaded, turns), conversation_scores(index, turns))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 3000), st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(1, 6), st.floats(0, 0.999),
       st.sampled_from([0.0, 2.0]))
def test_top_is_a_full_sort_cut_at_k_with_the_later_document_first_on_ties(size, seed, k, highest, zeros, min_score):
    # Few distinct values: ties everywhere, at the k-th place too; over 1,024 documents the block cut is taken.
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, highest + 1, size).astype(np.float64) * (rng.random(size) >= zeros)
    want = sorted(((d, s) for d, s in enumerate(scores.tolist()) if s > min_score), key=lambda p: (-p[1], -p[0]))[:k]
    assert top(scores, k, min_score) == want
