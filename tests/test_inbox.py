"""The inbox (bot/inbox.py) on a real SQLite file: what it takes it keeps, once, across reopening, with how far
answering got; it refuses a damaged file by name."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from bot.inbox import Inbox, InboxError
from bot.messages import IncomingMessage


def line_message(event_id: str, text: str = "こんにちは", chat: str = "Uaaa") -> IncomingMessage:
    return IncomingMessage("line", chat, chat, "LINE user", text, True, event_id=event_id,
                           delivery={"kind": "user", "reply_token": f"token-{event_id}", "event_ms": 1_700_000_000_000})


@pytest.fixture
def path(tmp_path):
    return tmp_path / "bot.inbox.sqlite3"


async def test_a_message_is_taken_once_and_a_duplicate_is_refused_even_after_reopening(path):
    inbox = Inbox(path)
    first, again = await inbox.accept([line_message("E1"), line_message("E1")])
    assert first is not None and first.key == "line:E1" and again is None
    (other,) = await inbox.accept([IncomingMessage("discord", "c", "u", "n", "t", True, event_id="E1")])
    assert other is not None  # the same id on another platform is another message
    inbox.finish(first, "replied")
    inbox.close()

    inbox = Inbox(path)
    assert await inbox.accept([line_message("E1")]) == [None]  # answered, and still recognised
    assert [e.key for e in inbox.recovered] == ["discord:E1"]
    inbox.close()


async def test_what_was_left_unfinished_comes_back_in_order_with_its_delivery_data_and_attempts(path):
    inbox = Inbox(path)
    entries = await inbox.accept([line_message(f"E{i}", text=f"メッセージ{i}") for i in range(5)])
    await inbox.attempt(entries[1], "reply", "返事1")
    await inbox.attempt(entries[1], "reply", "返事1")  # once per method
    await inbox.attempt(entries[1], "push", "返事1")
    inbox.finish(entries[3], "replied")
    inbox.close()

    inbox = Inbox(path)
    recovered = inbox.recovered
    assert [e.message.text for e in recovered] == ["メッセージ0", "メッセージ1", "メッセージ2", "メッセージ4"]
    assert all(e.recovered and e.recoveries == 1 for e in recovered)
    assert recovered[0].message.delivery == {"kind": "user", "reply_token": "token-E0", "event_ms": 1_700_000_000_000}
    assert recovered[0].message.event_id == "E0" and recovered[0].message.addressed
    assert recovered[1].reply == "返事1" and [m for m, _ in recovered[1].attempts] == ["reply", "push"]
    assert recovered[1].attempted("reply") <= recovered[1].attempted("push")
    assert recovered[0].reply is None and recovered[0].attempted("reply") is None
    inbox.close()
    assert [e.recoveries for e in Inbox(path).recovered] == [2, 2, 2, 2]  # each start counts


async def test_an_answered_entry_keeps_no_text(path):
    inbox = Inbox(path)
    (entry,) = await inbox.accept([line_message("E1", text="ひみつの話")])
    await inbox.attempt(entry, "reply", "ひみつの返事")
    inbox.finish(entry, "replied")
    assert await inbox.counts() == {"replied": 1}
    inbox.close()
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT text, reply, delivery, user_name, outcome FROM entries").fetchone()
    assert row == ("", None, "{}", "", "replied")


async def test_writes_from_many_tasks_at_once_are_all_committed(path):
    inbox = Inbox(path)
    results = await asyncio.gather(*(inbox.accept([line_message(f"E{i}", chat=f"U{i % 7}")]) for i in range(400)))
    assert all(entry is not None for (entry,) in results)
    for (entry,) in results[:100]:
        inbox.finish(entry, "replied")
    inbox.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*), COUNT(finished_at) FROM entries").fetchone() == (400, 100)


def test_every_commit_reaches_the_disk(path):
    """synchronous=FULL in WAL mode: each commit fsyncs the log, so an acknowledged event outlives a power cut."""
    inbox = Inbox(path)
    assert inbox._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert inbox._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    inbox.close()


async def test_answered_entries_are_pruned_after_their_time(path):
    inbox = Inbox(path, done_keep_s=0)
    entries = await inbox.accept([line_message(f"E{i}") for i in range(1001)])
    for entry in entries:
        inbox.finish(entry, "replied")  # the 1000th finish makes its commit prune
    inbox.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM entries").fetchone()[0] < 1001


async def test_finished_marks_are_committed_without_being_waited_for_and_kept_by_close(path):
    inbox = Inbox(path)
    entries = await inbox.accept([line_message(f"E{i}") for i in range(3)])
    inbox.finish(entries[0], "replied")
    assert await inbox.counts() == {"replied": 1, "unfinished": 2}  # queued before the count: committed first
    inbox.finish(entries[1], "quiet")
    inbox.close()  # the lingering mark is committed, not lost
    with sqlite3.connect(path) as db:
        assert dict(db.execute("SELECT event_id, COALESCE(outcome, '') FROM entries")) == {
            "E0": "replied", "E1": "quiet", "E2": ""}
    with pytest.raises(InboxError, match="closed"):
        inbox.finish(entries[2], "replied")


async def test_a_closed_inbox_refuses_writes_by_name(path):
    inbox = Inbox(path)
    inbox.close()
    with pytest.raises(InboxError, match=str(path)):
        await inbox.accept([line_message("E1")])


def test_a_file_that_is_not_an_inbox_is_a_clear_error_naming_it(path):
    path.write_bytes(b"this is not a database, it is a shopping list\n" * 100)
    with pytest.raises(InboxError) as exc:
        Inbox(path)
    assert str(path) in str(exc.value) and "move it aside" in str(exc.value)
    assert path.read_bytes().startswith(b"this is not a database")  # left as it was


def test_the_inbox_lives_next_to_the_memory_file():
    assert Inbox.path_for("data/bunshin-memory.sqlite3") == "data/bunshin-memory.inbox.sqlite3"
    assert Inbox.path_for(":memory:") == ":memory:"


async def test_a_write_that_fails_fails_its_batch_by_name_and_the_inbox_goes_on(path):
    inbox = Inbox(path)
    unstorable = IncomingMessage("line", "U1", "U1", "n", "t", True, event_id="bad", delivery={"token": object()})
    with pytest.raises(InboxError, match=f"{path}: cannot write the inbox"):
        await inbox.accept([line_message("E1"), unstorable])
    (entry,) = await inbox.accept([line_message("E1")])  # rolled back with its batch: taken now, once
    assert entry is not None
    inbox.close()
    assert [e.key for e in Inbox(path).recovered] == ["line:E1"]
