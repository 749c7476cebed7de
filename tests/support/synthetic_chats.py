"""Synthetic chats with speakers whose styles are known, to check the eval instrument without a model.

Two speakers talk about a topic per conversation:
- the persona (美咲) writes short casual lines: じゃん, ね, 笑, 😂, half-width "!", one or two messages;
  now and then a long message, the kind a tuned model could learn to recite;
- the friend (健太) writes polite, longer lines: です, ます, 。.

A style is a generator, so "a reply in the persona's style" can be fresh text (another draw of the
same style), not a copy of a real reply: that is what a good clone produces.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PERSONA = "美咲"
FRIEND = "健太"
TOPICS = ["ラーメン", "映画", "課題", "バイト", "旅行", "カラオケ", "新しいカフェ", "ライブ", "テスト", "ゲーム",
          "買い物", "花火大会", "サークル", "誕生日会", "ドライブ", "焼肉"]  # fmt: skip
STOCK_REPLY = "そうですね"


def casual_reply(topic: str, rng: random.Random) -> str:
    """The persona's style: short, casual endings, 笑 and 😂, half-width "!"."""
    if rng.random() < 0.1:
        return rng.choice(
            [
                f"昨日{topic}のことずっと考えてたんだけど、やっぱり{rng.choice(TOPICS)}もみんなで行きたいじゃん笑",
                f"てか{topic}の話さ、この前{rng.choice(TOPICS)}の帰りに聞いたやつと同じじゃん?まじうける😂",
            ]
        )
    bodies = [
        f"{topic}いいじゃん",
        f"{topic}行こうよ",
        f"{topic}楽しみだね",
        f"え、{topic}?",
        f"{topic}最高じゃん",
        f"{topic}ありだね",
        "まじで",
        "それな",
        "やばいね",
        "わかる",
        "うける",
        "ほんとそれ",
        "いいね",
    ]
    tails = ["笑", "😂", "!", "", "笑", "!!", "😂😂"]
    lines = [rng.choice(bodies) + rng.choice(tails) for _ in range(rng.choice([1, 1, 1, 2]))]
    return "\n".join(lines)


def polite_reply(topic: str, rng: random.Random) -> str:
    """The friend's style: polite です/ます, 。, longer sentences."""
    sentences = [
        f"{topic}についてはどう思いますか。",
        f"昨日は{topic}に行ってきました。",
        f"今度{topic}に一緒に行きませんか。",
        f"{topic}の件、よろしくお願いします。",
        f"私は{topic}がとても好きです。",
        "とても楽しかったです。",
        "なるほど、そうなんですね。",
        "ありがとうございます。",
        "予定を確認しておきます。",
        "また連絡しますね。",
    ]
    count = rng.choice([2, 2, 3])
    return "".join(rng.sample(sentences, count))


@dataclass
class SyntheticDataset:
    train: list[dict]  # train.jsonl rows: {"id", "persona", "context", "target"}
    eval: list[dict]  # the same, plus "topic": what the conversation is about (systems reply to it)


def synthetic_dataset(seed: int, conversations: int = 80, eval_conversations: int = 40) -> SyntheticDataset:
    rng = random.Random(seed)
    train: list[dict] = []
    held_out: list[dict] = []
    for number in range(conversations + eval_conversations):
        topic = rng.choice(TOPICS)
        turns: list[dict] = []
        for position in range(rng.randint(4, 8)):
            speaker = FRIEND if position % 2 == 0 else PERSONA
            text = polite_reply(topic, rng) if speaker == FRIEND else casual_reply(topic, rng)
            if speaker == PERSONA:
                sample = {
                    "id": f"s{seed}-c{number}-t{position}",
                    "persona": PERSONA,
                    "context": [dict(turn) for turn in turns[-4:]],
                    "target": text,
                }
                if number < conversations:
                    train.append(sample)
                else:
                    held_out.append({**sample, "topic": topic})
            turns.append({"speaker": speaker, "text": text})
    return SyntheticDataset(train, held_out)
