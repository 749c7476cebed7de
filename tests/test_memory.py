"""Conversation memory on a real SQLite file: order, limits, restarts, resets, pruning, bad files."""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime, timedelta, timezone

import pytest

from bot.memory import SCHEMA_VERSION, ConversationMemory, MemoryStoreError
from finetune.records import PLACEHOLDER, ChatRecord

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=9)))


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "state" / "memory.sqlite3"  # the folder does not exist yet


def test_append_and_recent_order_and_limit(db_path):
    with ConversationMemory(db_path) as memory:
        for i in range(5):
            memory.append("discord:1", "健太" if i % 2 else "美咲", f"msg {i}", T0 + timedelta(minutes=i))
        last3 = memory.recent("discord:1", 3)
        assert [r.text for r in last3] == ["msg 2", "msg 3", "msg 4"]
        assert all(isinstance(r, ChatRecord) for r in last3)
        # message_id is the turn's row id: chat recall reads the turns before it (ConversationMemory.earlier).
        assert last3[0] == ChatRecord("美咲", T0 + timedelta(minutes=2), "msg 2", "text", chat="discord:1", message_id="3")
        assert [r.text for r in memory.recent("discord:1", 100)] == [f"msg {i}" for i in range(5)]
        assert memory.recent("discord:1", 0) == []
        assert memory.recent("discord:unknown", 5) == []
    assert db_path.is_file()


def test_earlier_reads_only_that_chats_turns_before_the_window(db_path):
    with ConversationMemory(db_path) as memory:
        for i in range(6):
            memory.append("discord:a", "健太", f"a{i}")
            memory.append("discord:b", "美咲", f"b{i}")
        window = memory.recent("discord:a", 2)
        earlier = memory.earlier("discord:a", window[0].message_id, 3)
        assert [r.text for r in earlier] == ["a1", "a2", "a3"]  # the newest 3 before the window, oldest first
        assert memory.earlier_span("discord:a", window[0].message_id, 3) == (earlier[0].message_id,
                                                                             earlier[-1].message_id)
        assert memory.earlier("discord:b", "1", 3) == [] and memory.earlier_span("discord:b", "1", 3) is None


def test_kind_and_default_time(db_path):
    with ConversationMemory(db_path) as memory:
        before = datetime.now().astimezone()
        memory.append("line:C1", "美咲", "[スタンプ]", kind=PLACEHOLDER)
        (record,) = memory.recent("line:C1", 1)
        assert record.kind == PLACEHOLDER
        assert record.time.tzinfo is not None and before - timedelta(seconds=1) <= record.time <= datetime.now().astimezone()
        with pytest.raises(ValueError, match="unknown kind"):
            memory.append("line:C1", "美咲", "hi", kind="sticker")


def test_survives_restart(db_path):
    memory = ConversationMemory(db_path)
    memory.append("discord:1", "健太", "覚えてる？", T0)
    memory.append("discord:1", "美咲", "うん", T0 + timedelta(seconds=5))
    memory.close()
    with ConversationMemory(db_path) as memory:  # a new process would do exactly this
        assert [(r.speaker, r.text, r.time) for r in memory.recent("discord:1", 10)] == [
            ("健太", "覚えてる？", T0),
            ("美咲", "うん", T0 + timedelta(seconds=5)),
        ]
        assert memory.chats() == 1


def test_committed_without_close(db_path):
    """A crash never closes the connection: a second connection must already see the turn."""
    memory = ConversationMemory(db_path)
    memory.append("discord:1", "健太", "saved?", T0)
    with ConversationMemory(db_path) as other:
        assert [r.text for r in other.recent("discord:1", 1)] == ["saved?"]
    memory.close()


def test_chats_are_separate_and_reset_clears_one(db_path):
    with ConversationMemory(db_path) as memory:
        memory.append("discord:1", "a", "one", T0)
        memory.append("line:C2", "b", "two", T0)
        memory.append("discord:1", "a", "three", T0)
        assert [r.text for r in memory.recent("discord:1", 10)] == ["one", "three"]
        assert [r.text for r in memory.recent("line:C2", 10)] == ["two"]
        assert memory.recent("line:C2", 10)[0].chat == "line:C2"
        assert memory.chats() == 2
        assert memory.reset("discord:1") == 2
        assert memory.recent("discord:1", 10) == []
        assert [r.text for r in memory.recent("line:C2", 10)] == ["two"]
        assert memory.chats() == 1
    with ConversationMemory(db_path) as memory:
        assert memory.recent("discord:1", 10) == [] and memory.chats() == 1


