"""The daemon serves the memory: what each reply recalls beyond its window, and what it must never recall.

Real parts throughout: a LINE export prepared by `finetune prepare`, an adapter trained from it for a few steps by
`finetune train` (tiny random model), the config, SQLite memory, ReplyMemory, the router and the worker with the
slot engine (or plain generate()). The only stand-in is a stepper wrapper that keeps the prompt ids of each reply
(`backend.prompt_ids`, what the wrapped stepper feeds the model), so a test reads the prompt the model received.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import threading
import time
import urllib.request
from datetime import date, timedelta
from pathlib import Path

import pytest
from conftest import run_cli

from bot.daemon import load_backend, run_daemon
from bot.memory import ConversationMemory
from bot.messages import IncomingMessage
from bot.metrics import BotMetrics
from bot.reply_memory import ReplyMemory, merge_notes
from bot.router import RESET_REPLY, Router
from bot.worker import Worker
from engine.slot_reuse import common_prefix
from finetune.config import BotConfig, ConfigError
from finetune.person_memory import INDEX_FILE, MEMORY_FILE
from finetune.prompt import BLOCK_CLOSE, MEMORY_OPEN, ChatTurn, MemoryNote
from finetune.tiny_model import build_tiny_model
from tests.support.daemon import PERSONA as CONSOLE_PERSONA
from tests.support.daemon import converse, start_bot, write_config

PERSONA, FRIEND = "彩花", "ゆうと"
WEEKDAYS = "月火水木金土日"
# What the persona says about herself, once each, on these days; a changed fact (the job) twice.
FACTS = [
    (date(2023, 1, 10), "出身どこだっけ？", "新潟だよ〜 雪すごいとこ"),
    (date(2023, 5, 10), "仕事なにしてるの？", "銀行の窓口だよ"),
    (date(2024, 5, 10), "最近の仕事はどう？", "転職して物流の会社にいる！"),
]
SMALL_TALK = [("おはよう！今日も一日がんばろう", "おはよ〜がんばろ"), ("週末ひま？", "土曜ならあいてるよ"),
              ("ラーメン食べに行こうよ", "いいね行こう"), ("映画どうだった？", "すごく面白かった"),
              ("明日は雨らしいよ", "傘もってく"), ("駅に着いたよ", "いま向かってる")]
ORIGIN_QUESTION = "そういえば出身どこだっけ？"
JOB_QUESTION = "仕事なにしてるんだっけ？"


def line_export(path: Path) -> Path:
    """A LINE .txt export: the facts among days of small talk, each day its own conversation."""
    days = [(d, [(FRIEND, q), (PERSONA, a)]) for d, q, a in FACTS]
    for i in range(18):
        q, a = SMALL_TALK[i % len(SMALL_TALK)]
        days.append((date(2023, 2, 1) + timedelta(days=23 * i), [(FRIEND, q), (PERSONA, a)]))
    lines = ["[LINE] ゆうととのトーク履歴", "保存日時：2024/06/02 23:10", ""]
    for day, turns in sorted(days):
        lines.append(f"{day:%Y/%m/%d}({WEEKDAYS[day.weekday()]})")
        lines += [f"10:0{i}\t{speaker}\t{text}" for i, (speaker, text) in enumerate(turns)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny base, adapter): the export prepared and trained a few steps with the persona's memory."""
    folder = tmp_path_factory.mktemp("botmem")
    export = line_export(folder / "chat.txt")
    texts = [t for _, q, a in FACTS for t in (q, a)] + [t for pair in SMALL_TALK for t in pair]
    tiny = build_tiny_model(folder / "tiny", texts + [ORIGIN_QUESTION, JOB_QUESTION, "猫の名前はこむぎだよ"])
    dataset, adapter = folder / "dataset", folder / "adapter"
    done = run_cli("prepare", export, "--persona", PERSONA, "--out", dataset, "--timezone", "Asia/Tokyo")
    assert done.returncode == 0, done.stderr
    done = run_cli("train", dataset, "--base", tiny, "--out", adapter, "--max-steps", "2", "--no-style-eval",
                   "--pack-length", "256", "--batch-tokens", "512", "--eval-every", "0", "--save-every", "1000",
                   "--no-progress")
    assert done.returncode == 0, done.stderr
    assert json.loads((adapter / "bunshin.json").read_text(encoding="utf-8"))["memory"]["notes"] == 3
    assert (adapter / MEMORY_FILE).is_file() and (adapter / INDEX_FILE).is_file()
    return tiny, adapter


