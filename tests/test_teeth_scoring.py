"""finetune/scoring.py at its edges, where a silently wrong score would mislead every later quality claim:
chrF's direction (sacrebleu scores a hypothesis against references, and the two are not interchangeable) and
the least count that makes a stock phrase. Each case is worked by hand, so the expected figure does not come
from the code under test."""

from __future__ import annotations

import pytest

from finetune.scoring import STOCK_PHRASES, chrf_scores, reply_summary, score_systems, stock_phrases, verbatim_repeats
from finetune.style import FEATURES
from finetune.verbatim import TrainIndex

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


# --- the figures of the summary, the stock phrases and the verbatim repeats, worked by hand --------------------------
# (docs/mutation.md: each test below kills mutants that the suite let through)


def test_the_reply_summary_figures():
    summary = reply_summary(["おはよう", "おはよう\nまたね", ""])
    # characters without line breaks: 4, 7, 0; messages (non-empty lines): 1, 2, 0
    assert summary["mean_chars"] == pytest.approx(11 / 3)
    assert summary["median_chars"] == 4
    assert summary["mean_messages"] == pytest.approx(1.0)
    assert summary["empty_rate"] == pytest.approx(1 / 3)
    # character bigrams, a line break read as a space: おは はよ よう | おは はよ よう "う " " ま" また たね
    # -> 7 distinct of 10 (trigrams would give 6 of 8)
    assert summary["distinct_2"] == pytest.approx(7 / 10)


def test_no_replies_summarise_to_zeros():
    assert reply_summary([]) == {"mean_chars": 0, "median_chars": 0, "mean_messages": 0, "distinct_2": 0,
                                 "empty_rate": 0}
    assert stock_phrases([]) == ([], 0.0)
    assert chrf_scores([], []) == (0.0, 0.0)


def test_at_most_five_stock_phrases_are_listed_and_the_rate_counts_those():
    replies = [phrase for phrase in ("うん", "そう", "まじ", "えー", "草", "ね") for _ in range(2)] + ["ひとつだけ"]
    phrases, rate = stock_phrases(replies)
    assert len(phrases) == STOCK_PHRASES == 5
    assert all(p["count"] == 2 for p in phrases)
    assert rate == pytest.approx(10 / 13)


def test_replies_and_their_references_or_ids_must_pair_up():
    with pytest.raises(ValueError):
        chrf_scores([SHORT, LONG], [LONG])  # sacrebleu itself would score the first pair and drop the rest
    with pytest.raises(ValueError):
        verbatim_repeats([SHORT, LONG], ["s0"], None, 20)
    with pytest.raises(ValueError, match="1 real replies, 1 contexts, 0 ids: one of each per sample"):
        score_systems([LONG], {}, [[]], [], None)
    with pytest.raises(ValueError, match="1 real replies, 0 contexts, 1 ids: one of each per sample"):
        score_systems([LONG], {}, [], ["s0"], None)


TRAINING_TEXT = "明日の会議は午後三時からに変更になりました。資料は前日までに送ります。"


def test_verbatim_repeats_counts_each_reply_that_repeats_training_text_and_names_it():
    index = TrainIndex({TRAINING_TEXT: "健太"}, min_chars=10)
    replies = ["ふつうの返事", "え、会議は午後三時からに変更になりました。って本当?", "ちがう話", "資料は前日までに送ります。了解"]
    found = verbatim_repeats(replies, ["a", "b", "c", "d"], index, 10)
    assert found["count"] == 2 and found["rate"] == pytest.approx(2 / 4)  # a miss does not end the search
    assert found["examples"] == [
        {"id": "b", "reply": replies[1], "match": "会議は午後三時からに変更になりました。", "speaker": "健太"},
        {"id": "d", "reply": replies[3], "match": "資料は前日までに送ります。", "speaker": "健太"},
    ]
    assert verbatim_repeats([], [], index, 10) == {"rate": 0.0, "count": 0, "examples": []}


def test_verbatim_repeats_uses_the_threshold_it_is_given_not_the_index_floor():
    """An index built for 10+ characters asked for 15+: a 13-character repeat is not one."""
    index = TrainIndex({TRAINING_TEXT: "健太"}, min_chars=10)
    reply = "資料は前日までに送ります。"  # 13 characters of the training text
    assert verbatim_repeats([reply], ["a"], index, 13)["count"] == 1
    assert verbatim_repeats([reply], ["a"], index, 15)["count"] == 0
    report = score_systems([LONG], {"x": [reply]}, [[]], ["a"], index, verbatim_chars=15)
    assert report["systems"]["x"]["verbatim"]["count"] == 0


def test_score_systems_counts_repeats_of_twenty_characters_by_default():
    twenty = TRAINING_TEXT[:20]
    index = TrainIndex({TRAINING_TEXT: "健太"})
    report = score_systems([LONG, LONG], {"x": [f"ね、{twenty}", f"ね、{twenty[:19]}"]}, [[], []], ["a", "b"], index)
    assert report["systems"]["x"]["verbatim"]["count"] == 1


def test_the_report_names_each_feature_with_its_label_and_measure():
    report = score_systems([LONG], {}, [[]], ["a"], None)
    assert report["features"] == {key: {"label": label, "measure": measure}
                                  for key, (label, measure) in FEATURES.items()}


def test_the_real_replies_verbatim_baseline_uses_the_index_and_the_threshold():
    """The real replies' own repeats are the baseline a system's rate is read against (docs/evaluation.md)."""
    index = TrainIndex({TRAINING_TEXT: "健太"}, min_chars=10)
    real = ["え、会議は午後三時からに変更になりました。って本当?", "資料は前日までに送ります。"]  # 19 and 13 characters
    report = score_systems(real, {}, [[], []], ["a", "b"], index, verbatim_chars=15)
    assert report["real"]["verbatim"]["count"] == 1
    assert report["real"]["verbatim"]["examples"][0]["id"] == "a"


def test_a_system_with_a_reply_missing_is_refused_by_name():
    with pytest.raises(ValueError, match="system 'x' has 0 replies for 1 samples"):
        score_systems([LONG], {"x": []}, [[]], ["a"], None)
