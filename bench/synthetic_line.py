"""Write a synthetic LINE talk-history export with a given number of lines.

The mix looks like a real group chat: date lines each day, mostly one-line texts, stickers and
photos, some quoted multi-line messages (with `""` escapes and look-alike lines inside), and a
few system lines. Deterministic for a given seed, so runs compare.
"""

from __future__ import annotations

import argparse
import random
from datetime import date, timedelta
from pathlib import Path

NAMES = ["佐藤", "鈴木 花子", "Ken", "たかし", "山の会のみんな"]
TEXTS = [
    "おはよう", "今日どうする？", "りょ", "www", "それな", "了解です！明日10時に駅で",
    "まじか😂", "(emoji)(emoji)", "https://example.com/a?b=1 これ見て", "いいね👍", "ねむい…",
    "えっ\tタブ入り", "今から出る", "何時に着く？", "ありがとう！助かった", "ｶﾀｶﾅ半角も",
]
WEEKDAYS = "月火水木金土日"


def write_export(path: Path, n_lines: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    day = date(2019, 1, 1)
    out = ["[LINE] 山の会のトーク履歴", "保存日時：2024/03/10 22:41", "", f"{day:%Y/%m/%d}({WEEKDAYS[day.weekday()]})"]
    minute = 0
    while len(out) < n_lines:
        if minute >= 23 * 60 or rng.random() < 0.01:
            day += timedelta(days=1)
            minute = rng.randrange(0, 300)
            out.append("")
            out.append(f"{day:%Y/%m/%d}({WEEKDAYS[day.weekday()]})")
            continue
        minute += rng.randrange(0, 4)
        t = f"{min(minute, 1439) // 60:02d}:{min(minute, 1439) % 60:02d}"
        r = rng.random()
        name = rng.choice(NAMES)
        if r < 0.80:
            out.append(f"{t}\t{name}\t{rng.choice(TEXTS)}")
        elif r < 0.90:
            out.append(f"{t}\t{name}\t{rng.choice(['[スタンプ]', '[写真]', '[動画]', '☎ 通話時間 1:23'])}")
        elif r < 0.97:
            out.append(f'{t}\t{name}\t"一行目')
            out.append("2023/05/02(火)")
            out.append(f'12:00\t{name}\t""引用""です')
            out.append('"')
        else:
            out.append(f"{t}\t\t{name}が参加しました。")
    text = "\n".join(out[:n_lines])
    path.write_text(text, encoding="utf-8")
    return min(len(out), n_lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(write_export(a.out, a.lines, a.seed))
