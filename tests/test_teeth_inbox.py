"""What the inbox promises about the disk, observed on the SQLite connection itself: every commit that holds an
acceptance or a delivery attempt runs with synchronous=FULL (SQLite fsyncs the write-ahead log before COMMIT
returns), also after commits of finished marks alone have switched the connection to NORMAL. The inbox's
connection is wrapped to ask SQLite, right before each COMMIT, which setting is in effect and which writes the
transaction holds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time

import pytest

from bot.inbox import DONE_KEEP_MAX, DONE_KEEP_S, MAX_BATCH, SCHEMA_VERSION, Inbox, InboxError
from bot.messages import IncomingMessage

FULL, NORMAL = 2, 1  # PRAGMA synchronous as SQLite reports it


class WatchedConnection:
    """The inbox's sqlite3 connection, recording for each COMMIT the writes in its transaction and the
    synchronous setting SQLite has in effect as it commits."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.pending: list[str] = []
        self.commits: list[tuple[tuple[str, ...], int]] = []

    def execute(self, sql: str, *args):
        words = sql.split()
        if sql == "COMMIT" and self.pending:
            self.commits.append((tuple(self.pending), self.db.execute("PRAGMA synchronous").fetchone()[0]))
        if sql in ("COMMIT", "ROLLBACK", "BEGIN IMMEDIATE"):
            self.pending = []
        elif words[0] == "INSERT":
            self.pending.append("accept")
        elif words[0] == "UPDATE" and "reply" in words[3]:
            self.pending.append("attempt")
        elif words[0] == "UPDATE" and "finished_at" in words[3]:
            self.pending.append("finish")
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


def message(event_id: str) -> IncomingMessage:
    return IncomingMessage("line", "Uaaa", "Uaaa", "LINE user", "こんにちは", True, event_id=event_id,
                           delivery={"kind": "user", "reply_token": f"token-{event_id}", "event_ms": 1_700_000_000_000})


async def test_acceptances_and_attempts_are_committed_with_synchronous_full_even_after_a_finish_only_commit(tmp_path):
    inbox = Inbox(tmp_path / "bot.inbox.sqlite3")
    watched = inbox._db = WatchedConnection(inbox._db)  # the writer thread is idle, waiting for work
    (first,) = await inbox.accept([message("E1")])
    await inbox.attempt(first, "reply", "返事")
    inbox.finish(first, "replied")
    assert await inbox.counts() == {"replied": 1}  # the finished mark is committed (alone: nobody waits for it)
    (second,) = await inbox.accept([message("E2")])  # the first durable write after a commit without one
    inbox.finish(second, "replied")
    await inbox.counts()
    (third,) = await inbox.accept([message("E3")])
    await inbox.attempt(third, "reply", "返事")
    inbox.close()

    assert watched.commits == [
        (("accept",), FULL),
        (("attempt",), FULL),
        (("finish",), NORMAL),  # not waited for: no fsync (a crash costs a second look, see bot/inbox.py)
        (("accept",), FULL),
        (("finish",), NORMAL),
        (("accept",), FULL),
        (("attempt",), FULL),
    ]


async def test_under_load_every_commit_with_an_acceptance_or_attempt_is_full(tmp_path):
    """Many chats at once: finished marks, acceptances and attempts share commits as they come (group commit)."""
    inbox = Inbox(tmp_path / "bot.inbox.sqlite3")
    watched = inbox._db = WatchedConnection(inbox._db)

    async def answer(i: int) -> None:
        (entry,) = await inbox.accept([message(f"E{i}")])
        await inbox.attempt(entry, "reply", f"返事{i}")
        inbox.finish(entry, "replied")

    await asyncio.gather(*(answer(i) for i in range(60)))
    assert await inbox.counts() == {"replied": 60}
    inbox.close()
    writes = [write for commit, _ in watched.commits for write in commit]
    assert sorted(writes) == sorted(["accept", "attempt", "finish"] * 60)
    assert all(level == FULL for commit, level in watched.commits if {"accept", "attempt"} & set(commit))
    assert all(level == NORMAL for commit, level in watched.commits if set(commit) == {"finish"})


