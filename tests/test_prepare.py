"""`finetune prepare` end to end on a mixed LINE + Discord input with an aliased persona."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import EXAMPLES, run_cli

LINE = EXAMPLES / "line_demo.txt"
DISCORD = EXAMPLES / "discord_demo.json"


def _load(out: Path) -> tuple[list[dict], list[dict], dict]:
    train = [json.loads(x) for x in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    held_out = [json.loads(x) for x in (out / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    return train, held_out, stats


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[list[dict], list[dict], dict]:
    out = tmp_path_factory.mktemp("prep") / "ds"
    proc = run_cli("prepare", LINE, DISCORD, "--persona", "美咲", "--alias", "misaki",
                   "--timezone", "Asia/Tokyo", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "train /" in proc.stdout
    return _load(out)


def _by_target(samples: list[dict]) -> dict[str, dict]:
    return {s["target"]: s for s in samples}


def test_alias_merges_persona_across_platforms(dataset):
    train, held_out, stats = dataset
    samples = train + held_out
    sources = {s["source"].split("#")[0] for s in samples}
    assert sources == {"line_demo.txt", "discord_demo.json"}
    assert {s["persona"] for s in samples} == {"美咲"}
    speakers = {c["speaker"] for s in samples for c in s["context"]}
    # The Discord account name `misaki` is the persona's alias: it appears as 美咲, never as itself.
    assert "misaki" not in speakers
    assert {"美咲", "健太", "ryo_k", "sora"} <= speakers
    assert [i["format"] for i in stats["inputs"]] == ["line", "discord-json"]


def test_burst_is_one_target_and_context_is_the_earlier_turns(dataset):
    train, held_out, _ = dataset
    sample = _by_target(train + held_out)["回復役やるね\nポーション持ってく"]
    assert sample["context"] == [
        {"speaker": "ryo_k", "text": "今日のボス戦いける人いる？"},
        {"speaker": "美咲", "text": "いけるよ〜21時からなら"},
        {"speaker": "sora", "text": "おれも！"},
        {"speaker": "ryo_k", "text": "助かる、装備そろえとく"},
    ]
    line_sample = _by_target(train + held_out)["あーそれ気になってた笑"]
    # A sticker in the same burst stays out of the target but the quoted 3-line message is context.
    assert line_sample["context"][-1] == {"speaker": "健太", "text": "これ\n<URL>\n評判いいらしい"}
    later = _by_target(train + held_out)["りょ！たのしみ"]
    assert {"speaker": "美咲", "text": "[スタンプ]\nあーそれ気になってた笑"} in later["context"]


def test_placeholders_and_system_lines_never_become_targets(dataset):
    train, held_out, stats = dataset
    targets = [s["target"] for s in train + held_out]
    assert not any(t.startswith("[") or "☎" in t for t in targets)
    everything = json.dumps(train + held_out, ensure_ascii=False)
    assert "Joined the server." not in everything
    assert "アルバム" not in everything  # the LINE album notice is a system line
    # 美咲's 13:11 photo follows her own 13:10 text in one burst; no sample is made of the photo alone,
    # and her sticker-only or photo-only turns are counted as skipped.
    assert stats["skipped"]["placeholder_only"] == 0
    assert stats["system_lines"] == 2


def test_personal_data_is_redacted_and_counted(dataset):
    train, held_out, stats = dataset
    everything = json.dumps(train + held_out, ensure_ascii=False)
    for leaked in ("example.com", "misaki@example.com", "03-1234-5678", "150-0001"):
        assert leaked not in everything
    by_target = _by_target(train + held_out)
    assert "でしょ〜笑 連絡は <EMAIL> まで" in by_target
    assert "おはよー！えっとね\n<POSTCODE> の近くのとこ。電話は<PHONE>だって" in by_target
    assert stats["redactions"] == {
        "url": 1, "email": 1, "phone": 1, "postal_code": 1, "address": 0, "card": 0, "my_number": 0,
    }


def test_split_is_by_time_with_whole_conversations(dataset):
    train, held_out, stats = dataset
    assert held_out, "the latest conversation should be held out"
    assert max(s["time"] for s in train) < min(s["time"] for s in held_out)
    # The latest conversation is Discord's 2024-06-05 evening: all of it is in eval, none in train.
    assert {s["target"] for s in held_out} == {"明日はバイトだから無理かも😢\n週末ならいける！", "おっけー、おやすみ"}
    assert stats["samples"] == {"train": len(train), "eval": len(held_out)}


def test_exclude_speaker_removes_every_word_of_theirs(tmp_path):
    out = tmp_path / "ds"
    proc = run_cli("prepare", LINE, DISCORD, "--persona", "美咲", "--alias", "misaki", "--exclude-speaker", "sora",
                   "--out", out, "--timezone", "Asia/Tokyo")
    assert proc.returncode == 0, proc.stderr
    train, held_out, stats = _load(out)
    everything = json.dumps(train + held_out, ensure_ascii=False)
    assert "sora" not in everything and "おれも！" not in everything
    assert stats["excluded_messages"] == 2  # "おれも！" and the attachment-only message


def test_same_export_twice_gives_the_same_samples(tmp_path, dataset):
    out = tmp_path / "ds"
    proc = run_cli("prepare", LINE, LINE, DISCORD, "--persona", "美咲", "--alias", "misaki", "--out", out,
                   "--timezone", "Asia/Tokyo")
    assert proc.returncode == 0, proc.stderr
    train, held_out, stats = _load(out)
    once = dataset[0] + dataset[1]
    assert sorted(s["id"] for s in train + held_out) == sorted(s["id"] for s in once)
    assert stats["skipped"]["duplicate"] == sum(1 for s in once if s["source"].startswith("line_demo.txt"))


def test_a_10_mb_message_is_skipped_not_fatal(tmp_path):
    export = tmp_path / "huge.txt"
    huge = "あ" * (10 * 1024 * 1024 // 3)
    export.write_text(
        "2024/01/01(月)\n10:00\tA\tねえ\n10:01\tB\t" + huge + "\n10:02\tA\tながっ\n10:03\tB\tごめん\n",
        encoding="utf-8",
    )
    out = tmp_path / "ds"
    proc = run_cli("prepare", export, "--persona", "B", "--out", out)
    assert proc.returncode == 0, proc.stderr
    train, held_out, stats = _load(out)
    assert stats["skipped"]["too_long"] == 1
    (sample,) = train + held_out
    assert sample["target"] == "ごめん"
    # In context the huge turn is cut to --max-turn-chars, keeping its end.
    assert len(sample["context"][1]["text"]) == 1000 and sample["context"][1]["text"].startswith("…")


def test_data_package_adds_persona_only_samples_and_skips_what_the_export_has(tmp_path):
    package = tmp_path / "package"
    (package / "Account").mkdir(parents=True)
    (package / "Account" / "user.json").write_text(json.dumps({"id": "300000000000000001", "username": "misaki"}))
    same_channel = package / "Messages" / "c1100000000000000001"
    other_channel = package / "Messages" / "c1200000000000000009"
    for folder in (same_channel, other_channel):
        folder.mkdir(parents=True)
    (package / "Messages" / "index.json").write_text(json.dumps({"1100000000000000001": "ボス戦", "1200000000000000009": "DM"}))
    (same_channel / "channel.json").write_text(json.dumps({"id": "1100000000000000001", "type": "GUILD_TEXT"}))
    (other_channel / "channel.json").write_text(json.dumps({"id": "1200000000000000009", "type": "DM"}))
    # Two messages the DiscordChatExporter export already has (same ids), newest first as packages are.
    (same_channel / "messages.json").write_text(json.dumps([
        {"ID": 1245000000000000005, "Timestamp": "2024-06-03 11:05:00", "Contents": "回復役やるね", "Attachments": ""},
        {"ID": 1245000000000000002, "Timestamp": "2024-06-03 11:02:40", "Contents": "いけるよ〜21時からなら", "Attachments": ""},
    ], ensure_ascii=False), encoding="utf-8")
    (other_channel / "messages.json").write_text(json.dumps([
        {"ID": 1250000000000000001, "Timestamp": "2024-05-01 03:00:00", "Contents": "ひとりごと、今日は早起きした", "Attachments": ""},
    ], ensure_ascii=False), encoding="utf-8")

    out = tmp_path / "ds"
    proc = run_cli("prepare", DISCORD, package, "--persona", "misaki", "--out", out, "--eval-fraction", "0")
    assert proc.returncode == 0, proc.stderr
    train, held_out, stats = _load(out)
    assert stats["package_messages_also_in_exports"] == 2
    by_target = _by_target(train + held_out)
    # The package's own message is style without context: no one else's words came with it.
    assert by_target["ひとりごと、今日は早起きした"]["context"] == []
    # The duplicated ones appear once, from the export, with their real context.
    assert sum(1 for s in train + held_out if s["target"] == "いけるよ〜21時からなら") == 1
    assert by_target["いけるよ〜21時からなら"]["context"] == [{"speaker": "ryo_k", "text": "今日のボス戦いける人いる？"}]


def _inspected(path: Path) -> dict:
    proc = run_cli("inspect", "--json", path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_stats_count_what_each_input_gave(dataset):
    train, held_out, stats = dataset
    for item, path in zip(stats["inputs"], (LINE, DISCORD), strict=True):
        assert item["path"] == str(path)
        # Read, as inspect counts it; the persona's text messages under its name or its alias.
        seen = _inspected(path)
        assert item["records"] == item["text"] + item["placeholder"] + item["system"]
        assert item["records"] == seen["system"] + sum(c["text"] + c["placeholder"] for c in seen["speakers"].values())
        assert item["persona_messages"] == sum(seen["speakers"].get(n, {}).get("text", 0) for n in ("美咲", "misaki")) > 0
        # Contributed: the samples whose source is this file, counted from the written files.
        assert item["samples"] == {
            "train": sum(1 for s in train if s["source"].split("#")[0] == path.name),
            "eval": sum(1 for s in held_out if s["source"].split("#")[0] == path.name),
        }
    assert sum(i["samples"]["train"] for i in stats["inputs"]) == stats["samples"]["train"] == len(train)
    assert sum(i["samples"]["eval"] for i in stats["inputs"]) == stats["samples"]["eval"] == len(held_out)


def test_inputs_of_the_same_name_are_counted_apart_and_the_summary_shows_them(tmp_path):
    # Two copies of one export under one file name: every sample of the second is a duplicate of the first's,
    # so all go to the first input (by position, not by name) and the second contributed none.
    first, second = tmp_path / "a" / "chat.txt", tmp_path / "b" / "chat.txt"
    for copy in (first, second):
        copy.parent.mkdir()
        copy.write_bytes(LINE.read_bytes())
    out = tmp_path / "out"
    proc = run_cli("prepare", first, second, "--persona", "美咲", "--timezone", "Asia/Tokyo", "--out", out)
    assert proc.returncode == 0, proc.stderr
    train, held_out, stats = _load(out)
    a, b = stats["inputs"]
    assert a["persona_messages"] == b["persona_messages"] > 0
    assert a["samples"]["train"] + a["samples"]["eval"] == len(train) + len(held_out) > 0
    assert b["samples"] == {"train": 0, "eval": 0} and stats["skipped"]["duplicate"] == len(train) + len(held_out)
    lines = proc.stdout.splitlines()
    for item in (a, b):
        assert (f"  {item['path']} (line): {item['records']} records, {item['persona_messages']} text messages by 美咲 -> "
                f"{item['samples']['train']} train / {item['samples']['eval']} eval samples") in lines
