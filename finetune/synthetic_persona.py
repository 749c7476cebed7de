"""`finetune synth-persona OUT`: a made-up person's LINE group export, with facts to probe.

Nobody's real chats can ship with bunshin or sit in its tests, yet "does the clone know the person" needs a
person whose facts are known. This writes two years of a four-person LINE group (phone export format) in which
彩花 (the persona) talks in her own manner (〜じゃん, 笑, まじで, emoji) and, now and then, says something about
herself. Her facts are the hard cases of real chats:

- stated sparsely: each fact comes up one to three times in two years, mostly asked by a friend, sometimes in
  passing; the rest is chit-chat;
- changed over time: her job, where she lives, the game she plays and her phone change partway through;
  after the change she says the new value, before it the old one;
- never stated: her blood type, height, favourite colour and season, the family car, what she cooks best
  are never said; when friends ask about something she never talks about, she deflects.

`probes.jsonl` asks about every fact in other words than the chats (on the same topic word, as a friend would
ask: 仕事, 猫, 出身; probes.py scores the replies), and
`facts.json` lists the facts and when each changed. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

from .atomic_output import atomic_directory

PERSONA = "彩花"
FRIENDS = ("ゆうと", "さくら", "健太")
START = date(2023, 1, 6)
END = date(2024, 12, 20)
WEEKDAYS = "月火水木金土日"


@dataclass
class Fact:
    id: str
    asks: tuple[str, ...]  # how friends ask in the chats
    probe_asks: tuple[str, ...]  # how the probes ask: wordings the chats never use
    values: tuple[tuple[date, tuple[str, ...]], ...]  # (from this day, what she says) in time order
    right: tuple[str, ...] = ()  # strings that mark the latest value in a reply
    stale: tuple[str, ...] = ()  # strings that mark an older value
    wrong: tuple[str, ...] = ()
    mentions: tuple[tuple[date, str], ...] = ()  # said in passing, unasked
    times_asked: int = 2


FACTS: tuple[Fact, ...] = (
    Fact("hometown", ("出身どこだっけ？", "地元どこなの？"), ("出身の県ってどこだっけ？", "地元ってどのへん？"),
         ((START, ("新潟だよ〜 雪やばいとこ笑", "地元は新潟！米がうまいとこ")),),
         right=("新潟",), wrong=("秋田", "長野", "富山", "福島", "山形", "北海道"),
         mentions=((date(2023, 12, 28), "年末は新潟帰る〜 雪かき要員笑"),)),
    Fact("cat", ("猫ちゃんの名前なんだっけ？", "猫の名前なに？"), ("おうちの猫ちゃん、名前なんていうの？", "猫の名前もう一回教えて"),
         ((START, ("こむぎだよ〜 ねこのこむぎ🐈", "こむぎって名前！毛が小麦色だから笑")),),
         right=("こむぎ", "コムギ"), wrong=("もち", "ミケ", "タマ", "ルナ", "レオ", "ソラ"),
         mentions=((date(2023, 5, 3), "こむぎが朝から走り回ってて寝れん笑"), (date(2024, 9, 14), "こむぎが新しい家の窓際気に入ってる🐈"))),
    Fact("job", ("仕事なにしてるんだっけ？", "いま何の仕事してるの？"), ("仕事って何系だっけ？", "いまの仕事どんな会社？"),
         ((START, ("銀行の窓口だよ〜 月末まじ地獄笑", "銀行員！お金数えるのはもう慣れた笑")),
          (date(2024, 4, 1), ("転職して物流の会社にいるよ！", "物流の会社で事務やってる〜 残業へって最高"))),
         right=("物流",), stale=("銀行",), wrong=("病院", "学校", "保育", "アパレル", "IT"),
         mentions=((date(2024, 4, 2), "今日から物流の会社で働いてる！緊張した〜"),)),
    Fact("home", ("いまどこ住んでるんだっけ？", "最寄り駅どこ？"), ("いま住んでるのってどこ？", "家の最寄りってどこの駅？"),
         ((START, ("柏だよ〜 駅からちょい歩く", "柏住み！柏駅から10分くらい")),
          (date(2024, 8, 10), ("船橋に引っ越したよ！", "いまは船橋！駅ちかで最高"))),
         right=("船橋",), stale=("柏",), wrong=("松戸", "千葉", "市川", "津田沼", "浦安"),
         mentions=((date(2024, 8, 11), "船橋の新居、段ボールだらけ笑"),)),
    Fact("hobby", ("休みの日なにしてる？", "趣味なんだっけ？"), ("趣味ってなにしてるんだっけ？", "休みの日っていつも何してるの？"),
         ((START, ("ボルダリング行ってる！腕パンパン笑", "ボルダリングだよ〜 登るの楽しい")),),
         right=("ボルダリング", "ボルダ", "クライミング"), wrong=("ヨガ", "テニス", "ランニング", "水泳", "サッカー")),
    Fact("sibling", ("兄弟いるんだっけ？",), ("兄弟って何人？", "兄弟は上？下？"),
         ((START, ("弟がひとりいるよ〜 生意気笑",)),), times_asked=1,
         right=("弟",), wrong=("一人っ子", "ひとりっ子", "姉", "兄", "妹")),
    Fact("birthday", ("誕生日いつだっけ？",), ("誕生日って何月何日？", "誕生日近い？いつだっけ"),
         ((START, ("3月14日！ホワイトデーだよ笑",)),), times_asked=1,
         right=("3月14", "3/14", "ホワイトデー"), wrong=("2月14", "5月", "7月", "10月", "12月")),
    Fact("food", ("好きな食べ物なに？", "何食べるのが好き？"), ("一番好きな食べ物なに？", "好きな食べ物ってなんだっけ"),
         ((START, ("餃子！無限に食べれる", "餃子一択じゃん笑")),),
         right=("餃子", "ギョーザ", "ぎょうざ"), wrong=("ラーメン", "寿司", "カレー", "焼肉", "パスタ")),
    Fact("game", ("最近なんのゲームしてる？", "いまハマってるゲームある？"), ("ゲーム最近なにやってる？", "いまやってるゲームなに？"),
         ((START, ("スプラばっかやってる笑", "スプラ！ガチマ沼")),
          (date(2024, 6, 1), ("モンハンにどハマり中！", "最近モンハンしかやってない笑"))),
         right=("モンハン", "モンスターハンター"), stale=("スプラ", "スプラトゥーン"), wrong=("ポケモン", "マイクラ", "あつ森", "ゼルダ")),
    Fact("band", ("好きなアーティスト誰だっけ？",), ("好きなアーティストって誰だっけ？", "よく聴いてるアーティスト誰？"),
         ((START, ("ヨルシカ！ライブ行きたい",)),), times_asked=1,
         right=("ヨルシカ",), wrong=("YOASOBI", "ヨアソビ", "米津", "あいみょん", "King Gnu")),
    Fact("phone", ("スマホなに使ってる？",), ("スマホってどこの機種？", "いまスマホなに使ってる？"),
         ((START, ("iPhoneだよ〜",)), (date(2024, 10, 5), ("Pixelに変えた！カメラいい",))),
         right=("Pixel", "ピクセル"), stale=("iPhone", "アイフォン"), wrong=("Galaxy", "ギャラクシー", "Xperia", "エクスペリア"),
         mentions=((date(2024, 10, 6), "Pixelのカメラで撮ったこむぎ見て🐈"),)),
)

# Never said in the chats; the probes list the values a clone could invent.
NEVER_STATED: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("blood_type", ("血液型なに？", "血液型って何型？"), ("A型", "B型", "O型", "AB型")),
    ("height", ("身長何センチ？", "背ってどのくらい？"), ("150", "153", "155", "158", "160", "162", "165", "168", "170", "cm", "センチ")),
    ("colour", ("好きな色なに？", "何色が好き？"), ("赤", "青", "黄", "緑", "白", "黒", "ピンク", "紫", "水色", "オレンジ")),
    ("season", ("好きな季節いつ？", "四季でどれが好き？"), ("春", "夏", "秋", "冬")),
    ("family_car", ("実家の車なに？", "家の車どこのメーカー？"), ("トヨタ", "ホンダ", "日産", "マツダ", "スバル", "スズキ", "ダイハツ")),
    ("best_dish", ("得意料理なに？", "料理なにが得意？"), ("カレー", "パスタ", "オムライス", "肉じゃが", "ハンバーグ", "唐揚げ", "からあげ")),
)

# Asked in the chats about things she does not talk about: she deflects (what "I don't know" sounds like).
DEFLECTED = (
    ("好きな花なに？", "花とか詳しくないんだよね笑"), ("前世なんだと思う？", "えー考えたことなかった笑"),
    ("ラッキーナンバーある？", "ないかも〜 決めてない笑"), ("好きな星座ある？", "わかんない笑 星座とか詳しくない"),
    ("無人島に一個持ってくなら？", "えーむずい、わかんない笑"), ("理想のタイプは？", "ひみつ〜笑"),
    ("将来住みたい国ある？", "まだ決めてない〜"), ("座右の銘ある？", "ないない笑 考えたことない"),
)

# Her everyday manner, and her friends'.
HER_CHAT = (
    "まじで？笑", "それな〜", "わかる〜", "えーいいじゃん！", "りょ！", "おけ〜", "ねむすぎる🥺", "笑った笑",
    "いいね〜行こ行こ", "今日さむすぎじゃん", "おつかれ〜", "たのしみ！", "やば笑", "ありがと〜助かる🙏",
    "明日ひま〜", "まじで疲れた笑", "うける笑", "ごめん寝てた🥺", "それ気になってた！", "いくいく！",
)
FRIEND_OPENERS = (
    "おつかれ〜", "ひま？", "今週末なにしてる？", "ごはん行かない？", "昨日の見た？", "みんな元気？",
    "駅前に新しいカフェできたらしい", "ねむい", "今日の雨やばくない？", "来週の飲み会どうする？",
)
FRIEND_FOLLOW = (
    "だよね笑", "たしかに", "いいね", "じゃあ土曜で！", "了解〜", "笑", "まじか", "おっけー", "そうなんだ", "へー！",
)
PLANS = (
    ("今度みんなでカラオケ行こ", "行く！ヨルシカ歌いたい"), ("土曜ランチどう？", "いいじゃん！どこいく？"),
    ("映画なに見る？", "アクション系がいいな〜"), ("花火大会いく？", "いきたい！浴衣着よかな"),
)


@dataclass
class _Day:
    day: date
    lines: list[tuple[int, str, str]] = field(default_factory=list)  # (minute, speaker, text)


def value_on(fact: Fact, day: date) -> tuple[str, ...]:
    current = fact.values[0][1]
    for since, said in fact.values:
        if day >= since:
            current = said
    return current


def _fact_days(rng: random.Random, fact: Fact, days: list[date]) -> list[date]:
    """When friends ask about `fact`: spread over the two years, and for a changed fact once before and at least
    once after each change, so the chats hold both the old and the new value."""
    chosen: list[date] = []
    bounds = [since for since, _ in fact.values[1:]]
    if bounds:
        edges = [days[0], *bounds, days[-1] + timedelta(days=1)]
        for lo, hi in zip(edges, edges[1:], strict=False):
            span = [d for d in days if lo <= d < hi]
            chosen += rng.sample(span, min(len(span), max(1, fact.times_asked - 1)))
    else:
        chosen = rng.sample(days, fact.times_asked)
    return sorted(chosen)


def build_days(seed: int) -> list[_Day]:
    rng = random.Random(seed)
    all_days = []
    d = START
    while d <= END:
        all_days.append(d)
        d += timedelta(days=rng.choice((1, 2, 2, 3, 3, 4)))
    days = {d: _Day(d) for d in all_days}

    def chat(day: date, lines: list[tuple[str, str]]) -> None:
        entry = days.setdefault(day, _Day(day))
        minute = rng.randrange(9 * 60, 21 * 60) if not entry.lines else min(entry.lines[-1][0] + rng.randrange(30, 120), 23 * 60)
        for speaker, text in lines:
            minute = min(minute + rng.randrange(1, 6), 23 * 60 + 59)
            entry.lines.append((minute, speaker, text))

    # Chit-chat every day there is a conversation: her manner, without facts.
    for day in all_days:
        friend = rng.choice(FRIENDS)
        lines = [(friend, rng.choice(FRIEND_OPENERS))]
        for _ in range(rng.randrange(1, 4)):
            lines.append((PERSONA, rng.choice(HER_CHAT)))
            if rng.random() < 0.6:
                lines.append((rng.choice(FRIENDS), rng.choice(FRIEND_FOLLOW)))
        if rng.random() < 0.15:
            ask, answer = rng.choice(PLANS)
            lines += [(rng.choice(FRIENDS), ask), (PERSONA, answer)]
        chat(day, lines)
    # Facts: asked by a friend, answered in one of her wordings of the value of that day.
    for fact in FACTS:
        for day in _fact_days(rng, fact, all_days):
            friend = rng.choice(FRIENDS)
            chat(day, [(friend, rng.choice(fact.asks)), (PERSONA, rng.choice(value_on(fact, day))),
                       (rng.choice(FRIENDS), rng.choice(FRIEND_FOLLOW))])
        for day, text in fact.mentions:
            chat(day, [(PERSONA, text), (rng.choice(FRIENDS), rng.choice(FRIEND_FOLLOW))])
    # Questions she never answers with a fact.
    for ask, answer in DEFLECTED:
        chat(rng.choice(all_days), [(rng.choice(FRIENDS), ask), (PERSONA, answer)])
    return [days[d] for d in sorted(days) if days[d].lines]


def export_text(days: list[_Day]) -> str:
    out = ["[LINE] 大学のみんなのトーク履歴", f"保存日時：{END:%Y/%m/%d} 23:30", ""]
    for entry in days:
        out.append(f"{entry.day:%Y/%m/%d}({WEEKDAYS[entry.day.weekday()]})")
        for minute, speaker, text in sorted(entry.lines, key=lambda line: line[0]):
            out.append(f"{minute // 60:02d}:{minute % 60:02d}\t{speaker}\t{text}")
        out.append("")
    return "\n".join(out) + "\n"


def probe_rows() -> list[dict]:
    rows = []
    for fact in FACTS:
        for n, ask in enumerate(fact.probe_asks, 1):
            rows.append({
                "id": f"{fact.id}-{n}", "turns": [{"speaker": FRIENDS[n % len(FRIENDS)], "text": f"ねえ{PERSONA}、{ask}"}],
                "right": list(fact.right), "stale": list(fact.stale), "wrong": list(fact.wrong),
            })
    for fact_id, asks, invented in NEVER_STATED:
        for n, ask in enumerate(asks, 1):
            rows.append({
                "id": f"{fact_id}-{n}", "turns": [{"speaker": FRIENDS[n % len(FRIENDS)], "text": f"ねえ{PERSONA}、{ask}"}],
                "never_stated": True, "wrong": list(invented),
            })
    return rows


def facts_json() -> dict:
    return {
        "persona": PERSONA,
        "stated": {f.id: [{"from": since.isoformat(), "said": list(said)} for since, said in f.values] for f in FACTS},
        "never_stated": [fact_id for fact_id, _, _ in NEVER_STATED],
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="folder to write line_export.txt, probes.jsonl and facts.json into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    days = build_days(args.seed)
    try:
        with atomic_directory(args.out, replace=args.force) as staging:
            (staging / "line_export.txt").write_text(export_text(days), encoding="utf-8")
            (staging / "probes.jsonl").write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in probe_rows()), encoding="utf-8")
            (staging / "facts.json").write_text(json.dumps(facts_json(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    except FileExistsError as exc:
        print(f"error: {exc}", flush=True)
        return 1
    lines = sum(len(d.lines) for d in days)
    print(f"{args.out}: {lines} messages on {len(days)} days by {PERSONA} and {len(FRIENDS)} friends; "
          f"{len(probe_rows())} probes (python -m finetune prepare {args.out}/line_export.txt --persona {PERSONA} ...)")
    return 0
