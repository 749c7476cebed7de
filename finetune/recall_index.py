"""BM25 over character n-grams, in numpy: the search behind the persona's memory and a chat's recall.

Why not SQLite FTS5 or a word tokenizer: Japanese has no spaces, and FTS5's trigram tokenizer finds nothing
for a two-character word (新潟, 柏木), which is what most names and places are. Character bigrams find them;
single kanji/katakana/digit characters are indexed too, so a one-character word (猫, 柏) still matches.
Runs of Latin letters and digits are also indexed as whole words, so English text is searched by word.
No dictionary, no model, nothing to download; the same text always gives the same tokens.

Why by hand and not `bm25s`: the index is built over 100,000 messages in about two seconds by
vectorising the n-gram extraction over one code-point array (a per-message Python tokenizer alone takes
seconds; NFKC, text by text, is a third of the build), a search must be restricted to the past of a training
sample (a prefix of the time-ordered documents) or to one chat (a mask), and the arrays save to a plain `.npz`
that loads without pickle.

Scoring is Okapi BM25 (k1 1.2, b 0.75; idf as Lucene's, always positive). A query keeps its
`MAX_QUERY_TERMS` rarest terms: a long conversation as a query would otherwise sum the postings of every
common bigram (って, ます) for no change in the ranking.

Where a search's time goes (bench/memory_recall.py, 100,000 notes): summing the postings of the query's terms,
some 250,000 of them for a conversation of three chat lines, with np.add.at into one float64 array (its fast
path: a third of `out[docs] += weights`, half of one np.bincount over the concatenated postings). The two
queries of a conversation are tokenized in one call and share that pass; `top` cuts the array down to the few
documents that can be among the k best before sorting anything. The weights are float32 values, and a sum of a
few dozen of them is exact in float64 unless the largest is millions of times the smallest: a score does not
depend on the order it was added up in (tests/test_recall_ranking.py holds it to a plain BM25), and equal texts tie.
"""

from __future__ import annotations

import unicodedata
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

K1 = 1.2
B = 0.75
MAX_QUERY_TERMS = 32
FORMAT_VERSION = 1

_CP_BITS = 21  # every Unicode code point fits in 21 bits
_WORD_TAG = np.int64(1) << 62  # word keys live above every n-gram key
_SEPARATOR = 0  # joins documents in the code-point array; never part of an n-gram
MAX_WORD = 32
_P1, _P2 = 2_147_483_647, 2_147_483_629  # primes below 2^31
_POW1 = np.array([pow(131, i, _P1) for i in range(MAX_WORD)], np.int64)
_POW2 = np.array([pow(257, i, _P2) for i in range(MAX_WORD)], np.int64)


def _normalise(text: str) -> str:
    # NFKC folds full-width Latin and half-width katakana onto the usual forms; casefold for English. Text by text:
    # `normalize` returns a text that passes its quick check as it is, and only the others take the slow path.
    return unicodedata.normalize("NFKC", text).casefold()


def _code_points(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """All documents as one uint32 array (documents separated by 0) and each position's document index."""
    joined = "\0".join(_normalise(t).replace("\0", " ") for t in texts)
    # surrogatepass: a lone surrogate (a JSON "\ud83d" cut from its pair) is a character like any other, not a crash
    cps = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)
    doc = np.cumsum(cps == _SEPARATOR) if len(cps) else np.zeros(0, np.int64)
    return cps, doc


# Character classes as inclusive code-point ranges, looked up in a table over every code point: one look-up per
# character instead of some 35 comparisons (the table is 1.1 MB, made once at import in about a millisecond).
_NOT_CONTENT = (  # never part of an n-gram: the separator, ASCII punctuation, whitespace. Other symbols (emoji, 〜, ！)
    # stay: a catchphrase's ending is part of what someone said.
    (0x00, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7F), (0xA0, 0xA0), (0x2000, 0x200B), (0x3000, 0x3000))
_UNIGRAMS = (  # characters that carry meaning alone: kanji, katakana, Hangul, digits. Hiragana alone (の, は) does not.
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2FFFF), (0x30A1, 0x30FA), (0xAC00, 0xD7A3), (0x30, 0x39))
_WORD_CHARS = ((0x61, 0x7A), (0x30, 0x39), (0xE0, 0x24F))  # what English (casefolded) words are made of
_CONTENT, _UNIGRAM, _WORD = 1, 2, 4