async def test_an_attempt_leaves_the_entry_in_hand_as_the_file_has_it(tmp_path):
    """The entry a platform adapter holds says what was recorded: the reply and the method, as a restart reads them."""
    inbox = Inbox(tmp_path / "bot.inbox.sqlite3")
    (entry,) = await inbox.accept([message("E1")])
    await inbox.attempt(entry, "reply", "返事")
    await inbox.attempt(entry, "push", "返事")  # the same reply, pushed when the token would not do
    inbox.close()
    (recovered,) = Inbox(tmp_path / "bot.inbox.sqlite3").recovered
    assert (entry.reply, [m for m, _ in entry.attempts]) == (recovered.reply, [m for m, _ in recovered.attempts])
    assert entry.reply == "返事"


# --- from the mutation run (docs/mutation.md): what the writer thread must do, observed ------------------------------


class HeldConnection(WatchedConnection):
    """Also holds the writer thread at its next BEGIN until `release` is set, so that work piles up in its queue
    as it does under load; `held` is set once it waits there."""

    def __init__(self, db: sqlite3.Connection) -> None:
        super().__init__(db)
        self.held, self.release = threading.Event(), threading.Event()
        self.holding = True

    def execute(self, sql: str, *args):
        if sql == "BEGIN IMMEDIATE" and self.holding:
            self.holding = False
            self.held.set()
            assert self.release.wait(30), "the test never released the writer"
        return super().execute(sql, *args)


async def held_inbox(path, done_keep_s: float = DONE_KEEP_S, done_keep_max: int = DONE_KEEP_MAX):
    """An inbox whose writer is held at the start of its next commit, that commit's work queued (a first acceptance)."""
    inbox = Inbox(path, done_keep_s=done_keep_s, done_keep_max=done_keep_max)
    watched = inbox._db = HeldConnection(inbox._db)
    first = asyncio.ensure_future(inbox.accept([message("first")]))
    assert await asyncio.to_thread(watched.held.wait, 30)
    return inbox, watched, first


def committed(path, event_id: str) -> tuple | None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT outcome FROM entries WHERE event_id = ?", (event_id,)).fetchone()


async def test_recovered_entries_keep_who_wrote_them(tmp_path):
    path = tmp_path / "bot.inbox.sqlite3"
    inbox = Inbox(path)
    await inbox.accept([IncomingMessage("discord", "c1", "u42", "健太", "やあ", True, event_id="E1")])
    inbox.close()
    (entry,) = Inbox(path).recovered
    assert (entry.message.user_id, entry.message.user_name, entry.message.user_key) == ("u42", "健太", "discord:u42")


async def test_a_finished_mark_alone_reaches_the_file_without_other_writes(tmp_path):
    path = tmp_path / "bot.inbox.sqlite3"
    inbox = Inbox(path)
    (entry,) = await inbox.accept([message("E1")])
    inbox.finish(entry, "replied")  # nothing else is written after it, and the inbox stays open
    for _ in range(1000):
        if committed(path, "E1") == ("replied",):
            break
        await asyncio.sleep(0.01)
    assert committed(path, "E1") == ("replied",)
    inbox.close()


async def test_a_burst_is_committed_in_batches_of_at_most_max_batch_and_the_inbox_goes_on(tmp_path):
    path = tmp_path / "bot.inbox.sqlite3"
    inbox = Inbox(path)
    entries = await inbox.accept([message(f"E{i}") for i in range(MAX_BATCH + 200)])
    inbox.close()
    inbox, watched, first = await held_inbox(path)
    for entry in entries:
        inbox.finish(entry, "replied")  # all waiting at once behind the held commit
    watched.release.set()
    await asyncio.wait_for(first, 30)
    (last,) = await asyncio.wait_for(inbox.accept([message("after the burst")]), 30)
    assert last is not None
    assert await inbox.counts() == {"replied": MAX_BATCH + 200, "unfinished": 2}
    inbox.close()
    assert max(len(writes) for writes, _ in watched.commits) <= MAX_BATCH


async def test_close_with_work_queued_commits_it_and_ends_the_writer(tmp_path):
    path = tmp_path / "bot.inbox.sqlite3"
    inbox, watched, first = await held_inbox(path)
    queued = [asyncio.ensure_future(inbox.accept([message(f"Q{i}")])) for i in range(5)]
    await asyncio.sleep(0)  # each has queued its acceptance
    closer = threading.Thread(target=inbox.close)  # queues its close behind them, then waits for the writer
    closer.start()
    while inbox._ops.qsize() < 6:
        await asyncio.sleep(0.001)
    watched.release.set()
    await asyncio.to_thread(closer.join)
    assert not inbox._writer.is_alive()  # close() did not give up waiting on a writer still blocked on its queue
    answers = [await task for task in [first, *queued]]
    assert all(entry is not None for (entry,) in answers)
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT COUNT(*) FROM entries").fetchone() == (6,)
    # Group commit: what waited behind the held commit shared the next one (one fsync for the five).
    assert watched.commits == [(("accept",), FULL), (("accept",) * 5, FULL)]


