"""The blind test cannot be solved by reading: no reply of a pair shows up anywhere else in the test.

finetune/near_copy.py decides what a copy is (checked on hand-made strings here); finetune/blind_pairs.py
chooses the pairs. The leak is checked twice over what `finetune eval` writes: with near_copy itself and
with a plainer rule of this file's own (the same text, or one inside the other, once spacing,
punctuation and width are gone), so a bug that weakened near_copy would still be caught on the plain
copies. It is checked on a synthetic LINE export made to leak (tests/support/leaky_chats.py) and on every
bundled export (examples/, tests/fixtures/), each through `prepare` and `eval` with --system replies that
copy in every way a system can. A naive random choice of pairs leaks on the synthetic export: the test
shows it, so the check is known to catch what it looks for.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import unicodedata
from pathlib import Path

import pytest
from conftest import EXAMPLES

from finetune.blind_pairs import NOT_NEEDED, SAME_REPLY, SHOWN_ELSEWHERE, choose_blind_pairs
from finetune.cli import main as finetune_main
from finetune.near_copy import ComparableText, TextIndex, near_copy, normalise
from tests.support.leaky_chats import PERSONA, leaky_line_export, leaky_systems

FIXTURES = Path(__file__).parent / "fixtures"


# ---- what a copy is -------------------------------------------------------------------------------

COPIES = [
    ("それな〜", "それな～"),  # wave dash, full-width tilde
    ("それな!!", "それな！"),
    ("それなー", "それな〜"),  # a long-vowel mark at the end
    ("ＯＫ！", "ok"),  # width and case
    ("まじか笑", "まじか 笑"),
    ("まじか笑", "まじか笑笑"),
    ("うけるｗｗｗ", "うけるwww"),
    ("ﾗｰﾒﾝ行こう", "ラーメン行こう"),  # half-width kana
    ("👍", "👍👍"),  # nothing but symbols: compared as symbols
    ("明日10時に駅前ね", "「明日10時に駅前ね」ってまじ？"),  # quoted inside a longer message
    ("あーそれ気になってた笑\nたのしみ", "あーそれ気になってた笑\n[スタンプ]\nたのしみ"),  # a burst with a sticker
    ("今日のライブほんとに最高だったね、また行きたい", "…ライブほんとに最高だったね、また行きたい"),  # a clipped turn
    ("明日は駅前で十時集合ね", "明日は駅前で九時集合ね"),  # one character of 11 changed: 6 of 9 trigrams kept
]
NOT_COPIES = [
    ("うん", "うん、行く！"),  # 2 characters inside a longer message say nothing
    ("新しいカフェありだね", "新しいカフェ楽しみだね"),  # one topic, two replies: 4 of 8 trigrams
    ("駅前のパン屋が閉店するって", "駅前のパン屋で限定パフェ始まった"),
    ("おはよう", "おやすみ"),
    ("", ""),
    ("了解", "了解です"),
]


@pytest.mark.parametrize("a, b", COPIES)
def test_near_copies_are_found_both_ways(a, b):
    assert near_copy(ComparableText.of(a), ComparableText.of(b))
    assert near_copy(ComparableText.of(b), ComparableText.of(a))


@pytest.mark.parametrize("a, b", NOT_COPIES)
def test_different_texts_are_not_copies(a, b):
    assert not near_copy(ComparableText.of(a), ComparableText.of(b))


def test_normal_form():
    assert normalise("ＯＫ！ ｗｗｗ") == "okw"
    assert normalise("すごーーーい") == "すごーい" and normalise("ラーメン") == "ラーメン"
    assert normalise("「明日、10時に！」") == "明日10時に"
    assert normalise("！！") == "!"  # only punctuation: kept, not the empty text that matches nothing


def test_index_finds_what_comparing_every_pair_finds(tmp_path):
    export = leaky_line_export(tmp_path / "chat.txt", conversations=12, seed=5)
    texts = [line.split("\t", 2)[2] for line in export.read_text(encoding="utf-8").splitlines() if line.count("\t") == 2]
    texts += [a for pair in COPIES + NOT_COPIES for a in pair]
    comparable = [ComparableText.of(t) for t in texts]
    index = TextIndex()
    for key, text in enumerate(comparable):
        index.add(key, text)
    for query in comparable:
        expected = {key for key, text in enumerate(comparable) if near_copy(query, text)}
        assert index.keys_with_copies_of(query) == expected, query.norm


# ---- the leak check -------------------------------------------------------------------------------

def _plain(text: str) -> str:
    """This file's own normal form: NFKC, lower case, letters and digits only."""
    return re.sub(r"[\W_]+", "", unicodedata.normalize("NFKC", text).casefold())


def _plainly_copied(reply: str, text: str) -> bool:
    a, b = sorted((_plain(reply), _plain(text)), key=len)
    return bool(a) and (a == b or (len(a) >= 5 and a in b))


