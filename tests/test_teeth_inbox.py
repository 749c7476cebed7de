"""What the inbox promises about the disk, observed on the SQLite connection itself: every commit that holds an
acceptance or a delivery attempt runs with synchronous=FULL (SQLite fsyncs the write-ahead log before COMMIT
returns), also after commits of finished marks alone have switched the connection to NORMAL. The inbox's
connection is wrapped to ask SQLite, right before each COMMIT, which setting is in effect and which writes the
transaction holds."""

from __future__ import annotations

import asyncio
import sqlite3

from bot.inbox import Inbox
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