def _class_table() -> np.ndarray:
    table = np.full(0x110000, _CONTENT, np.uint8)
    for lo, hi in _NOT_CONTENT:
        table[lo : hi + 1] = 0
    for lo, hi in _UNIGRAMS:  # all content characters
        table[lo : hi + 1] |= _UNIGRAM
    for lo, hi in _WORD_CHARS:
        table[lo : hi + 1] |= _WORD
    return table


_CLASSES = _class_table()


def _word_keys(cps: np.ndarray, inside: np.ndarray, doc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(key, document) of every run of >= 2 Latin letters/digits (`inside`; its first `MAX_WORD` characters).

    The key is two polynomial hashes of the run (mod two primes) side by side, tagged: stable across
    processes and machines (Python's `hash` is not), computed for all runs at once."""
    if not inside.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    edges = np.diff(np.concatenate(([0], inside.astype(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    keep = ends - starts >= 2
    starts, ends = starts[keep], np.minimum(ends[keep], starts[keep] + MAX_WORD)
    if not len(starts):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lengths = ends - starts
    run_of = np.repeat(np.arange(len(starts)), lengths)
    offset = np.arange(len(run_of)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    chars = cps[starts[run_of] + offset]
    halves = []
    for prime, powers in ((_P1, _POW1), (_P2, _POW2)):
        # Each term is < 2^21 * 2^31 = 2^52 after the mod below, and a run sums at most 32 of them: exact in float64.
        terms = (chars * powers[offset]) % prime
        halves.append(np.bincount(run_of, weights=terms.astype(np.float64)).astype(np.int64) % prime)
    return (halves[0] << 31) | halves[1] | _WORD_TAG, doc[starts]


def text_keys(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(term key, document index) for every token of every text; documents are numbered from 0."""
    cps, doc = _code_points(texts)
    if not len(cps):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    classes = _CLASSES[cps]
    content = (classes & _CONTENT).astype(bool)
    pair = content[:-1] & content[1:]
    bigram_keys = (cps[:-1][pair] << _CP_BITS) | cps[1:][pair]
    bigram_docs = doc[:-1][pair]
    single = (classes & _UNIGRAM).astype(bool)
    word_keys, word_docs = _word_keys(cps, (classes & _WORD).astype(bool), doc)
    keys = np.concatenate((bigram_keys, cps[single], word_keys))
    docs = np.concatenate((bigram_docs, doc[single], word_docs))
    return keys, docs


@dataclass
class RecallIndex:
    """An immutable BM25 index over `doc_count` documents; search results are document numbers."""

    terms: np.ndarray  # sorted unique term keys (int64)
    indptr: np.ndarray  # postings of terms[i] are postings_doc[indptr[i]:indptr[i + 1]]
    postings_doc: np.ndarray  # int32 document numbers, ascending within a term
    postings_weight: np.ndarray  # float32 BM25 weight of the term in that document (idf included)
    doc_count: int

    @classmethod
    def build(cls, texts: Sequence[str]) -> RecallIndex:
        n = len(texts)
        keys, docs = text_keys(texts)
        if not len(keys):
            empty = np.zeros(0, np.int64)
            return cls(empty, np.zeros(1, np.int64), empty.astype(np.int32), empty.astype(np.float32), n)
        terms, term_of = np.unique(keys, return_inverse=True)
        lengths = np.bincount(docs, minlength=n).astype(np.float64)
        pair = term_of.astype(np.int64) * max(n, 1) + docs
        pair, tf = np.unique(pair, return_counts=True)  # sorted by term, then document
        p_term = pair // max(n, 1)
        p_doc = pair % max(n, 1)
        df = np.bincount(p_term, minlength=len(terms)).astype(np.float64)
        idf = np.log1p((n - df + 0.5) / (df + 0.5))
        avg = lengths.mean() if n else 1.0
        norm = K1 * (1 - B + B * lengths[p_doc] / max(avg, 1e-9))
        weight = idf[p_term] * tf * (K1 + 1) / (tf + norm)
        indptr = np.zeros(len(terms) + 1, np.int64)
        np.cumsum(df.astype(np.int64), out=indptr[1:])
        return cls(terms, indptr, p_doc.astype(np.int32), weight.astype(np.float32), n)

    def scores(self, query: str, *, limit: int | None = None, allowed: np.ndarray | None = None) -> np.ndarray:
        """BM25 score of every document (0 where nothing matches). `limit`: only documents 0..limit-1
        count (the index is in time order, so that is "only the past"); `allowed`: a boolean mask."""
        return self.weighted_scores([(query, 1.0)], limit=limit, allowed=allowed)

    def weighted_scores(self, queries: Sequence[tuple[str, float]], *, limit: int | None = None,
                        allowed: np.ndarray | None = None) -> np.ndarray:
        """The sum of weight x `scores(query)` over (query, weight) pairs, in one pass over the postings.

        Each query keeps its own `MAX_QUERY_TERMS` rarest terms, as `scores` does; a term two queries share is
        summed once, with their weights added."""
        n = self.doc_count if limit is None else max(0, min(limit, self.doc_count))
        if not n or not len(self.terms) or not queries:
            return np.zeros(n, np.float64)
        keys, which = text_keys([query for query, _ in queries])
        picked = [self._query_terms(keys[which == i]) for i in range(len(queries))]
        terms = np.concatenate(picked)
        if not len(terms):
            return np.zeros(n, np.float64)
        term_weight = np.concatenate([np.full(len(p), float(w)) for p, (_, w) in zip(picked, queries, strict=True)])
        terms, shared = np.unique(terms, return_inverse=True)
        term_weight = np.bincount(shared, weights=term_weight)
        out = np.zeros(n, np.float64)
        for lo, hi, weight in zip(self.indptr[terms].tolist(), self.indptr[terms + 1].tolist(), term_weight.tolist(), strict=True):
            if n < self.doc_count:  # postings are ascending within a term: the past is a prefix of each
                hi = lo + int(np.searchsorted(self.postings_doc[lo:hi], n))
            weights = self.postings_weight[lo:hi].astype(np.float64)  # np.add.at's fast path: the scores' own dtype
            if weight != 1.0:
                weights *= weight
            np.add.at(out, self.postings_doc[lo:hi], weights)
        if allowed is not None:
            out[~allowed[:n]] = 0.0
        return out

    def _query_terms(self, keys: np.ndarray) -> np.ndarray:
        """The index's term numbers for a query's token keys: each once, the `MAX_QUERY_TERMS` rarest
        (fewest postings; on equal counts, the lower term number) where there are more."""
        keys = np.unique(keys)
        at = np.searchsorted(self.terms, keys)
        known = at < len(self.terms)
        at = at[known]
        at = at[self.terms[at] == keys[known]]
        if len(at) > MAX_QUERY_TERMS:
            df = self.indptr[at + 1] - self.indptr[at]
            at = at[np.argsort(df, kind="stable")[:MAX_QUERY_TERMS]]
        return at

    def search(self, query: str, k: int, *, limit: int | None = None, allowed: np.ndarray | None = None,
               min_score: float = 0.0) -> list[tuple[int, float]]:
        """The `k` best (document, score) pairs with a score above `min_score`, best first; ties go to the
        later document (the index is in time order: what was said last wins)."""
        return top(self.scores(query, limit=limit, allowed=allowed), k, min_score)

    def save(self, file: BinaryIO, **meta: str) -> None:
        """Plain arrays in an .npz (no pickle); `meta` strings (e.g. the source file's hash) ride along."""
        np.savez(
            file, version=np.array(FORMAT_VERSION), terms=self.terms, indptr=self.indptr,
            postings_doc=self.postings_doc, postings_weight=self.postings_weight,
            doc_count=np.array(self.doc_count, np.int64),
            **{f"meta_{k}": np.array(v) for k, v in meta.items()},
        )

    @classmethod
    def load(cls, path: Path) -> tuple[RecallIndex, dict[str, str]]:
        """The index and its meta strings. ValueError (with what is wrong) for anything but this format."""
        try:
            with np.load(path, allow_pickle=False) as data:
                if "version" not in data.files or int(data["version"]) != FORMAT_VERSION:
                    raise ValueError("not a bunshin recall index of this version")
                index = cls(
                    terms=data["terms"].astype(np.int64, copy=False), indptr=data["indptr"].astype(np.int64, copy=False),
                    postings_doc=data["postings_doc"].astype(np.int32, copy=False),
                    postings_weight=data["postings_weight"].astype(np.float32, copy=False),
                    doc_count=int(data["doc_count"]),
                )
                meta = {name[5:]: str(data[name]) for name in data.files if name.startswith("meta_")}
        except (OSError, KeyError, EOFError, ValueError, TypeError, zipfile.BadZipFile) as exc:
            reason = str(exc) if isinstance(exc, ValueError) and "bunshin" in str(exc) else type(exc).__name__
            raise ValueError(f"unreadable ({reason})") from None
        index._check()
        return index, meta

    def _check(self) -> None:
        """Shapes that a search relies on; a truncated or edited file fails here, not in a search."""
        ok = (
            self.terms.ndim == 1 and self.indptr.shape == (len(self.terms) + 1,) and int(self.indptr[0]) == 0
            and int(self.indptr[-1]) == len(self.postings_doc) == len(self.postings_weight)
            and bool(np.all(np.diff(self.indptr) >= 0)) and self.doc_count >= 0
            and (not len(self.postings_doc) or (int(self.postings_doc.min()) >= 0 and int(self.postings_doc.max()) < self.doc_count))
        )
        if not ok:
            raise ValueError("unreadable (inconsistent arrays)")


TOP_BLOCK = 256  # documents per block in `top`'s first cut


def top(scores: np.ndarray, k: int, min_score: float = 0.0) -> list[tuple[int, float]]:
    """The `k` best (document, score) pairs of a scores array (RecallIndex.scores) with a score above `min_score`,
    best first; of equal scores the later document wins, at the k-th place too."""
    if not len(scores) or k <= 0:
        return []
    candidates = _at_least_kth_best(scores, k, min_score)
    chosen = scores[candidates]
    if len(candidates) > k:
        kth = np.partition(chosen, len(chosen) - k)[len(chosen) - k]
        above = np.flatnonzero(chosen > kth)  # fewer than k
        tied = np.flatnonzero(chosen == kth)  # ascending: the latest documents are last
        keep = np.concatenate((above, tied[len(tied) - (k - len(above)) :]))
        candidates, chosen = candidates[keep], chosen[keep]
    order = np.lexsort((-candidates, -chosen))
    return [(int(candidates[i]), float(chosen[i])) for i in order]


def _at_least_kth_best(scores: np.ndarray, k: int, min_score: float) -> np.ndarray:
    """Ascending document numbers that include every document among the k best (and above `min_score`), without
    sorting all of them: the k-th best of the blocks' maxima is at most the k-th best score (k blocks each hold a
    score that high), so only the few documents scoring at least that are kept."""
    blocks = len(scores) // TOP_BLOCK
    if blocks >= max(k, 4):
        block_best = scores[: blocks * TOP_BLOCK].reshape(blocks, TOP_BLOCK).max(axis=1)
        floor = np.partition(block_best, blocks - k)[blocks - k]
        if floor > min_score:
            return np.flatnonzero(scores >= floor)
    return np.flatnonzero(scores > min_score)


# Searching with a conversation: the latest turn is what a reply answers, the two before it say what the talk
# is about; a note scoring under RELATIVE_FLOOR of the best one shares no more than a question word (だっけ,
# どこ) with the conversation and is noise, not memory.
QUERY_TURNS = 3
EARLIER_WEIGHT = 0.5
RELATIVE_FLOOR = 0.3


def conversation_scores(index: RecallIndex, texts: Sequence[str], *, limit: int | None = None) -> np.ndarray:
    """Every document's score for a conversation (its turns' texts, oldest first): the latest turn's scores plus
    `EARLIER_WEIGHT` times those of the turns before it."""
    if not texts:
        return np.zeros(0)
    earlier = "\n".join(texts[-QUERY_TURNS:-1])
    queries = [(texts[-1], 1.0), (earlier, EARLIER_WEIGHT)] if earlier.strip() else [(texts[-1], 1.0)]
    return index.weighted_scores(queries, limit=limit)


def relevant(scores: np.ndarray, k: int, floor: float = RELATIVE_FLOOR) -> list[int]:
    """The documents of the `k` best scores that score at least `floor` times the best one, best first. A document
    after the best one (said later: documents are in time order) needs only RELATIVE_FLOOR: it may be what changed
    since, in other words ("仕事どう？" -> "転職して物流の会社にいる！" after "仕事なにしてるの？" -> "銀行の窓口だよ"
    matched the question best)."""
    found = top(scores, k)
    if not found:
        return []
    best_doc, best = found[0]
    return [doc for doc, score in found if score >= best * floor or (doc > best_doc and score >= best * RELATIVE_FLOOR)]