def leaks(pairs: list[dict]) -> list[tuple[int, str, int, str]]:
    """(pair, its reply, other pair, the text there) for each reply of a pair that shows up in another pair:
    in its context or as one of its replies."""
    found = []
    for i, pair in enumerate(pairs):
        for reply in (pair["first"], pair["second"]):
            for j, other in enumerate(pairs):
                if i == j:
                    continue
                for text in [t["text"] for t in other["context"]] + [other["first"], other["second"]]:
                    if _plainly_copied(reply, text) or near_copy(ComparableText.of(reply), ComparableText.of(text)):
                        found.append((i, reply, j, text))
    return found


def naive_pairs(samples: list[dict], replies: dict[str, list[str]], seed: int = 0, limit: int = 40) -> list[dict]:
    """The choice before: random samples, systems in turn, blind to conversations and repeats."""
    rng = random.Random(f"blind-{seed}")
    order = list(range(len(samples)))
    rng.shuffle(order)
    names, pairs = list(replies), []
    for i in order:
        if len(pairs) >= limit:
            break
        generated, real = replies[names[len(pairs) % len(names)]][i], samples[i]["target"]
        if generated.strip() != real.strip():
            pairs.append({"context": samples[i]["context"], "first": real, "second": generated})
    return pairs


# ---- the choice on hand-made pools ----------------------------------------------------------------

def _sample(conversation: int, n: int, context: list[str], target: str) -> dict:
    return {"id": f"c{conversation}-{n}", "persona": PERSONA, "conversation": conversation, "target": target,
            "context": [{"speaker": "健太" if k % 2 == 0 else PERSONA, "text": t} for k, t in enumerate(context)]}


def _fresh(i: int) -> str:
    """Text no other `_fresh` resembles: ten kana drawn at random, seeded by i."""
    kana = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん"
    rng = random.Random(i)
    return "".join(rng.choice(kana) for _ in range(10))


def test_consecutive_samples_of_a_conversation_do_not_give_each_other_away():
    # one conversation: each sample's context holds the replies before it
    turns = [_fresh(100 + k) for k in range(12)]
    samples = [_sample(0, k, turns[:k], turns[k]) for k in range(1, 12, 2)]
    replies = {"tuned": [_fresh(200 + k) for k in range(len(samples))]}
    assert leaks(naive_pairs(samples, replies))  # drawn blindly, they do
    pairs, selection = choose_blind_pairs(samples, replies, seed=0)
    assert pairs and not leaks(pairs)
    assert selection["pairs"] + sum(selection["left_out"].values()) == len(samples)
    assert selection["left_out"][SHOWN_ELSEWHERE] == len(samples) - len(pairs)


