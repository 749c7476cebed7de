"""A LINE export whose held-out samples give the blind test every chance to leak its answers.

Real chats repeat themselves, and a blind test drawn from them without care can be solved by reading
(finetune/blind_pairs.py). This chat has each way it happens, on purpose:

- catchphrases the persona says in many conversations, spelt differently each time: それな〜 /
  それな～ / それな!! (width, punctuation), まじか笑 / まじか 笑 / まじか笑笑 (spacing, repeats),
  ＯＫ！ / OK! / ok;
- greetings that open and close every conversation, from both sides: おはよう！, おつかれ〜, またね;
- long conversations, so the context of one of the persona's replies holds her replies just before;
- bursts with a sticker in the middle (the context shows `[スタンプ]`, the reply only what she typed),
  and the friend quoting her last message back inside a longer one (「…」ってまじ？).

Beside them, replies that say something new each time (some news), so a careful
choice still finds pairs. `leaky_systems` writes replies of other "systems" that copy in the same ways.
"""

from __future__ import annotations

import json
import random
from datetime import date, timedelta
from pathlib import Path

PERSONA = "美咲"
FRIEND = "健太"
CATCHPHRASES = [["それな〜", "それな～", "それな!!", "それな！"], ["まじか笑", "まじか 笑", "まじか笑笑"],
                ["ＯＫ！", "OK!", "ok"], ["りょうかいです〜", "りょうかいです!", "りょうかいです～"]]
GREETINGS = [("おはよう！", "おはよー！"), ("おつかれ〜", "おつかれさま!"), ("やっほー", "やっほー！元気？")]
FAREWELLS = [("またね", "またね〜"), ("じゃあまた明日", "うん、また明日ね!")]
QUESTIONS = ["最近どう？", "なんかあった？", "今日どうだった？", "元気してた？", "ひま？", "聞いてよ"]
# News: an opener, a subject, what happened. Two replies rarely share more than one part, so the
# replies that say something new are not near copies of one another.
OPENERS = ["そういえば", "聞いて、", "ねえ", "てか", "ちなみに", "まって、", "速報！", "あのね、", "思い出した、", "今日"]
SUBJECTS = ["駅前のパン屋", "バイト先の店長", "うちの猫", "隣の研究室", "弟の友だち", "近所のコンビニ", "図書館の自習室",
            "サークルの先輩", "駅ビルの映画館", "英語の先生", "新しい定食屋", "商店街のくじ", "高校の同級生", "推しのバンド",
            "大家さん", "スマホの画面", "実家の庭の柿", "ゼミの発表", "自転車のタイヤ", "母の手料理"]
HAPPENINGS = ["が閉店するって", "が宝くじ当てたらしい", "がまた脱走した", "で火災報知器が鳴った", "が結婚するんだって",
              "で限定パフェ始まった", "が全部売り切れてた", "の抽選に外れた", "が急に値上げしてた", "がテレビに映ってた",
              "が割れちゃった", "が来週休みになる", "で迷子の犬を見つけた", "が壊れて動かない", "で先生に褒められた"]
ENDINGS = ["", "笑", "！", "〜", "😂", "ね"]
WEEKDAYS = "月火水木金土日"


def _news(rng: random.Random) -> str:
    return f"{rng.choice(OPENERS)}{rng.choice(SUBJECTS)}{rng.choice(HAPPENINGS)}{rng.choice(ENDINGS)}"


def _conversation(rng: random.Random) -> list[tuple[str, str]]:
    """(speaker, text) messages of one conversation; a sticker is `[スタンプ]`."""
    hello, hello_back = rng.choice(GREETINGS)
    messages = [(FRIEND, hello), (PERSONA, hello_back)]
    last_news = None
    for _ in range(rng.randint(3, 6)):
        messages.append((FRIEND, rng.choice(QUESTIONS)))
        roll = rng.random()
        if roll < 0.3:
            messages.append((PERSONA, rng.choice(rng.choice(CATCHPHRASES))))
        elif roll < 0.5:  # a burst: a line, a sticker, a line
            last_news = _news(rng)
            messages += [(PERSONA, last_news), (PERSONA, "[スタンプ]"), (PERSONA, rng.choice(["どう？", "どうかな", "いい？"]))]
        else:
            last_news = _news(rng)
            messages.append((PERSONA, last_news))
        if last_news and rng.random() < 0.3:  # the friend quotes her back
            messages.append((FRIEND, f"「{last_news}」ってまじ？"))
            messages.append((PERSONA, rng.choice(CATCHPHRASES[0] + CATCHPHRASES[1])))
    bye, bye_back = rng.choice(FAREWELLS)
    return messages + [(FRIEND, bye), (PERSONA, bye_back)]


def leaky_line_export(path: Path, *, conversations: int = 40, seed: int = 0) -> Path:
    """A LINE (mobile) export of `conversations` conversations, one a day, a minute or two between messages."""
    rng = random.Random(seed)
    day = date(2024, 4, 1)
    lines = [f"[LINE] {FRIEND}とのトーク履歴", "保存日時：2024/12/31 23:00", ""]
    for _ in range(conversations):
        lines.append(f"{day:%Y/%m/%d}({WEEKDAYS[day.weekday()]})")
        minute = 10 * 60 + rng.randint(0, 300)
        for speaker, text in _conversation(rng):
            minute += rng.randint(1, 2)
            lines.append(f"{minute // 60:02d}:{minute % 60:02d}\t{speaker}\t{text}")
        lines.append("")
        day += timedelta(days=1)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _wider(text: str) -> str:
    """The same words in full-width letters and punctuation, the way another keyboard writes them."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text).replace("〜", "～") + "！"


def leaky_systems(eval_path: Path, folder: Path, seed: int = 0) -> dict[str, Path]:
    """--system files for the samples of `eval_path`, each copying text the blind test shows elsewhere:

    copycat: another sample's real reply; variant: the same, re-spelt (_wider); echo: the last context
    turn; stock: one phrase for everything; fresh: random kana no one said (the only honest one)."""
    rng = random.Random(seed)
    samples = [json.loads(line) for line in eval_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    others = list(range(len(samples)))
    rng.shuffle(others)
    kana = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん"
    replies = {
        "copycat": [samples[others[i]]["target"] for i in range(len(samples))],
        "variant": [_wider(samples[others[-1 - i]]["target"]) for i in range(len(samples))],
        "echo": [s["context"][-1]["text"] if s["context"] else "…" for s in samples],
        "stock": ["そうなんだ" for _ in samples],
        "fresh": ["".join(rng.choice(kana) for _ in range(rng.randint(6, 12))) for _ in samples],
    }
    files = {}
    for name, texts in replies.items():
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"id": s["id"], "reply": t}, ensure_ascii=False) + "\n"
                                       for s, t in zip(samples, texts, strict=True)), encoding="utf-8")
    return files
