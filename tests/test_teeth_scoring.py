"""finetune/scoring.py at its edges, where a silently wrong score would mislead every later quality claim:
chrF's direction (sacrebleu scores a hypothesis against references, and the two are not interchangeable) and
the least count that makes a stock phrase. Each case is worked by hand, so the expected figure does not come
from the code under test."""

from __future__ import annotations

import pytest

from finetune.scoring import chrf_scores, score_systems, stock_phrases

# sacrebleu's CHRF() defaults: character n-grams of orders 1-6, whitespace dropped, beta = 2 (recall weighs
# twice as much as precision), precision and recall averaged over the orders both sides have, then
# F_beta = (1 + b^2) P R / (b^2 P + R).
#   hypothesis あい against the reference あいうえお: orders 1 and 2 only (the hypothesis has no trigram).
#     order 1: P = 2/2, R = 2/5; order 2: P = 1/1, R = 1/4  ->  P = 1, R = 0.325
#     F_2 = 5 * 1 * 0.325 / (4 * 1 + 0.325) = 1.625 / 4.325 = 0.37572...
#   the same pair the other way round: P = 0.325, R = 1  ->  F_2 = 1.625 / 2.3 = 0.70652...
SHORT, LONG = "あい", "あいうえお"
SHORT_AGAINST_LONG = 100 * 1.625 / 4.325
LONG_AGAINST_SHORT = 100 * 1.625 / 2.3


def test_chrf_scores_the_reply_against_the_real_reply_not_the_other_way_round():
    mean, corpus = chrf_scores([SHORT], [LONG])  # (hypotheses, references): the system's reply, the real one
    assert mean == pytest.approx(SHORT_AGAINST_LONG, abs=1e-9)
    assert corpus == pytest.approx(SHORT_AGAINST_LONG, abs=1e-9)
    mean, corpus = chrf_scores([LONG], [SHORT])
    assert (mean, corpus) == (pytest.approx(LONG_AGAINST_SHORT, abs=1e-9), pytest.approx(LONG_AGAINST_SHORT, abs=1e-9))


def test_a_reply_that_says_all_the_real_reply_said_beats_one_that_says_part_of_it():
    """chrF's recall weighting, as seen in the report: the system that says all of the real reply and as much
    again ranks above the one that says the first half of it and stops. (Scored the wrong way round, the two
    would trade places: adding is then the missing recall, stopping short the perfect one.)"""
    real = ["明日は駅前のカフェで十時に会おう", "雨なら映画にしよう"]
    systems = {
        "covers": ["明日は駅前のカフェで十時に会おう、遅れそうなら先に連絡して", "雨なら映画にしよう、見たいのある?"],
        "stops_short": ["明日は駅前のカ", "雨なら映"],
    }
    report = score_systems(real, systems, [[], []], ["s0", "s1"], None)["systems"]
    assert report["covers"]["chrf"] > report["stops_short"]["chrf"]
    assert report["covers"]["chrf_corpus"] > report["stops_short"]["chrf_corpus"]


def test_score_systems_reports_chrf_of_the_system_against_the_real_replies():
    report = score_systems([LONG], {"short": [SHORT]}, [[]], ["s0"], None)["systems"]["short"]
    assert report["chrf"] == pytest.approx(SHORT_AGAINST_LONG, abs=1e-4)  # report.json keeps four places
    assert report["chrf_corpus"] == pytest.approx(SHORT_AGAINST_LONG, abs=1e-4)


def test_an_empty_reply_scores_zero_whatever_the_reference():
    assert chrf_scores(["", SHORT], [LONG, LONG])[0] == pytest.approx(SHORT_AGAINST_LONG / 2, abs=1e-9)


def test_a_reply_said_twice_is_a_stock_phrase_and_once_is_not():
    replies = ["また明日", "了解", "また明日", "おやすみ", "", ""]
    phrases, rate = stock_phrases(replies)
    assert phrases == [{"reply": "また明日", "count": 2}]  # empty replies are no phrase, twice or not
    assert rate == pytest.approx(2 / 6)
    assert stock_phrases(["また明日", "了解", "おやすみ"]) == ([], 0.0)


def test_stock_phrases_in_the_report_count_a_pair():
    real = ["うん", "そうだね", "ちがうよ"]
    report = score_systems(real, {"echo": ["わかった", "わかった", "えー"]}, [[], [], []], ["a", "b", "c"], None)
    system = report["systems"]["echo"]
    assert system["stock_phrases"] == [{"reply": "わかった", "count": 2}]
    assert system["stock_rate"] == pytest.approx(round(2 / 3, 4))
    assert report["real"]["stock_phrases"] == [] and report["real"]["stock_rate"] == 0.0