def test_prune_keeps_the_newest(db_path):
    with ConversationMemory(db_path, keep=None) as memory:
        for i in range(10):
            memory.append("c", "a", str(i), T0)
            memory.append("other", "a", str(i), T0)
        assert memory.prune("c", 3) == 7
        assert [r.text for r in memory.recent("c", 100)] == ["7", "8", "9"]
        assert len(memory.recent("other", 100)) == 10
        assert memory.prune("c", 3) == 0
        assert memory.prune("c", 0) == 3 and memory.chats() == 1


def test_append_prunes_automatically(db_path):
    with ConversationMemory(db_path, keep=5) as memory:
        for i in range(100):
            memory.append("c", "a", str(i), T0)
            assert len(memory.recent("c", 1000)) < 2 * 5
        assert memory.recent("c", 5)[-1].text == "99"
    with ConversationMemory(db_path, keep=5) as memory:  # after a restart the first append prunes
        memory.append("c", "a", "100", T0)
        assert [r.text for r in memory.recent("c", 1000)] == ["96", "97", "98", "99", "100"]


def test_garbage_file_is_a_clear_error(tmp_path):
    path = tmp_path / "memory.sqlite3"
    path.write_bytes(b"this is not a database at all, just some bytes " * 100)
    with pytest.raises(MemoryStoreError, match=rf"{path}: not a bunshin memory database: "):
        ConversationMemory(path)
    assert path.read_bytes().startswith(b"this is not a database")  # untouched


def test_someone_elses_database_is_a_clear_error(tmp_path):
    path = tmp_path / "other.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE invoices (id INTEGER)")
    db.close()
    with pytest.raises(MemoryStoreError, match="not a bunshin memory database: it holds other tables"):
        ConversationMemory(path)