class RecordingStepper:
    """The backend's own stepper (slot engine or plain generate()), keeping the prompt ids of every admitted reply:
    `backend.prompt_ids(turns, memory)`, what the wrapped stepper feeds the model."""

    def __init__(self, inner, backend) -> None:
        self.inner, self.backend = inner, backend
        self.capacity = inner.capacity
        self.prompts: list[list[int]] = []

    @property
    def busy(self) -> int:
        return self.inner.busy

    def admit(self, key, turns, memory=()) -> None:
        self.prompts.append(self.backend.prompt_ids(turns, memory))
        self.inner.admit(key, turns, memory)

    def step(self):
        return self.inner.step()

    def abort(self):
        return self.inner.abort()

    def release(self) -> None:
        self.inner.release()


class Recorded:
    """A backend as the daemon builds it (load_backend), its stepper wrapped by RecordingStepper."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.persona = inner.persona
        self.stepper: RecordingStepper | None = None

    def make_stepper(self, capacity: int) -> RecordingStepper:
        self.stepper = RecordingStepper(self.inner.make_stepper(capacity), self.inner)
        return self.stepper

    def text(self, ids: list[int]) -> str:
        tokenizer = self.inner.loaded.tokenizer
        return tokenizer.from_model_text(tokenizer.decode(ids))

    @property
    def last_prompt(self) -> str:
        return self.text(self.stepper.prompts[-1])


def bot_config(folder: Path, model: dict, **sections) -> BotConfig:
    """A config on CPU with short greedy replies; `model` names an adapter (loaded on the base it was trained on,
    the tiny model's folder) or a base."""
    if "adapter" in model:
        manifest = json.loads((Path(model["adapter"]) / "bunshin.json").read_text(encoding="utf-8"))
        model = {"base": manifest["base_model"], **model}
    table = {"model": {"device": "cpu", **model},
             "generation": {"max_new_tokens": 4, "temperature": 0.0},
             "memory": {"path": str(folder / "memory.sqlite3")},
             "limits": {"messages_per_minute": 6000.0, "burst": 1000, "admins": ["discord:alice"]}}
    for name, values in sections.items():
        table.setdefault(name, {}).update(values)
    return BotConfig.from_dict(table, source=str(folder / "bot.toml"))


@contextlib.asynccontextmanager
async def serving(config: BotConfig):
    """The daemon's pieces as run_daemon wires them: memory, ReplyMemory, the backend with the profile, worker, router."""
    memory = ConversationMemory(config.memory.path, keep=config.memory.kept_turns())
    recall = ReplyMemory.from_config(config, memory)
    backend = Recorded(await asyncio.to_thread(load_backend, config, recall.profile))
    worker = Worker(backend, BotMetrics(), max_batch=2)
    await worker.start()
    try:
        yield Router(config, memory, worker, worker.metrics, backend.persona, recall), backend
    finally:
        await worker.stop(10)
        memory.close()


def dm(user: str, text: str, addressed: bool = True) -> IncomingMessage:
    return IncomingMessage("discord", f"dm-{user}", user, user, text, addressed)


def group(user: str, text: str, addressed: bool = True) -> IncomingMessage:
    return IncomingMessage("discord", "group-1", user, user, text, addressed)


def memory_block(prompt: str) -> str:
    """The notes of a prompt ("" without them)."""
    if MEMORY_OPEN not in prompt:
        return ""
    start = prompt.index(MEMORY_OPEN)
    return prompt[start: prompt.index(BLOCK_CLOSE, start) + len(BLOCK_CLOSE)]


FILLER = ["今日は雨だね", "お昼なに食べた？", "電車こんでた", "眠い〜", "コンビニ寄ってく", "宿題おわった？",
          "また明日ね", "お腹すいた", "寒くなってきたね", "駅前にカフェできたって"]


async def chatter(router: Router, make, user: str, n: int) -> None:
    """`n` unaddressed messages: remembered, not answered (the window moves past what came before)."""
    for i in range(n):
        assert await router.answer(make(user, f"{FILLER[i % len(FILLER)]}{i}", addressed=False)) is None


# --------------------------------------------------------------------------- (1) never across chats


async def test_what_a_dm_told_the_bot_never_reaches_a_group_or_another_dm(tmp_path, trained):
    tiny, _ = trained
    config = bot_config(tmp_path, {"base": str(tiny)}, persona={"name": PERSONA},
                        memory={"max_turns": 4, "notes": 3, "recall_keep": 200})
    secret = "こむぎ"
    async with serving(config) as (router, backend):
        await router.answer(dm("alice", f"うちの猫の名前は{secret}だよ"))
        await chatter(router, dm, "alice", 9)  # the fact leaves alice's window
        await router.answer(group("alice", "猫って飼ってる？うちは猫いるよ"))  # the group's own cat talk
        await chatter(router, group, "bob", 9)
        await chatter(router, dm, "bob", 9)
        await router.answer(dm("alice", "猫の名前おぼえてる？"))
        alice = backend.last_prompt
        await router.answer(group("alice", "猫の名前おぼえてる？"))
        in_group = backend.last_prompt
        await router.answer(dm("bob", "猫の名前おぼえてる？"))
        bob = backend.last_prompt
    # alice's DM recalls it from beyond its window: in the notes, not in the turns.
    assert secret in memory_block(alice) and secret not in alice.replace(memory_block(alice), "")
    # The group recalls its own cat talk (recall runs there), and nothing of alice's DM; nor does bob's DM.
    assert "猫って飼ってる" in memory_block(in_group)
    assert secret not in in_group and secret not in bob

    # After a restart (new memory connection, new recall, nothing cached) and after the windows moved on.
    async with serving(config) as (router, backend):
        await chatter(router, group, "bob", 5)
        await router.answer(group("bob", f"{secret}って誰？ 猫の名前おぼえてる？"))
        in_group = backend.last_prompt
        await router.answer(dm("alice", "猫の名前おぼえてる？"))
        alice = backend.last_prompt
        assert secret in memory_block(alice)
        # Said in the group itself now: the group's own turn, never a note taken from alice's DM.
        assert secret not in memory_block(in_group)

        # /reset forgets alice's DM, its recall included.
        assert await router.answer(dm("alice", "/reset")) == RESET_REPLY
        await router.answer(dm("alice", "猫の名前おぼえてる？"))
        assert secret not in backend.last_prompt and MEMORY_OPEN not in backend.last_prompt


# --------------------------------------------------------------------------- (2) a fact said once reaches the prompt


async def test_a_fact_said_once_in_training_reaches_the_prompt_through_recall(tmp_path, trained):
    _, adapter = trained
    config = bot_config(tmp_path, {"adapter": str(adapter)})  # notes = 0: as trained (3)
    async with serving(config) as (router, backend):
        reply = await router.answer(dm("ken", ORIGIN_QUESTION))
        prompt = backend.last_prompt
    assert reply is not None
    # The note, dated, right before the latest message, which the persona's turn follows.
    assert "2023-01-10: ゆうと「出身どこだっけ？」 → 彩花「新潟だよ〜 雪すごいとこ" in memory_block(prompt)
    assert prompt.endswith(f"{BLOCK_CLOSE}\nken: {ORIGIN_QUESTION}\n{PERSONA}: ")


# --------------------------------------------------------------------------- (3) a changed fact: the new value last


async def test_a_changed_fact_comes_oldest_first_with_the_new_value_last(tmp_path, trained):
    _, adapter = trained
    config = bot_config(tmp_path, {"adapter": str(adapter)}, memory={"max_turns": 4})
    async with serving(config) as (router, backend):
        await router.answer(dm("ken", JOB_QUESTION))
        person = memory_block(backend.last_prompt)
        # The chat's own past changes too: where ken lives, told twice, both beyond the window by now.
        await router.answer(dm("ken", "俺いま柏に住んでる", addressed=False))
        await chatter(router, dm, "ken", 3)
        await router.answer(dm("ken", "引っ越して船橋に住んでる", addressed=False))
        await chatter(router, dm, "ken", 9)
        await router.answer(dm("ken", "俺どこに住んでるんだっけ？"))
        chat = memory_block(backend.last_prompt)
    assert person.index("銀行の窓口") < person.index("物流の会社") < person.index(BLOCK_CLOSE)
    last_note = person.splitlines()[-2]
    assert "物流の会社" in last_note  # the newest value closest to the message and the reply
    assert chat.index("柏に住んでる") < chat.index("船橋に住んでる")
    assert "船橋" in chat.splitlines()[-2]


def test_chat_recall_kept_between_messages_equals_a_fresh_one_as_chats_grow_and_are_pruned(tmp_path):
    """The cached index (read in part when the window moves on) recalls what one built from scratch does."""
    import random

    from bot.chat_recall import ChatRecall
    from bot.router import WINDOW_SLACK

    rng = random.Random(3)
    words = ["猫", "こむぎ", "柏", "船橋", "ラーメン", "仕事", "雨", "映画", "新潟", "駅"]
    with ConversationMemory(tmp_path / "m.sqlite3", keep=40) as memory:  # pruned as it goes
        kept = ChatRecall(memory, keep=30, k=3)
        for step in range(150):
            chat = rng.choice(["discord:a", "discord:b", "line:c"])
            memory.append(chat, rng.choice([FRIEND, PERSONA]), "".join(rng.sample(words, 3)) + f"{step}")
            window = memory.recent(chat, 6, slack=WINDOW_SLACK)
            assert kept.notes(chat, window) == ChatRecall(memory, keep=30, k=3).notes(chat, window), step


def test_notes_are_merged_oldest_first_and_each_once():
    said = lambda day, text: MemoryNote(day, (ChatTurn(FRIEND, "どう？"), ChatTurn(PERSONA, text)))  # noqa: E731
    person = [said("2023-05-10", "銀行"), said("2024-05-10", "物流")]
    chat = [said("2024-01-02", "柏"), said("2024-05-10", "物流"), said("2024-06-01", "船橋")]
    merged = merge_notes(person + chat)
    assert [n.turns[-1].text for n in merged] == ["銀行", "柏", "物流", "船橋"]


# --------------------------------------------------------------------------- (4) each can be turned off


@pytest.mark.parametrize(("memory", "recalled"), [
    ({}, {"新潟", "柏"}),
    ({"person": False}, {"柏"}),
    ({"chat_recall": False}, {"新潟"}),
    ({"person": False, "chat_recall": False}, set()),
])
async def test_person_and_chat_recall_are_each_turned_off(tmp_path, trained, memory, recalled):
    _, adapter = trained
    config = bot_config(tmp_path, {"adapter": str(adapter), "engine": "plain"}, memory={"max_turns": 4, **memory})
    async with serving(config) as (router, backend):
        await router.answer(dm("ken", "俺の実家は柏だよ。出身は？", addressed=False))
        await chatter(router, dm, "ken", 9)
        await router.answer(dm("ken", f"柏の話おぼえてる？{ORIGIN_QUESTION}"))
        block = memory_block(backend.last_prompt)
    assert {word for word in ("新潟", "柏") if word in block} == recalled
    assert bool(block) == bool(recalled)


async def test_notes_zero_means_as_trained_and_a_model_trained_without_memory_gets_none(tmp_path, trained):
    tiny, _ = trained
    for notes, block_expected in ((0, False), (2, True)):
        folder = tmp_path / f"notes{notes}"
        folder.mkdir()
        config = bot_config(folder, {"base": str(tiny), "engine": "plain"}, persona={"name": PERSONA},
                            memory={"max_turns": 4, "notes": notes})
        async with serving(config) as (router, backend):
            await router.answer(dm("ken", "俺の実家は柏だよ", addressed=False))
            await chatter(router, dm, "ken", 9)
            await router.answer(dm("ken", "柏の話おぼえてる？"))
            assert bool(memory_block(backend.last_prompt)) is block_expected, notes


async def test_the_profile_opens_every_prompt(tmp_path, trained):
    _, adapter = trained
    profile = tmp_path / "profile.txt"
    profile.write_text("# 彩花のこと\n新潟出身、いまは船橋に住んでる。\n\n猫のこむぎと暮らしてる\n", encoding="utf-8")
    config = bot_config(tmp_path, {"adapter": str(adapter), "engine": "plain"}, memory={"profile": str(profile)})
    async with serving(config) as (router, backend):
        await router.answer(dm("ken", "おはよう"))
        await router.answer(group("bob", ORIGIN_QUESTION))
        await router.answer(dm("ken", "週末ひま？"))
        prompts = [backend.text(ids) for ids in backend.stepper.prompts]
    head = f"［{PERSONA}のプロフィール］\n新潟出身、いまは船橋に住んでる。\n猫のこむぎと暮らしてる\n{BLOCK_CLOSE}\n"
    assert len(prompts) == 3 and all(p.startswith(head) for p in prompts)


def test_an_unusable_profile_or_memory_is_a_config_error_naming_the_file(tmp_path, trained):
    tiny, adapter = trained
    profile = tmp_path / "profile.txt"
    profile.write_text("新潟出身\n猫がいる\n船橋\x07に住んでる\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{profile}:3: control characters.*\[memory\] profile"):
        ReplyMemory.from_config(bot_config(tmp_path, {"adapter": str(adapter)}, memory={"profile": str(profile)}))
    # Only what is turned on is read: a broken index with person = false is not in the way.
    broken = tmp_path / "adapter"
    shutil.copytree(adapter, broken)
    (broken / INDEX_FILE).write_bytes(b"not an index")
    with pytest.raises(ConfigError, match=rf"{INDEX_FILE}: .*rebuild it with `python -m finetune memory rebuild {broken}`"):
        ReplyMemory.from_config(bot_config(tmp_path, {"adapter": str(broken)}))
    off = ReplyMemory.from_config(bot_config(tmp_path, {"adapter": str(broken)}, memory={"person": False}))
    assert off.person is None and not off.recalls


@pytest.mark.parametrize("damage", ["missing", "corrupt", "foreign"])
def test_the_daemon_refuses_a_bad_memory_index_with_exit_2_and_the_rebuild_command(tmp_path, trained, damage):
    tiny, adapter = trained
    broken = tmp_path / "adapter"
    shutil.copytree(adapter, broken)
    index, notes = broken / INDEX_FILE, broken / MEMORY_FILE
    if damage == "missing":
        index.unlink()
    elif damage == "corrupt":
        index.write_bytes(index.read_bytes()[:200])
    else:  # another dataset's notes under this index
        notes.write_text(notes.read_text(encoding="utf-8").replace("銀行", "病院"), encoding="utf-8")
    done = converse(write_config(tmp_path, tiny, model={"adapter": str(broken), "base": str(tiny)}, persona={"name": ""}), ["おはよう"])
    assert done.returncode == 2, done.stderr
    assert f"error: {index}: " in done.stderr
    assert f"rebuild it with `python -m finetune memory rebuild {broken}`" in done.stderr
    assert "Traceback" not in done.stderr and "serving as" not in done.stderr


def test_the_daemon_refuses_a_malformed_profile_with_exit_2_and_file_line(tmp_path, trained):
    tiny, _ = trained
    profile = tmp_path / "profile.txt"
    profile.write_text("新潟出身\n" + "長い" * 150 + "\n", encoding="utf-8")
    done = converse(write_config(tmp_path, tiny, memory={"profile": str(profile)}), ["おはよう"])
    assert done.returncode == 2, done.stderr
    assert f"error: {profile}:2: 300 characters" in done.stderr
    assert "Traceback" not in done.stderr and "serving as" not in done.stderr


# --------------------------------------------------------------------------- (5) the engine still reuses a chat's prefix


async def test_the_slot_engine_reuses_a_chats_prompt_with_memory_in_it(tmp_path, trained):
    _, adapter = trained
    config = bot_config(tmp_path, {"adapter": str(adapter)}, generation={"max_new_tokens": 6})
    questions = [ORIGIN_QUESTION, JOB_QUESTION, "新潟って雪すごいの？"]
    async with serving(config) as (router, backend):
        engine = backend.stepper.inner.engine  # the slot engine itself (not plain generate())
        counts = []
        for question in questions:
            before = (engine.reused_tokens, engine.prefilled_tokens)
            await router.answer(dm("ken", question))
            counts.append((engine.reused_tokens - before[0], engine.prefilled_tokens - before[1]))
        prompts = backend.stepper.prompts
        texts = [backend.text(p) for p in prompts]
    assert all(memory_block(t) for t in texts)  # every prompt carries notes, other ones each time
    assert memory_block(texts[0]) != memory_block(texts[1]) != memory_block(texts[2])
    for n in (1, 2):
        previous, prompt = prompts[n - 1], prompts[n]
        reused, computed = counts[n]
        assert reused + computed == len(prompt)  # the engine was given exactly this prompt
        shared = common_prefix(previous, prompt)
        # The previous prompt up to its notes is shared (they sit before the latest message, after the older turns) ...
        older_turns = texts[n - 1][: texts[n - 1].index(MEMORY_OPEN)]
        assert backend.text(prompt[:shared]).startswith(older_turns[:-1])
        # ... and taken from the cache: only the newer turns and the notes are computed.
        assert reused >= shared and computed <= len(prompt) - shared
    assert questions[0] in texts[1][: texts[1].index(MEMORY_OPEN)]  # by the third message, the first one is reused


# --------------------------------------------------------------------------- the daemon: router, API, metrics


def test_the_daemon_recalls_for_each_console_reply_and_keeps_what_chat_recall_searches(tmp_path, trained):
    tiny, _ = trained
    config = write_config(tmp_path, tiny, memory={"max_turns": 2, "notes": 2, "recall_keep": 40},
                          limits={"messages_per_minute": 6000.0, "burst": 1000})
    proc = start_bot(config)
    try:
        url = None
        while url is None:
            line = proc.stderr.readline()
            assert line, "the daemon ended before serving"
            if "health and metrics on" in line:
                url = line.split(" on ", 1)[1].split(" ")[0]
            if "memory: " in line:
                assert "chat recall (each chat's last 40 turns, up to 2 notes a reply)" in line
        sent = [f"{FILLER[i % len(FILLER)]}{i}" for i in range(12)]
        for text in sent:
            proc.stdin.write(text + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            while line and not line.startswith(f"{CONSOLE_PERSONA}: "):  # the rest of a reply that spans lines
                line = proc.stdout.readline()
            assert line.startswith(f"{CONSOLE_PERSONA}: ")
        with urllib.request.urlopen(url.replace("/healthz", "/metrics"), timeout=5) as r:  # noqa: S310
            metrics = r.read().decode()
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    recalls = re.search(r"^bunshin_recall_seconds_count (\S+)$", metrics, re.M)
    assert recalls and float(recalls[1]) == len(sent)  # the router recalled for every reply
    import sqlite3

    kept = sqlite3.connect(tmp_path / "memory.sqlite3").execute("SELECT COUNT(*) FROM turns").fetchone()[0]
    assert kept == 24  # 4 x max_turns would have pruned it to 8


def _post(url: str, body: dict, key: str) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Authorization": f"Bearer {key}",
                                                                      "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:  # noqa: S310
        return json.loads(r.read())


def test_the_api_recalls_the_personas_memory_and_the_daemons_backend_has_the_profile(tmp_path, trained, monkeypatch,
                                                                                        caplog):
    _, adapter = trained
    profile = tmp_path / "profile.txt"
    profile.write_text("新潟出身\n", encoding="utf-8")
    monkeypatch.setenv("BUNSHIN_TEST_KEY", "sk-memory-test")
    config = bot_config(tmp_path, {"adapter": str(adapter)}, memory={"profile": str(profile)},
                        server={"port": 0}, api={"enabled": True, "key_env": "BUNSHIN_TEST_KEY"})
    loop, stop, ended = asyncio.new_event_loop(), asyncio.Event(), []
    caplog.set_level("INFO", logger="bunshin.daemon")
    thread = threading.Thread(target=lambda: ended.append(loop.run_until_complete(run_daemon(config, stop))))
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not any("OpenAI-compatible API on" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline and thread.is_alive(), "the API never started"
            time.sleep(0.05)
        line = next(r.getMessage() for r in caplog.records if "OpenAI-compatible API on" in r.getMessage())
        url = line.split(" on ", 1)[1].split(" ")[0]
        while True:
            try:
                with urllib.request.urlopen(url.replace("/v1", "/healthz"), timeout=5):  # noqa: S310
                    break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        answer = _post(url + "/chat/completions", {"model": PERSONA, "messages": [
            {"role": "user", "content": ORIGIN_QUESTION}]}, "sk-memory-test")
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        loop.close()
    assert ended == [0]
    # The daemon's prompt, counted by its own backend: the profile, the turn and the persona's notes.
    reference = load_backend(config, ("新潟出身",))
    turns = [ChatTurn("あなた", ORIGIN_QUESTION)]
    notes = ReplyMemory.from_config(config).for_turns(turns)
    assert any("新潟だよ" in t.text for n in notes for t in n.turns)
    assert answer["usage"]["prompt_tokens"] == len(reference.prompt_ids(turns, notes))
    assert len(reference.prompt_ids(turns, notes)) > len(reference.prompt_ids(turns)) > len(load_backend(config).prompt_ids(turns))


def test_kept_turns_follow_chat_recall():
    on = BotConfig.from_dict({"memory": {"max_turns": 20, "recall_keep": 2000}})
    assert on.memory.kept_turns() == 2000
    assert BotConfig.from_dict({"memory": {"max_turns": 1000, "recall_keep": 50}}).memory.kept_turns() == 4000
    assert BotConfig.from_dict({"memory": {"chat_recall": False}}).memory.kept_turns() == 80
    with pytest.raises(ConfigError, match=r"\[memory\] notes: must be >= 0"):
        BotConfig.from_dict({"memory": {"notes": -1}})
