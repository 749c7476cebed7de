"""The style features of finetune/style.py on hand-made strings, and the bounds of every distance."""

from __future__ import annotations

import random

import pytest

from finetune.style import (
    ENDING_LABELS,
    FEATURES,
    MEASURES,
    bray_curtis,
    copied_share,
    cosine_distance,
    emoji_key,
    graphemes,
    is_emoji,
    jensen_shannon,
    kaomoji_spans,
    laughter_counts,
    punctuation_counts,
    ratio_distance,
    sentence_ending,
    style_distance,
    style_profile,
)


def profile(*replies: str, contexts=None):
    return style_profile(list(replies), contexts or [[] for _ in replies]).values


# --- sentence endings --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "ending"),
    [
        ("ね！", "ね"),
        ("いいね!", "ね"),
        ("よね〜", "ね"),
        ("そうだよねー", "ね"),
        ("行くよ〜〜", "よ"),
        ("いいじゃん", "じゃん"),
        ("いいじゃんっ", "じゃん"),
        ("じゃん笑", "笑/w"),  # laughter at the end is what the line ends with
        ("まじか(笑)", "笑/w"),
        ("草", "笑/w"),
        ("それは草", "笑/w"),
        ("行くwww", "笑/w"),
        ("ｗｗｗ", "笑/w"),
        ("wow", "other"),  # not laughter: w after a Latin letter
        ("new", "other"),
        ("雑草", "other"),  # a plant, not laughter
        ("っす", "っす"),
        ("了解っス", "っす"),
        ("ですね。", "ね"),
        ("そうです。", "です"),
        ("そうでした", "です"),  # polite past stays polite
        ("行きます！", "ます"),
        ("行きました", "ます"),
        ("行けません", "ます"),
        ("ですか？", "か"),
        ("マジだ", "だ"),
        ("行った", "た"),
        ("大変だった…", "た"),
        ("できるかな", "かな"),
        ("いいけど", "けど"),
        ("そうなの?", "の"),
        ("行くぞ", "ぞ"),
        ("やるぜ", "ぜ"),
        ("だからさ", "さ"),
        ("いいわ", "わ"),
        ("いいね😂😂", "ね"),
        ("いいね👍🏽", "ね"),
        ("ありがとね(^^)", "ね"),
        ("よろしくね(´・ω・`)", "ね"),
        ("😂", "(emoji/marks only)"),
        ("(＾▽＾)", "(emoji/marks only)"),
        ("！！", "(emoji/marks only)"),
        ("ありがとう", "other"),
    ],
)
def test_sentence_ending(line, ending):
    assert sentence_ending(line) == ending


def test_every_ending_class_is_a_label():
    assert len(set(ENDING_LABELS)) == len(ENDING_LABELS)
    profile_endings = profile("いいじゃん\nそうです")["endings"]
    assert list(profile_endings) == list(ENDING_LABELS)
    assert profile_endings["じゃん"] == profile_endings["です"] == 0.5


# --- laughter ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "counts"),
    [
        ("行くwww", {"w": 1}),
        ("www", {"w": 1}),
        ("まじか ｗｗ", {"w": 1}),
        ("wwwそれなw", {"w": 2}),
        ("wow", {}),
        ("new", {}),
        ("www.example.com 見て", {}),
        ("wifiある?", {}),
        ("3w後", {}),
        ("笑", {"笑": 1}),
        ("笑笑", {"笑": 1}),  # a run is one laugh, made louder
        ("それな笑\nまじ笑", {"笑": 2}),
        ("笑顔がいい", {}),
        ("笑った", {}),
        ("草", {"草": 1}),
        ("草生える", {"草": 1}),
        ("草原", {}),
        ("雑草", {}),
    ],
)
def test_laughter_counts(text, counts):
    assert dict(laughter_counts(text)) == counts


def test_laughter_is_per_reply():
    assert profile("行くwww", "笑", "まじ")["laughter"] == {"笑": 1 / 3, "w": 1 / 3, "草": 0.0}


# --- emoji and kaomoji -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "emoji",
    ["😂", "👨‍👩‍👧", "👍🏽", "🇯🇵", "1️⃣", "#️⃣", "❤️", "❤", "🏳️‍🌈", "👩🏻‍💻"],
)
def test_an_emoji_sequence_is_one_cluster(emoji):
    clusters = graphemes(emoji)
    assert clusters == [emoji]
    assert is_emoji(emoji)
    assert profile(emoji)["emoji"] == {emoji_key(emoji): 1.0, "kaomoji": 0.0}


