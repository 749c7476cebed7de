"""Benchmark: the persona's memory at 100,000 messages: building its index, and recalling notes for a reply.

Goals (issue 22): recall under 5 ms per reply at 100,000 messages; the index built in under 10 s (CPU).

The notes are made-up chat lines with the spread of a real chat's vocabulary: everyday phrases, names,
places, foods, numbers, English words and emoji in many combinations, so common bigrams (って, だよ) are in
a large share of the notes, as they are in real chats, and rare ones (a place, a name) in a few. Each query
is what recall() gets for a reply: the conversation's latest three turns, answered with k = 3 notes.

The recall figures are per reply: over `--repeats` passes through the same `--queries` conversations, the
spread (min/median/max) of each pass's median, and the percentiles of all replies together. The machine's load
average is kept at the start and end: other work on a shared machine inflates every figure. `--baseline` copies
the summary of an earlier result (another commit run on the same machine, say) into this one, for comparison.

    python bench/memory_recall.py          # writes bench/results/memory_recall.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from finetune.person_memory import MemoryEntry, PersonMemory  # noqa: E402
from finetune.prompt import ChatTurn  # noqa: E402
from finetune.recall_index import RecallIndex  # noqa: E402

GOAL_RECALL_MS = 5.0
GOAL_BUILD_S = 10.0

NAMES = ["ゆうと", "さくら", "健太", "美咲", "翔太", "花子", "Ken", "Mika", "たかし", "柏木", "小林", "佐藤"]
PLACES = ["新潟", "柏", "船橋", "東京", "大阪", "京都", "札幌", "博多", "横浜", "仙台", "名古屋", "渋谷", "池袋",
          "吉祥寺", "鎌倉", "箱根", "沖縄", "金沢", "広島", "神戸"]
THINGS = ["ラーメン", "カレー", "映画", "ライブ", "仕事", "会議", "猫", "犬", "旅行", "ゲーム", "コーヒー", "電車",
          "餃子", "寿司", "焼肉", "カフェ", "本", "漫画", "アニメ", "ドラマ", "ボルダリング", "ヨガ", "ジム", "バイト",
          "レポート", "テスト", "誕生日", "飲み会", "花火", "温泉", "スマホ", "パソコン", "Switch", "iPhone"]
WORDS = ["meeting", "deadline", "weekend", "coffee", "train", "party", "game", "movie", "lunch", "project"]
PATTERNS = [
    "{p}に行ってきた！{t}がよかった", "{n}と{t}の話してた", "明日{p}で{t}しよう", "今日の{t}まじで疲れたw",
    "{t}好きすぎる", "{n}さん、{p}のお土産ありがとう〜", "そういえば{t}どうなった？", "了解です！{p}駅に{h}時で",
    "え、{n}も{t}行くの？", "おやすみ〜", "それな", "わかる、{t}は{p}が一番", "{h}時に{p}ね", "{t}の{w}どうする？",
    "{n}に{t}貸したままだった笑", "{p}の{t}、{h}00円だった", "来週の{t}、{n}来れる？", "{w} is at {h}",
    "{t}と{t2}どっちがいい？", "昨日{p}で{n}に会ったよ", "{t}買った！", "ねむい…{t}あるのに", "{p}寒すぎ🥶",
]


def make_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = rng.choice(PATTERNS).format(
            n=rng.choice(NAMES), p=rng.choice(PLACES), t=rng.choice(THINGS), t2=rng.choice(THINGS),
            w=rng.choice(WORDS), h=rng.randint(1, 23))
        out.append(text + rng.choice(["", "！", "w", "😂", "…", "笑", "〜"]))
    return out


def make_memory(n: int, seed: int) -> tuple[PersonMemory, float]:
    """A PersonMemory of n notes (each answering a friend's line), and the seconds its index took to build."""
    texts = make_texts(2 * n, seed)
    start = datetime(2020, 1, 1, tzinfo=timezone.utc)
    entries = [
        MemoryEntry(i, start + timedelta(minutes=7 * i), start + timedelta(minutes=7 * i - 3), "bench",
                    (ChatTurn(NAMES[i % len(NAMES)], texts[2 * i]),), texts[2 * i + 1], "美咲")
        for i in range(n)
    ]
    began = time.perf_counter()
    index = RecallIndex.build([e.search_text() for e in entries])
    return PersonMemory(entries, index), time.perf_counter() - began


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notes", type=int, default=100_000)
    parser.add_argument("--builds", type=int, default=5, help="index builds timed")
    parser.add_argument("--queries", type=int, default=2000, help="conversations recalled for in each pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes through the conversations")
    parser.add_argument("--baseline", type=Path, help="an earlier result whose summary to keep beside this one")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "memory_recall.json")
    args = parser.parse_args()
    load_at_start = _load()

    builds = []
    for run in range(args.builds):
        memory, seconds = make_memory(args.notes, seed=run)
        builds.append(seconds)
    rng = random.Random(7)
    conversations = [[ChatTurn(rng.choice(NAMES), t) for t in make_texts(3, seed=10_000 + i)] for i in range(args.queries)]
    for turns in conversations[:50]:  # warm the caches
        memory.recall(turns, 3)
    latencies = []
    pass_medians = []
    recalled = 0
    for _ in range(args.repeats):
        this_pass = []
        for turns in conversations:
            began = time.perf_counter()
            found = memory.recall(turns, 3)
            this_pass.append((time.perf_counter() - began) * 1000)
            recalled += len(found)
        pass_medians.append(statistics.median(this_pass))
        latencies += this_pass
    latencies.sort()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": f"the persona's memory at {args.notes:,} notes: index build and recall per reply",
        "produced_by": " ".join(["python bench/memory_recall.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "device": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)),
                   "python": platform.python_version(), "os": platform.platform(),
                   # 1-, 5- and 15-minute load averages: above the core count, other work shares the CPU
                   "load_average_at_start": load_at_start, "load_average_at_end": _load()},
        "goals": {"recall_ms_per_reply": GOAL_RECALL_MS, "build_s": GOAL_BUILD_S},
        "index": {"notes": args.notes, "terms": int(len(memory.index.terms)), "postings": int(len(memory.index.postings_doc))},
        "build_s": {"runs": [round(b, 3) for b in builds], "min": round(min(builds), 3),
                    "median": round(statistics.median(builds), 3), "max": round(max(builds), 3)},
        "recall_ms": {"queries": len(latencies), "k": 3, "repeats": args.repeats,
                      "pass_median": {"min": round(min(pass_medians), 3), "median": round(statistics.median(pass_medians), 3),
                                      "max": round(max(pass_medians), 3)},
                      "min": round(latencies[0], 3),
                      "median": round(statistics.median(latencies), 3),
                      "p95": round(latencies[int(0.95 * len(latencies))], 3), "max": round(latencies[-1], 3),
                      "notes_per_reply": round(recalled / len(latencies), 2)},
    }
    if args.baseline:
        earlier = json.loads(args.baseline.read_text(encoding="utf-8"))
        result["baseline"] = {k: earlier.get(k) for k in ("git_commit", "date", "device", "build_s", "recall_ms")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("build_s", "recall_ms")}, ensure_ascii=False))


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


if __name__ == "__main__":
    main()