async def test_a_cancelled_waiter_does_not_keep_the_others_of_its_commit_from_hearing(tmp_path):
    inbox, watched, first = await held_inbox(tmp_path / "bot.inbox.sqlite3")
    gave_up = asyncio.ensure_future(inbox.accept([message("A")]))
    waits = asyncio.ensure_future(inbox.accept([message("B")]))
    await asyncio.sleep(0)  # both queued behind the held commit
    gave_up.cancel()
    watched.release.set()
    (entry,) = await asyncio.wait_for(waits, 30)
    assert entry is not None and entry.message.event_id == "B"
    await asyncio.wait_for(first, 30)
    assert await inbox.counts() == {"unfinished": 3}  # A was committed all the same
    inbox.close()


async def test_pruning_keeps_what_is_recent_and_the_inbox_goes_on(tmp_path):
    """1000 finished marks make a commit prune: answered entries within DONE_KEEP_S stay to recognise redeliveries."""
    path = tmp_path / "bot.inbox.sqlite3"
    inbox = Inbox(path)
    entries = await inbox.accept([message(f"E{i}") for i in range(2100)])
    for entry in entries:
        inbox.finish(entry, "replied")
    assert await inbox.accept([message("E0"), message("E2099")]) == [None, None]  # still known: not answered again
    (later,) = await inbox.accept([message("later")])
    inbox.finish(later, "replied")
    assert await inbox.counts() == {"replied": 2101}
    inbox.close()


async def test_pruning_keeps_at_most_done_keep_max_answered_entries_the_newest(tmp_path):
    path = tmp_path / "bot.inbox.sqlite3"
    inbox = Inbox(path, done_keep_max=100)
    entries = await inbox.accept([message(f"E{i}") for i in range(1000)])
    for entry in entries:
        inbox.finish(entry, "replied")  # the 1000th makes its commit prune (after the commit's other work)
    await inbox.counts()
    assert 0 < (await inbox.counts())["replied"] <= 100
    assert await inbox.accept([message("E999")]) == [None]  # the newest is still known
    (again,) = await inbox.accept([message("E0")])
    assert again is not None  # forgotten: a redelivery this late is taken as new
    inbox.close()


# --- from the second look at the inbox's survivors (docs/mutation.md) --------------------------------------------


def test_the_inbox_file_is_private_and_an_in_memory_inbox_writes_no_file(tmp_path, monkeypatch):
    path = tmp_path / "state" / "bot.inbox.sqlite3"
    Inbox(path).close()
    assert (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    monkeypatch.chdir(tmp_path)
    Inbox(":memory:").close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]  # no file named ":memory:"


def test_another_process_holding_the_file_is_waited_for_up_to_five_seconds(tmp_path):
    """`sqlite3 bot.inbox.sqlite3` in a terminal, or a backup, may hold the write lock for a moment."""
    path = tmp_path / "bot.inbox.sqlite3"
    Inbox(path).close()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    releaser = threading.Timer(0.5, other.execute, ("COMMIT",))
    releaser.start()
    inbox = Inbox(path)  # its recovery writes: it waits for the lock instead of failing at once
    releaser.join()
    other.close()
    assert inbox._db.execute("PRAGMA busy_timeout").fetchone() == (5000,)  # and gives up after 5 s
    inbox.close()


def test_a_file_that_is_not_an_inbox_is_refused_saying_why_and_how_to_start_fresh(tmp_path):
    path = tmp_path / "bot.inbox.sqlite3"
    path.write_bytes(b"this is not SQLite " * 100)
    with pytest.raises(InboxError) as refused:
        Inbox(path)
    assert str(refused.value) == (
        f"{path}: cannot open the inbox: file is not a database (move it aside and start with `python -m bot "
        "--new-inbox` for an empty inbox; messages it held would not be answered)")