def test_emoji_keys():
    assert emoji_key("❤") == emoji_key("❤️")  # the keyboard's variation selector is no style
    assert emoji_key("👍🏽") != emoji_key("👍")  # the skin tone is
    assert emoji_key("1⃣") == "1️⃣"


@pytest.mark.parametrize("text", ["©", "®", "™", "‼", "a", "1", "あ", "♪", "ｶ"])
def test_text_symbols_are_not_emoji(text):
    assert not is_emoji(text)


def test_emoji_are_counted_per_reply():
    value = profile("いいね👨‍👩‍👧👨‍👩‍👧", "🇯🇵🇺🇸", "まじ")["emoji"]
    assert value == {"👨‍👩‍👧": 2 / 3, "🇯🇵": 1 / 3, "🇺🇸": 1 / 3, "kaomoji": 0.0}


@pytest.mark.parametrize(
    "face",
    ["(´・ω・`)", "(^^)", "(＾▽＾)", "^_^", "^^", "(；´Д｀)", "＼(^o^)／", "m(_ _)m", "orz", "OTL", "(T_T)", ">_<",
     "ヽ(・∀・)ノ", "(*´∀`*)", "(ーー;)", "¯\\_(ツ)_/¯", "（＾ω＾）"],
)  # fmt: skip
def test_kaomoji(face):
    assert [face[a:b] for a, b in kaomoji_spans(face)] == [face]
    assert [m for m in kaomoji_spans("ありがとう" + face + "また明日")]


@pytest.mark.parametrize("text", ["(笑)", "(明日)", "(汗)", "(1/2)", "(10:00~12:00)", "(ok)", "(アニメ)", "(...)", "Orzo"])
def test_words_in_brackets_are_not_kaomoji(text):
    assert kaomoji_spans(text) == []


def test_kaomoji_counted_once_each():
    assert profile("(^^)ありがと", "m(_ _)m", "明日(笑)")["emoji"] == {"kaomoji": 2 / 3}


# --- punctuation, script, length, messages -----------------------------------------------------------------------


def test_punctuation_keeps_widths_apart_and_reads_every_ellipsis_as_one():
    counts = punctuation_counts("え…まじ...？・・・‥！！!?〜～~。、")
    assert dict(counts) == {"…": 4, "〜": 3, "！": 2, "!": 1, "？": 1, "?": 1, "。": 1, "、": 1}


def test_punctuation_is_per_100_characters():
    value = profile("いいね!", "そうですね。")["punctuation"]  # 10 characters
    assert value["!"] == pytest.approx(10.0)
    assert value["。"] == pytest.approx(10.0)
    assert value["！"] == 0.0


def test_script_mix_half_width_kana():
    value = profile("ﾏｼﾞｶ")["script"]
    assert value["half-width kana"] == 1.0
    value = profile("カタカナーとひらがな漢字ABCａｂ12３😂！ ")["script"]
    counts = {"katakana": 5, "hiragana": 5, "kanji": 2, "latin": 5, "digits": 3, "emoji": 1, "other": 1}
    total = sum(counts.values())
    assert value == {"hiragana": 5 / total, "katakana": 5 / total, "half-width kana": 0.0, "kanji": 2 / total,
                     "latin": 5 / total, "digits": 3 / total, "emoji": 1 / total, "other": 1 / total}  # fmt: skip


def test_nl_is_a_line_break():
    value = profile("おはよう<NL>今日ひま?<NL><NL>笑", "うん", "")
    assert value["messages"] == {"0": 1 / 3, "1": 1 / 3, "2": 0.0, "3": 1 / 3, "4+": 0.0}
    # line breaks are no characters: おはよう今日ひま?笑 is 10
    assert value["length"]["6-10"] == 1 / 3
    assert value["length"]["0"] == 1 / 3


def test_length_counts_what_a_reader_sees():
    assert profile("👨‍👩‍👧" * 5)["length"]["1-5"] == 1.0  # five emoji, not 25 code points
    assert profile("あ" * 161)["length"]["161+"] == 1.0
    assert profile("あ" * 160)["length"]["81-160"] == 1.0


# --- n-grams, diversity, copying ---------------------------------------------------------------------------------


def test_ngrams_top_list_and_cosine():
    value = profile("いいね", "いいね")["ngrams"]
    # 2-3-grams: いい, いね, いいね in each reply: 6 in all
    assert value == {"いい": pytest.approx(1 / 3), "いね": pytest.approx(1 / 3), "いいね": pytest.approx(1 / 3)}
    a = style_profile(["いいね"], [[]])
    b = style_profile(["いいね", "いいね"], [[], []])
    c = style_profile(["ですます"], [[]])
    assert cosine_distance(a.ngram_counts, b.ngram_counts) == pytest.approx(0)
    assert cosine_distance(a.ngram_counts, c.ngram_counts) == 1.0


