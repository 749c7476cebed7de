"""The scores of `finetune eval`: how each system's replies compare with the persona's real ones.

Three questions, kept apart because one number would hide the answer to the others:
- style: does it sound like the person? The ten features of finetune/style.py, each a distance
  in [0, 1] to the real replies, and `style_distance`, their mean;
- content: does it say what the person said? chrF (sacrebleu's, character n-grams: Japanese has
  no spaces to split words on) of each reply against the real one, per sample and over the corpus;
  with the stock phrases, the replies a system falls back on whatever was said;
- privacy: does it recite training text? finetune/verbatim.py, with the real replies as baseline.

Pure Python on strings: no model, no tokenizer, so the same replies always get the same scores
and replies made by any tool (`--system NAME=FILE`) are scored the same way.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence

from sacrebleu.metrics import CHRF

from .style import (
    FEATURES,
    distinct_n,
    feature_distances,
    normalize_reply,
    reply_chars,
    reply_lines,
    style_distance,
    style_profile,
)
from .verbatim import TrainIndex

STOCK_PHRASES = 5
VERBATIM_EXAMPLES = 10
_DIGITS = 4  # report.json is read by people; four places tell every difference that matters apart


def _rounded(value):
    if isinstance(value, float):
        return round(value, _DIGITS)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def reply_summary(replies: Sequence[str]) -> dict:
    texts = [normalize_reply(r) for r in replies]
    chars = [reply_chars(t) for t in texts]
    n = len(texts) or 1
    return {
        "mean_chars": sum(chars) / n,
        "median_chars": statistics.median(chars) if chars else 0,
        "mean_messages": sum(len(reply_lines(t)) for t in texts) / n,
        "distinct_2": distinct_n(texts, 2),
        "empty_rate": sum(not t for t in texts) / n,
    }


def stock_phrases(replies: Sequence[str]) -> tuple[list[dict], float]:
    """The replies said again and again (at most 5 that occur twice or more), and the share of replies that are one.

    An empty reply is no phrase (summary.empty_rate counts those).
    """
    texts = [normalize_reply(r) for r in replies]
    counts = Counter(t for t in texts if t)
    phrases = [(reply, count) for reply, count in counts.most_common(STOCK_PHRASES) if count >= 2]
    stock = {reply for reply, _ in phrases}
    rate = sum(t in stock for t in texts) / len(texts) if texts else 0.0
    return [{"reply": reply, "count": count} for reply, count in phrases], rate


def verbatim_repeats(replies: Sequence[str], ids: Sequence[str], index: TrainIndex | None, min_chars: int) -> dict:
    """Replies that share `min_chars`+ characters with a training text (`index` None: there is none to repeat)."""
    count = 0
    examples = []
    for sample_id, reply in zip(ids, replies, strict=True):
        match = index.find(reply, min_chars) if index is not None else None
        if match is None:
            continue
        count += 1
        if len(examples) < VERBATIM_EXAMPLES:
            examples.append({"id": sample_id, "reply": reply, "match": match.text, "speaker": match.speaker})
    return {"rate": count / len(replies) if replies else 0.0, "count": count, "examples": examples}


def chrf_scores(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, float]:
    """(mean sentence chrF, corpus chrF), 0-100, sacrebleu's defaults. An empty reply scores 0."""
    metric = CHRF()
    hyps = [normalize_reply(h) for h in hypotheses]
    refs = [normalize_reply(r) for r in references]
    sentence = [metric.sentence_score(h, [r]).score if h else 0.0 for h, r in zip(hyps, refs, strict=True)]
    mean = sum(sentence) / len(sentence) if sentence else 0.0
    corpus = metric.corpus_score(hyps, [refs]).score if hyps else 0.0
    return mean, corpus


def _side(replies: Sequence[str], ids: Sequence[str], index: TrainIndex | None, min_chars: int) -> dict:
    phrases, rate = stock_phrases(replies)
    return {
        "summary": reply_summary(replies),
        "stock_rate": rate,
        "stock_phrases": phrases,
        "verbatim": verbatim_repeats(replies, ids, index, min_chars),
    }


def score_systems(
    real: list[str],
    systems: dict[str, list[str]],
    contexts: list[list[dict]],
    ids: list[str],
    train_index: TrainIndex | None,
    verbatim_chars: int = 20,
) -> dict:
    """-> {"features": {...}, "real": {...}, "systems": {NAME: {...}}} as docs/evaluation.md describes.

    `real[i]`, `systems[name][i]`, `contexts[i]` (the turns before the reply) and `ids[i]` are one sample.
    `train_index` None means no training text: every verbatim rate is then 0.
    """
    n = len(real)
    if len(contexts) != n or len(ids) != n:
        raise ValueError(f"{n} real replies, {len(contexts)} contexts, {len(ids)} ids: one of each per sample")
    for name, replies in systems.items():
        if len(replies) != n:
            raise ValueError(f"system {name!r} has {len(replies)} replies for {n} samples")

    real_profile = style_profile(real, contexts)
    report = {
        "features": {key: {"label": label, "measure": measure} for key, (label, measure) in FEATURES.items()},
        "real": {"profile": real_profile.values, **_side(real, ids, train_index, verbatim_chars)},
        "systems": {},
    }
    for name, replies in systems.items():
        profile = style_profile(replies, contexts)
        distances = feature_distances(profile, real_profile)
        chrf, chrf_corpus = chrf_scores(replies, real)
        report["systems"][name] = {
            "style_distance": style_distance(distances),
            "chrf": chrf,
            "chrf_corpus": chrf_corpus,
            "style": {
                key: {"distance": distances[key], "system": profile.values[key], "real": real_profile.values[key]}
                for key in FEATURES
            },
            **_side(replies, ids, train_index, verbatim_chars),
        }
    return _rounded(report)