def test_newer_schema_is_a_clear_error(db_path):
    ConversationMemory(db_path).close()
    db = sqlite3.connect(db_path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(MemoryStoreError, match=f"schema version {SCHEMA_VERSION + 1} is newer than this bunshin reads"):
        ConversationMemory(db_path)


def test_a_turn_with_an_event_key_is_remembered_once(db_path):
    """A message answered again after a crash carries the same inbox key: memory keeps one copy."""
    with ConversationMemory(db_path) as memory:
        assert memory.append("line:U1", "健太", "届いてる？", event="line:E1") is True
        assert memory.append("line:U1", "健太", "届いてる？", event="line:E1") is False
        assert memory.append("line:U1", "美咲", "うん！", event="reply:line:E1") is True
        assert memory.append("line:U1", "健太", "keyless turns are never deduplicated") is True
        assert memory.append("line:U1", "健太", "keyless turns are never deduplicated") is True
        assert [r.text for r in memory.recent("line:U1", 10)].count("届いてる？") == 1
        assert memory.text_of("reply:line:E1") == "うん！"
        assert memory.text_of("reply:line:E2") is None


def test_a_version_1_file_is_migrated_and_keeps_its_turns(db_path):
    db_path.parent.mkdir(parents=True)
    db = sqlite3.connect(db_path)
    db.executescript("""
        CREATE TABLE turns (id INTEGER PRIMARY KEY, chat_key TEXT NOT NULL, speaker TEXT NOT NULL, text TEXT NOT NULL,
                            kind TEXT NOT NULL, time TEXT NOT NULL);
        CREATE INDEX turns_by_chat ON turns (chat_key, id);
        INSERT INTO turns (chat_key, speaker, text, kind, time) VALUES ('discord:1', '健太', 'まえの話', 'text',
                                                                        '2024-05-01T12:00:00+09:00');
        PRAGMA user_version = 1;
    """)
    db.close()
    with ConversationMemory(db_path) as memory:
        assert [r.text for r in memory.recent("discord:1", 10)] == ["まえの話"]
        assert memory.append("discord:1", "美咲", "覚えてるよ", event="reply:discord:9") is True
        assert memory.append("discord:1", "美咲", "覚えてるよ", event="reply:discord:9") is False
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_wal_mode(db_path):
    with ConversationMemory(db_path):
        db = sqlite3.connect(db_path)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        db.close()


def test_in_memory_database():
    with ConversationMemory(":memory:") as memory:
        memory.append("c", "a", "hi")
        assert memory.chats() == 1


def test_thousand_appends(db_path):
    """Speed sanity, no timing assert: 1000 committed appends, each followed by a context read."""
    with ConversationMemory(db_path, keep=80) as memory:
        start = time.perf_counter()
        for i in range(1000):
            memory.append(f"discord:{i % 7}", "健太", f"message {i}", T0)
            context = memory.recent(f"discord:{i % 7}", 20)
        elapsed = time.perf_counter() - start
        assert context[-1].text == "message 999" and len(context) == 20
        assert memory.chats() == 7
    print(f"1000 append+recent: {elapsed * 1000:.1f} ms in all, {elapsed * 1000:.0f} µs each")


# --- faults: another process's lock, a damaged file ------------------------------------------------------

# Another process holding the write lock (a second bot on the same file, a sqlite3 shell mid-transaction):
# it takes the lock, says so, and releases it when told.
LOCK_HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
db.execute("INSERT INTO turns (chat_key, speaker, text, kind, time) VALUES ('other', 'x', 'theirs', 'text', '2024-01-01T00:00:00')")
print("locked", flush=True)
sys.stdin.readline()
db.execute("COMMIT")
print("released", flush=True)
"""


@pytest.fixture
def lock_holder(db_path):
    import subprocess
    import sys

    ConversationMemory(db_path).close()  # the file exists, with our schema, before the other process locks it
    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(db_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"

    def release():
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "released"

    yield release
    proc.kill()
    proc.wait()


def test_a_file_locked_by_another_process_is_a_clear_error_after_a_bounded_wait(db_path, lock_holder):
    with ConversationMemory(db_path, busy_timeout_s=0.2) as memory:  # it opens: WAL lets it read meanwhile
        started = time.monotonic()
        with pytest.raises(MemoryStoreError) as exc:
            memory.append("discord:1", "健太", "lost?", T0)
        assert time.monotonic() - started < 3  # bounded: the timeout, not forever
        assert str(exc.value).startswith(f"{db_path}: cannot save a turn: the memory file stayed locked by another process")
        assert memory.recent("discord:1", 10) == []  # it says the turn was not saved, and indeed it was not
        lock_holder()
        memory.append("discord:1", "健太", "after the lock", T0)
        assert [r.text for r in memory.recent("discord:1", 10)] == ["after the lock"]
        assert [r.text for r in memory.recent("other", 10)] == ["theirs"]  # the other process's write is kept


def test_a_lock_released_within_the_wait_costs_nothing(db_path, lock_holder):
    import threading

    with ConversationMemory(db_path, busy_timeout_s=30) as memory:
        errors = []

        def append():
            try:
                memory.append("discord:1", "健太", "waited", T0)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        writer = threading.Thread(target=append)
        writer.start()
        lock_holder()
        writer.join(30)
        assert not writer.is_alive() and errors == []
        assert [r.text for r in memory.recent("discord:1", 10)] == ["waited"]


def _overwrite_pages(data: bytes) -> bytes:
    page = 4096
    return data[: 5 * page] + b"\xa5" * (3 * page) + data[8 * page:]  # three pages of the table's b-tree


def _cut_in_half(data: bytes) -> bytes:  # a copy or a disk that stopped half-way
    return data[: len(data) // 2]


@pytest.mark.parametrize("damage", [_overwrite_pages, _cut_in_half])
def test_a_damaged_file_is_a_clear_error_at_open_and_left_untouched(db_path, damage):
    with ConversationMemory(db_path, keep=None) as memory:
        for i in range(3000):
            memory.append(f"discord:{i % 5}", "健太", f"とても大事な会話 {i} " * 3, T0)
    assert db_path.stat().st_size > 20 * 4096
    data = damage(db_path.read_bytes())
    db_path.write_bytes(data)

    with pytest.raises(MemoryStoreError) as exc:
        ConversationMemory(db_path)
    message = str(exc.value)
    assert message.startswith(f"{db_path}: ") and "damaged" in message and "move it aside" in message
    assert db_path.read_bytes() == data  # not repaired, not replaced: the operator decides


async def test_the_router_answers_an_apology_when_memory_is_locked(db_path, lock_holder, caplog):
    import logging

    from bot.messages import IncomingMessage
    from bot.metrics import BotMetrics
    from bot.router import ERROR_REPLY, Router
    from finetune.config import BotConfig

    class NoWorker:
        async def submit(self, *args, **kwargs):
            raise AssertionError("nothing reaches the model without its conversation saved")

    memory = ConversationMemory(db_path, busy_timeout_s=0.2)
    router = Router(BotConfig.from_dict({"persona": {"name": "美咲"}}), memory, NoWorker(), BotMetrics(), "美咲")
    with caplog.at_level(logging.ERROR, logger="bunshin.router"):
        reply = await router.answer(IncomingMessage("discord", "1", "u", "健太", "覚えてる？", addressed=True))
    assert reply == ERROR_REPLY
    assert f"{db_path}: cannot save a turn: the memory file stayed locked" in caplog.text
    lock_holder()
    memory.close()