def test_pairs_come_from_different_conversations_first():
    samples = [_sample(c, k, [_fresh(1000 + 10 * c + k)], _fresh(10 * c + k)) for c in range(4) for k in range(3)]
    replies = {"base": [_fresh(500 + i) for i in range(12)], "tuned": [_fresh(700 + i) for i in range(12)]}
    for limit, per_conversation in ((4, 1), (8, 2), (12, 3)):
        pairs, selection = choose_blind_pairs(samples, replies, seed=3, limit=limit)
        conversations = [p["id"].split("-")[0] for p in pairs]
        assert sorted(conversations) == sorted([f"c{c}" for c in range(4)] * per_conversation)
        assert selection["conversations"] == 4 and selection["systems"] == {"base": limit // 2, "tuned": limit // 2}
        assert selection["left_out"] == {SAME_REPLY: 0, SHOWN_ELSEWHERE: 0, NOT_NEEDED: 12 - limit}
    # eval.jsonl written before samples named their conversation: still chosen, none counted
    old = [{k: v for k, v in s.items() if k != "conversation"} for s in samples]
    pairs, selection = choose_blind_pairs(old, replies, seed=3, limit=4)
    assert len(pairs) == 4 and selection["conversations"] is None


def test_a_reply_equal_to_the_real_one_or_repeated_elsewhere_is_left_out():
    greeting = "おはよー！"
    samples = [_sample(c, 0, ["おはよう", greeting, "なにしてる？"], _fresh(c)) for c in range(6)]
    samples.append(_sample(9, 0, ["おはよう"], greeting))  # its real reply is in every other context
    replies = {"tuned": [_fresh(50 + i) for i in range(6)] + [greeting]}  # and said word for word
    pairs, selection = choose_blind_pairs(samples, replies, seed=0)
    assert len(pairs) == 6 and not leaks(pairs)
    assert selection["left_out"][SAME_REPLY] == 1
    replies = {"tuned": [_fresh(50 + i) for i in range(6)] + ["まだ寝てる"]}
    orders = set()
    for seed in range(12):  # whatever the order, the greeting is never chosen: it would take six pairs with it
        pairs, selection = choose_blind_pairs(samples, replies, seed=seed)
        assert len(pairs) == 6 and greeting not in {p["first"] for p in pairs} | {p["second"] for p in pairs}
        assert selection["left_out"][SHOWN_ELSEWHERE] == 1
        orders.add(selection["order"])
    assert orders == {"random", "fewest_repeats_first"}  # where the random order took the greeting first, the retry



def test_a_reply_that_other_samples_show_is_tried_last():
    samples = [_sample(c, 0, [_fresh(100 + c)], _fresh(c)) for c in range(2)]
    # copycat answers each sample with the other's real reply: shown with either, it shuts the other out
    replies = {"copycat": [_fresh(1), _fresh(0)], "fresh": [_fresh(50), _fresh(51)]}
    pairs, selection = choose_blind_pairs(samples, replies, seed=0)
    assert selection["systems"] == {"copycat": 0, "fresh": 2} and not leaks(pairs)


def test_a_system_that_repeats_itself_shows_its_phrase_once():
    samples = [_sample(c, 0, [_fresh(100 + c)], _fresh(c)) for c in range(8)]
    pairs, selection = choose_blind_pairs(samples, {"stock": ["そうなんだ"] * 8, "fresh": [_fresh(50 + c) for c in range(8)]},
                                          seed=1)
    assert selection["systems"] == {"stock": 1, "fresh": 7} and not leaks(pairs)


# ---- prepare -> eval over exports ------------------------------------------------------------------

def _cli(*args) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = finetune_main([str(a) for a in args])
    assert code == 0, err.getvalue()
    return code


def prepared_and_evaluated(tmp_path: Path, exports: list[Path], persona: str, *extra: str) -> tuple[Path, dict] | None:
    """`prepare` with half the samples held out, then `eval` with every kind of copying system."""
    data, out = tmp_path / "data", tmp_path / "report"
    _cli("prepare", *exports, "--persona", persona, "--out", data, "--eval-fraction", "0.5", "--timezone",
         "Asia/Tokyo", "--no-progress", *extra)
    if not (data / "eval.jsonl").read_text(encoding="utf-8").strip():
        return None
    systems = leaky_systems(data / "eval.jsonl", tmp_path)
    _cli("eval", "--data", data, "--out", out, "--no-progress", *[f"--system={n}={p}" for n, p in systems.items()])
    return data, json.loads((out / "report.json").read_text(encoding="utf-8"))


def check_report(report: dict) -> None:
    pairs, selection = report["blind"], report["blind_selection"]
    assert not leaks(pairs), leaks(pairs)[:3]
    assert selection["pairs"] == len(pairs) and selection["samples"] == report["samples"]
    assert selection["pairs"] + sum(selection["left_out"].values()) == selection["samples"]
    assert selection["left_out"][NOT_NEEDED] == 0 or len(pairs) == selection["limit"]
    examples = {e["id"]: e for e in report["examples"]}
    for pair in pairs:
        example = examples[pair["id"]]
        assert pair[pair["real_is"]] == example["real"]
        assert pair[{"first": "second", "second": "first"}[pair["real_is"]]] == example["replies"][pair["system"]]
        assert pair["context"] == example["context"]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_leaky_export_gives_a_blind_test_that_reading_cannot_solve(tmp_path, seed):
    export = leaky_line_export(tmp_path / "chat.txt", conversations=40, seed=seed)
    data, report = prepared_and_evaluated(tmp_path, [export], PERSONA)
    samples = [json.loads(line) for line in (data / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    examples = report["examples"]
    replies = {name: [e["replies"][name] for e in examples] for name in report["systems"]}
    naive = naive_pairs(samples, replies)
    assert len(leaks(naive)) >= 10 and len({i for i, *_ in leaks(naive)}) >= len(naive) // 2  # the old way leaked
    check_report(report)
    selection = report["blind_selection"]
    assert len(report["blind"]) >= 10 and selection["left_out"][SHOWN_ELSEWHERE] > 0
    assert selection["conversations"] == len({s["conversation"] for s in samples if s["id"] in
                                              {p["id"] for p in report["blind"]}})
    assert selection["systems"]["fresh"] > selection["systems"]["stock"] == 1


def test_the_bundled_examples_give_a_blind_test_that_reading_cannot_solve(tmp_path):
    result = prepared_and_evaluated(tmp_path, [EXAMPLES / "line_demo.txt", EXAMPLES / "discord_demo.json"], "美咲",
                                    "--alias", "misaki")
    assert result is not None
    _, report = result
    check_report(report)
    assert len(report["blind"]) >= 3


def _fixture_cases() -> list[tuple[Path, list[str], str]]:
    cases = []
    for expected in sorted(FIXTURES.rglob("*.expected.json")):
        spec = json.loads(expected.read_text(encoding="utf-8"))
        speakers = spec["inspect"].get("speakers") or {}
        if speakers:
            persona = max(speakers, key=lambda name: (speakers[name]["text"], name))
            cases.append((expected.with_name(expected.name[: -len(".expected.json")]), spec.get("args", []), persona))
    return cases


def test_every_fixture_export_gives_a_blind_test_that_reading_cannot_solve(tmp_path):
    with_pairs = 0
    for n, (fixture, args, persona) in enumerate(_fixture_cases()):
        # a one-minute session gap splits these short chats into several conversations, so some are held out
        result = prepared_and_evaluated(tmp_path / str(n), [fixture], persona, "--session-gap", "1m", *args)
        if result is not None:
            check_report(result[1])
            with_pairs += bool(result[1]["blind"])
    assert with_pairs >= 20