def test_an_inbox_from_a_newer_bunshin_is_refused_naming_both_versions(tmp_path):
    path = tmp_path / "bot.inbox.sqlite3"
    Inbox(path).close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(InboxError) as refused:
        Inbox(path)
    assert str(refused.value) == (f"{path}: inbox schema version {SCHEMA_VERSION + 1} is newer than this bunshin "
                                  f"reads ({SCHEMA_VERSION}); upgrade bunshin")


async def test_every_thousandth_finished_mark_prunes_not_one_sooner(tmp_path):
    """done_keep_s=-1: a prune forgets every answered entry, so the count shows when one ran."""
    inbox = Inbox(tmp_path / "bot.inbox.sqlite3", done_keep_s=-1)
    entries = await inbox.accept([message(f"E{i}") for i in range(2000)])

    async def answered(upto: int, start: int) -> dict:
        for entry in entries[start:upto]:
            inbox.finish(entry, "replied")
        await inbox.counts()  # the commit holding the last finished mark (and its prune, after its other work)
        return await inbox.counts()

    assert await answered(999, 0) == {"replied": 999, "unfinished": 1001}
    assert await answered(1000, 999) == {"unfinished": 1000}
    assert await answered(1999, 1000) == {"replied": 999, "unfinished": 1}  # the count starts again from 0
    assert await answered(2000, 1999) == {}
    inbox.close()


async def test_a_first_commit_of_finished_marks_alone_is_not_fsyncd(tmp_path):
    """Right after a restart the first write may be a finished mark (a recovered entry answered): NORMAL too."""
    path = tmp_path / "bot.inbox.sqlite3"
    inbox = Inbox(path)
    await inbox.accept([message("E1")])
    inbox.close()
    inbox = Inbox(path)
    watched = inbox._db = WatchedConnection(inbox._db)
    (recovered,) = inbox.recovered
    inbox.finish(recovered, "replied")
    assert await inbox.counts() == {"replied": 1}
    inbox.close()
    assert watched.commits == [(("finish",), NORMAL)]


async def test_a_finished_mark_waits_for_company_but_a_write_someone_waits_for_does_not(tmp_path, monkeypatch):
    monkeypatch.setattr("bot.inbox.FINISH_LINGER_S", 5.0)
    inbox = Inbox(tmp_path / "bot.inbox.sqlite3")
    first, second = await inbox.accept([message("E1"), message("E2")])
    watched = inbox._db = WatchedConnection(inbox._db)
    inbox.finish(first, "replied")
    await asyncio.sleep(0.05)  # the writer has the finished mark and lingers
    started = time.monotonic()
    await asyncio.wait_for(inbox.attempt(second, "reply", "返事"), 30)
    assert time.monotonic() - started < 2.5  # committed as it came, not after the linger
    inbox.close()
    assert watched.commits == [(("finish", "attempt"), FULL)]  # one fsync for both


async def test_a_lone_finished_mark_is_committed_when_its_linger_ends(tmp_path, monkeypatch):
    monkeypatch.setattr("bot.inbox.FINISH_LINGER_S", 0.0)
    inbox = Inbox(tmp_path / "bot.inbox.sqlite3")
    first, second = await inbox.accept([message("E1"), message("E2")])
    watched = inbox._db = WatchedConnection(inbox._db)
    inbox.finish(first, "replied")
    await asyncio.sleep(0.5)  # no linger: committed alone long before this
    await inbox.attempt(second, "reply", "返事")
    inbox.close()
    assert watched.commits == [(("finish",), NORMAL), (("attempt",), FULL)]


async def test_a_commit_that_fails_tells_every_waiter_why_and_the_inbox_goes_on(tmp_path):
    path = tmp_path / "bot.inbox.sqlite3"
    inbox = Inbox(path)
    with contextlib.closing(sqlite3.connect(path)) as db:  # a full disk, as SQLite would report one
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON entries BEGIN SELECT RAISE(ABORT, 'database or disk is "
                   "full'); END")
    with pytest.raises(InboxError) as refused:
        await inbox.accept([message("E1")])
    assert str(refused.value) == f"{path}: cannot write the inbox: database or disk is full"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("DROP TRIGGER refuse")
    (entry,) = await inbox.accept([message("E1")])  # nothing of the failed commit was kept
    assert entry is not None
    inbox.close()


