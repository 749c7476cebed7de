"""The eval instrument, checked without a model: on synthetic chats whose speakers' styles are known, the scores
must rank replies the way a reader would, and each failure a clone can have must show where it should."""

from __future__ import annotations

import random

import pytest

from finetune.scoring import score_systems
from finetune.style import FEATURES
from finetune.verbatim import TrainIndex
from tests.support.synthetic_chats import FRIEND, PERSONA, STOCK_REPLY, casual_reply, polite_reply, synthetic_dataset

SEEDS = [0, 1, 2]


def _systems(dataset, seed: int) -> dict[str, list[str]]:
    """Replies to the held-out contexts, each written by a known process."""
    rng = random.Random(1000 + seed)  # not the dataset's draw: fresh text, not the real replies
    long_targets = [s["target"] for s in dataset.train if len(s["target"]) >= 30]
    return {
        "persona_style": [casual_reply(s["topic"], rng) for s in dataset.eval],
        "friend_style": [polite_reply(s["topic"], rng) for s in dataset.eval],
        "stock": [STOCK_REPLY for _ in dataset.eval],
        "echo": [s["context"][-1]["text"] for s in dataset.eval],
        "recite": [rng.choice(long_targets) for _ in dataset.eval],
    }


@pytest.fixture(scope="module", params=SEEDS)
def scored(request):
    seed = request.param
    dataset = synthetic_dataset(seed)
    systems = _systems(dataset, seed)
    report = score_systems(
        real=[s["target"] for s in dataset.eval],
        systems=systems,
        contexts=[s["context"] for s in dataset.eval],
        ids=[s["id"] for s in dataset.eval],
        train_index=TrainIndex.from_samples(dataset.train),
    )
    return report, systems


def test_report_has_the_documented_shape(scored):
    report, systems = scored
    assert list(report["features"]) == list(FEATURES)
    assert set(report["real"]) == {"profile", "summary", "stock_rate", "stock_phrases", "verbatim"}
    assert list(report["real"]["profile"]) == list(FEATURES)
    assert set(report["systems"]) == set(systems)
    for result in report["systems"].values():
        assert list(result["style"]) == list(FEATURES)
        for feature in result["style"].values():
            assert 0 <= feature["distance"] <= 1
            assert all(isinstance(v, (int, float)) for v in feature["system"].values())
        assert 0 <= result["style_distance"] <= 1
        assert 0 <= result["chrf"] <= 100 and 0 <= result["chrf_corpus"] <= 100
        assert set(result["summary"]) == {"mean_chars", "median_chars", "mean_messages", "distinct_2", "empty_rate"}


def test_the_persona_style_beats_another_style_and_stock_replies(scored):
    report, _ = scored
    systems = report["systems"]
    persona = systems["persona_style"]
    for other in ("friend_style", "stock"):
        assert persona["style_distance"] < systems[other]["style_distance"], other
        assert persona["chrf"] > systems[other]["chrf"], other
        assert persona["chrf_corpus"] > systems[other]["chrf_corpus"], other
    # Not only on average: the features that tell a casual voice from a polite one each point the right way.
    for key in ("length", "endings", "laughter", "emoji", "punctuation", "script", "ngrams"):
        assert persona["style"][key]["distance"] < systems["friend_style"]["style"][key]["distance"], key
    assert persona["style_distance"] < 0.2  # at most 0.13 over seeds 0-39
    assert systems["friend_style"]["style_distance"] > 0.4


def test_stock_replies_are_caught_by_stock_rate_and_diversity(scored):
    report, systems = scored
    stock = report["systems"]["stock"]
    persona = report["systems"]["persona_style"]
    assert stock["stock_rate"] == 1.0
    assert stock["stock_phrases"] == [{"reply": STOCK_REPLY, "count": len(systems["stock"])}]
    assert persona["stock_rate"] < 0.6
    assert stock["style"]["diversity"]["system"]["unique_replies"] < 0.05
    assert stock["style"]["diversity"]["distance"] > persona["style"]["diversity"]["distance"] + 0.3


def test_echoing_the_context_is_caught_by_copying(scored):
    report, _ = scored
    echo = report["systems"]["echo"]["style"]["copying"]
    assert echo["system"]["copied_chars"] > 0.95
    assert echo["system"]["copied_replies"] == 1.0
    assert echo["real"]["copied_replies"] < 0.2
    assert echo["distance"] > 0.7
    assert report["systems"]["persona_style"]["style"]["copying"]["distance"] < echo["distance"]


def test_reciting_training_messages_is_caught_by_verbatim(scored):
    report, systems = scored
    recite = report["systems"]["recite"]["verbatim"]
    assert recite["rate"] == 1.0
    assert recite["count"] == len(systems["recite"])
    assert len(recite["examples"]) == 10
    for example in recite["examples"]:
        assert len(example["match"]) >= 20
        assert example["match"] in example["reply"]
        assert example["speaker"] == PERSONA
    assert report["systems"]["persona_style"]["verbatim"]["rate"] < 0.3
    assert report["systems"]["stock"]["verbatim"] == {"rate": 0.0, "count": 0, "examples": []}
    assert report["real"]["verbatim"]["rate"] < 0.3


def test_the_real_replies_against_themselves_score_perfectly():
    dataset = synthetic_dataset(7)
    real = [s["target"] for s in dataset.eval]
    report = score_systems(real, {"copy": list(real)}, [s["context"] for s in dataset.eval],
                           [s["id"] for s in dataset.eval], None)  # fmt: skip
    copy = report["systems"]["copy"]
    assert copy["style_distance"] == 0
    assert all(feature["distance"] == 0 for feature in copy["style"].values())
    assert copy["chrf"] == pytest.approx(100) and copy["chrf_corpus"] == pytest.approx(100)
    assert copy["verbatim"] == report["real"]["verbatim"] == {"rate": 0.0, "count": 0, "examples": []}


def test_a_friends_message_is_found_and_attributed_to_the_friend():
    message = "明日の会議は午後三時からに変更になりました。資料は前日までに送ります。"
    index = TrainIndex.from_samples(
        [{"persona": PERSONA, "context": [{"speaker": FRIEND, "text": message}], "target": "りょ!"}]
    )
    found = index.find("え、会議は午後三時からに変更になりました。資料は前日までにって聞いた笑")
    assert found is not None and found.speaker == FRIEND
    assert found.text == "会議は午後三時からに変更になりました。資料は前日までに"
    assert index.find("会議は午後三時から変更らしいよ") is None  # a shorter overlap is no repeat


def test_verbatim_finds_every_repeat_at_the_threshold_and_none_below():
    """Exactness of the strided index: a shared substring of exactly min_chars is found at every offset."""
    rng = random.Random(3)
    alphabet = [chr(c) for c in range(0x4E00, 0x4E00 + 500)]
    texts = ["".join(rng.choices(alphabet, k=rng.randint(20, 60))) for _ in range(300)]
    index = TrainIndex({t: "x" for t in texts}, min_chars=20)
    for text in texts[:60]:
        start = rng.randint(0, len(text) - 20)
        for length, expected in ((20, True), (19, False)):
            reply = "あ" + text[start : start + length] + "い"
            assert (index.find(reply) is not None) is expected, (text, start, length)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        score_systems(["a"], {"x": []}, [[]], ["1"], None)
    with pytest.raises(ValueError):
        score_systems(["a"], {}, [], ["1"], None)