def test_diversity():
    value = profile("ああ", "ああ", "いう")["diversity"]
    # 1-grams: あ あ あ あ い う: 3 distinct of 6; 2-grams ああ ああ いう: 2 of 3; 3-grams: none
    assert value == {"distinct_1": 0.5, "distinct_2": pytest.approx(2 / 3), "distinct_3": 0.0,
                     "unique_replies": pytest.approx(2 / 3)}  # fmt: skip


def test_copying():
    context = [{"speaker": "健太", "text": "明日の花火大会に行きませんか"}]
    assert copied_share("花火大会に行きませんか", context) == 1.0
    assert copied_share("いいね", context) == 0.0
    assert copied_share("花火大会に行こう", context) == pytest.approx(6 / 8)  # 花火大会に行 is copied
    value = profile("花火大会に行きませんか", "いいね", contexts=[context, context])["copying"]
    assert value == {"copied_chars": 0.5, "copied_replies": 0.5}


# --- distances ---------------------------------------------------------------------------------------------------


def test_jensen_shannon_bounds_and_zero_cases():
    assert jensen_shannon({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == 0
    assert jensen_shannon({"a": 1.0}, {"b": 1.0}) == pytest.approx(1.0)  # disjoint: the bound, base 2
    assert jensen_shannon({"a": 1.0, "b": 0.0}, {"a": 0.5, "b": 0.5}) == pytest.approx(0.3112781, abs=1e-6)
    assert jensen_shannon({"a": 2.0}, {"a": 1.0}) == 0  # histograms are normalized
    assert jensen_shannon({}, {}) == 0
    assert jensen_shannon({"a": 0.0}, {"a": 1.0}) == 1.0


def test_bray_curtis_keeps_scale():
    assert bray_curtis({"笑": 1.0}, {"笑": 1.0}) == 0
    assert bray_curtis({"笑": 2.0}, {"笑": 1.0}) == pytest.approx(1 / 3)  # same mix, twice as often: a difference
    assert bray_curtis({"笑": 1.0}, {"w": 1.0}) == 1.0
    assert bray_curtis({"笑": 0.0}, {"笑": 1.0}) == 1.0
    assert bray_curtis({"笑": 0.0}, {"w": 0.0}) == 0
    assert bray_curtis({}, {}) == 0


def test_cosine_and_ratio():
    assert cosine_distance({"a": 1.0}, {"a": 3.0}) == pytest.approx(0)
    assert cosine_distance({"a": 1.0}, {"b": 1.0}) == 1.0
    assert cosine_distance({}, {}) == 0
    assert cosine_distance({}, {"a": 1.0}) == 1.0
    assert ratio_distance({"x": 0.5, "y": 0.0}, {"x": 0.25, "y": 0.0}) == pytest.approx(0.25)
    assert ratio_distance({"x": 0.0}, {"x": 0.2}) == 1.0
    assert ratio_distance({"x": 0.0}, {"x": 0.0}) == 0
    assert ratio_distance({}, {}) == 0


@pytest.mark.parametrize("measure", sorted(MEASURES))
def test_every_distance_is_in_0_1_symmetric_and_0_on_itself(measure):
    distance = MEASURES[measure]
    rng = random.Random(measure)
    labels = list("abcdef")
    for _ in range(300):
        a = {k: rng.choice([0.0, rng.random(), rng.random() * 100]) for k in rng.sample(labels, rng.randint(0, 6))}
        b = {k: rng.choice([0.0, rng.random(), rng.random() * 100]) for k in rng.sample(labels, rng.randint(0, 6))}
        assert 0 <= distance(a, b) <= 1
        assert distance(a, b) == pytest.approx(distance(b, a))
        assert distance(a, a) == pytest.approx(0, abs=1e-12)


def test_style_distance_is_the_mean_of_the_features():
    assert style_distance({key: 0.5 for key in FEATURES}) == 0.5
    assert style_distance({key: (1.0 if key == "length" else 0.0) for key in FEATURES}) == pytest.approx(0.1)


def test_no_replies_and_empty_replies_do_not_break_the_profile():
    empty = style_profile([], [])
    assert set(empty.values) == set(FEATURES)
    blank = style_profile(["", " "], [[], []])
    assert blank.values["length"]["0"] == 1.0 and blank.values["messages"]["0"] == 1.0
    assert sum(blank.values["endings"].values()) == 0