async def test_each_kind_of_damaged_row_is_set_aside_saying_what_without_quoting_it(tmp_path, caplog):
    path = tmp_path / "bot.inbox.sqlite3"
    inbox = Inbox(path)
    entries = await inbox.accept([message(f"E{i}") for i in range(6)])  # E3 stays whole
    inbox.close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        ids = [entry.id for entry in entries]
        db.execute("UPDATE entries SET received_at = 'yesterday' WHERE id = ?", (ids[0],))  # addressed still a number
        db.execute("UPDATE entries SET delivery = '[1]' WHERE id = ?", (ids[1],))  # JSON, not an object
        db.execute("""UPDATE entries SET attempts = '[[1, 1700000000.5]]' WHERE id = ?""", (ids[2],))  # method a number
        db.execute("UPDATE entries SET event_id = CAST(x'45ff34' AS TEXT) WHERE id = ?", (ids[4],))  # not UTF-8
    caplog.set_level(logging.ERROR)
    inbox = Inbox(path)
    assert [entry.message.event_id for entry in inbox.recovered] == ["E3", "E5"]
    assert await inbox.counts() == {"unreadable": 4, "unfinished": 2}
    inbox.close()
    reasons = [f"inbox entry {ids[0]} (event E0) cannot be read back (a number column holds something else)",
               f"inbox entry {ids[1]} (event E1) cannot be read back (delivery data or attempts of the wrong shape)",
               f"inbox entry {ids[2]} (event E2) cannot be read back (delivery data or attempts of the wrong shape)",
               f"inbox entry {ids[4]} (event E\ufffd4) cannot be read back (text that is not UTF-8)"]
    lines = [record.getMessage() for record in caplog.records]
    for reason in reasons:
        assert any(reason in line for line in lines), (reason, lines)


def test_a_row_of_a_file_written_without_column_types_is_set_aside_when_a_text_column_holds_a_number(tmp_path,
                                                                                                     caplog):
    """SQLite keeps a number as a number in a column declared without a type (another program's table): the row
    cannot be an entry, and its event id is no text to show."""
    path = tmp_path / "bot.inbox.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE entries (id INTEGER PRIMARY KEY, platform, event_id, chat_id, user_id, user_name, "
                   "text, addressed, received_at, delivery, reply, attempts DEFAULT '[]', recoveries DEFAULT 0, "
                   "outcome, finished_at, UNIQUE (platform, event_id))")
        db.execute("INSERT INTO entries (platform, event_id, chat_id, user_id, user_name, text, addressed, "
                   "received_at, delivery) VALUES ('line', 42, 'U1', 'U1', 'LINE user', 'やあ', 1, 1.5, '{}')")
        db.execute("INSERT INTO entries (platform, event_id, chat_id, user_id, user_name, text, addressed, "
                   "received_at, delivery) VALUES ('line', 'E2', 'U1', 'U1', 'LINE user', 'やあ', 1, 1.5, '{}')")
    caplog.set_level(logging.ERROR)
    inbox = Inbox(path)
    assert [entry.message.event_id for entry in inbox.recovered] == ["E2"]
    inbox.close()
    assert any("inbox entry 1 (event ?) cannot be read back (a text column holds something else)" in r.getMessage()
               for r in caplog.records), caplog.text


async def test_close_while_finished_marks_linger_commits_them_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr("bot.inbox.FINISH_LINGER_S", 5.0)
    path = tmp_path / "bot.inbox.sqlite3"
    inbox = Inbox(path)
    first, _ = await inbox.accept([message("E1"), message("E2")])
    inbox.finish(first, "replied")
    await asyncio.sleep(0.05)  # the writer has the finished mark and lingers
    started = time.monotonic()
    inbox.close()
    assert time.monotonic() - started < 2.5  # the close ended the linger
    inbox = Inbox(path)
    assert await inbox.counts() == {"replied": 1, "unfinished": 1}
    inbox.close()



async def test_a_writer_stuck_on_the_disk_does_not_keep_close_from_returning(tmp_path, monkeypatch):
    monkeypatch.setattr("bot.inbox.CLOSE_WAIT_S", 0.5)
    inbox, watched, first = await held_inbox(tmp_path / "bot.inbox.sqlite3")  # its commit never gets the disk
    started = time.monotonic()
    inbox.close()
    assert time.monotonic() - started < 5
    watched.release.set()  # the disk answers at last: the connection is closed, the waiter hears it
    with pytest.raises(InboxError, match="cannot write the inbox"):
        await asyncio.wait_for(first, 30)
