"""Per-chat conversation memory in one SQLite file, so a restart keeps every conversation.

One connection in autocommit mode: each append is its own committed statement, nothing waits
in a transaction when the process dies. WAL with synchronous=NORMAL: a commit survives a crash
of the bot (the usual failure) without an fsync per message; a power cut can lose the last
few turns but never corrupts the file. That keeps append + recent in the tens of microseconds.

Turns come back as `finetune.records.ChatRecord` (chat = the chat key), the record type the
importers produce, so the prompt renderer treats remembered turns like training context.

Growth is bounded by pruning: the first append to a chat after opening, and every `keep`-th
append to it after that, cut the chat back to its newest `keep` turns. A chat therefore holds
fewer than 2 * keep turns; the bot passes keep = 4 * [memory] max_turns.

Appends are idempotent when they carry an `event` key (the inbox's id of the message they came
from, or of the reply to it): a message answered again after a crash is not remembered twice,
and a reply already generated for it is found again (`text_of`) instead of being regenerated.

Faults are loud, never silent: a file that is not ours or is damaged (checked at open with
`PRAGMA quick_check`, cheap on a pruned file) stops the bot at start naming the file and is left
untouched for the operator to repair or move aside; a file another process keeps locked is waited
for `busy_timeout_s`, then MemoryStoreError says so, and the turn is known not to be saved. No error
quotes a stored turn: SQLite's errors go through `storage_errors.describe` (Python's sqlite3 puts the
text of a turn it cannot decode into its error).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from finetune.persona_home import make_private_file
from finetune.records import KINDS, TEXT, ChatRecord

from .storage_errors import describe

SCHEMA_VERSION = 2  # 2: turns.event, for idempotent appends
BUSY_TIMEOUT_S = 5.0  # how long a write waits for another process's lock before it fails

# The unique index that makes an append with an `event` key idempotent (ON CONFLICT in append()).
_EVENT_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS turns_by_event ON turns (event) WHERE event IS NOT NULL"
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY,
    chat_key TEXT NOT NULL,
    speaker TEXT NOT NULL,
    text TEXT NOT NULL,
    kind TEXT NOT NULL,
    time TEXT NOT NULL,
    event TEXT
);
CREATE INDEX IF NOT EXISTS turns_by_chat ON turns (chat_key, id);
{_EVENT_INDEX};
"""
# A version 1 file (no event keys) gains the column and its index; its turns keep event NULL.
_MIGRATE_FROM_1 = (
    "ALTER TABLE turns ADD COLUMN event TEXT",
    _EVENT_INDEX,
)


def _damaged(path: str, why: str) -> str:
    return (f"{path}: the memory database is damaged ({why}); it was left as it is: move it aside to start "
            f"with an empty memory, or salvage what it holds with `sqlite3 {path} .recover`")


class MemoryStoreError(Exception):
    """The memory file cannot be used (not ours, damaged, locked, or written by a newer bunshin); str() names it."""


class ConversationMemory:
    def __init__(self, path: str | Path, keep: int | None = 80, busy_timeout_s: float = BUSY_TIMEOUT_S):
        if keep is not None and keep <= 0:
            raise ValueError(f"keep must be > 0 or None, not {keep}")
        self.path = str(path)
        self.keep = keep
        self.busy_timeout_s = busy_timeout_s
        self._appends: dict[str, int] = {}  # appends per chat since the last prune
        self._lock = threading.Lock()  # one connection, usable from a worker thread too
        if self.path != ":memory:":
            make_private_file(Path(self.path))  # 0600 in a 0700 folder, before SQLite creates it (and its -wal) 0644
        try:
            self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        except sqlite3.OperationalError as exc:  # a folder, no permission ...
            raise MemoryStoreError(f"{self.path}: cannot open the memory database: {describe(exc)}") from None
        try:
            with self._errors("open"):
                self._open()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise MemoryStoreError(f"{self.path}: not a bunshin memory database: {describe(exc)}") from None
        except MemoryStoreError:
            self._db.close()
            raise

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """SQLite's errors as MemoryStoreError naming the file and what was being done, never a stored turn."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            why = describe(exc)
            if "locked" in why or "busy" in why:
                raise MemoryStoreError(
                    f"{self.path}: cannot {action}: the memory file stayed locked by another process for "
                    f"{self.busy_timeout_s:g} s (another bot, or a sqlite3 shell, using the same [memory] path?)"
                ) from None
            if "not valid UTF-8" in why:
                raise MemoryStoreError(_damaged(self.path, f"{why}, on trying to {action}")) from None
            raise MemoryStoreError(f"{self.path}: cannot {action}: {why}") from None
        except sqlite3.DatabaseError as exc:
            why = describe(exc)
            if "malformed" in why or "corrupt" in why:
                raise MemoryStoreError(_damaged(self.path, f"{why}, on trying to {action}")) from None
            raise  # SQLite's own error (a file that is not a database, at open): it holds no stored value

    def _open(self) -> None:
        db = self._db
        version = db.execute("PRAGMA user_version").fetchone()[0]  # a garbage file fails here
        if version > SCHEMA_VERSION:
            raise MemoryStoreError(
                f"{self.path}: memory schema version {version} is newer than this bunshin reads "
                f"({SCHEMA_VERSION}); upgrade bunshin or point [memory] path at another file"
            )
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version == 0:
            if tables:
                raise MemoryStoreError(f"{self.path}: not a bunshin memory database: "
                                       f"it holds other tables ({', '.join(sorted(tables))})")
            # IF NOT EXISTS: another process may be creating the same file right now.
            db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        elif "turns" not in tables:
            raise MemoryStoreError(f"{self.path}: not a bunshin memory database: no turns table")
        elif version == 1:
            db.execute("BEGIN IMMEDIATE")
            try:  # statement by statement: executescript() would commit first; another process may have migrated meanwhile
                if db.execute("PRAGMA user_version").fetchone()[0] == 1:
                    for statement in _MIGRATE_FROM_1:
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise MemoryStoreError(_damaged(self.path, "; ".join(problems)))
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")

    def append(self, chat_key: str, speaker: str, text: str, time: datetime | None = None, kind: str = TEXT,
               event: str | None = None) -> bool:
        """Remember one turn, committed at once; `time` None = now (aware, this machine's zone). With an `event`
        key already remembered, nothing is added and False is returned."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
        stamp = (time or datetime.now().astimezone()).isoformat()
        with self._lock, self._errors("save a turn"):
            added = self._db.execute(
                "INSERT INTO turns (chat_key, speaker, text, kind, time, event) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (event) WHERE event IS NOT NULL DO NOTHING",
                (chat_key, speaker, text, kind, stamp, event)).rowcount == 1
            if not added or self.keep is None:
                return added
            count = self._appends.get(chat_key)
            if count is None or count + 1 >= self.keep:
                self._prune(chat_key, self.keep)
                self._appends[chat_key] = 0
            else:
                self._appends[chat_key] = count + 1
            return True

    def text_of(self, event: str) -> str | None:
        """The text remembered under an `event` key, or None."""
        with self._lock, self._errors("read the conversation"):
            row = self._db.execute("SELECT text FROM turns WHERE event = ?", (event,)).fetchone()
        return row[0] if row else None

    def recent(self, chat_key: str, limit: int, slack: int = 0) -> list[ChatRecord]:
        """The last turns of a chat, oldest first: `limit` of them, or with `slack`, between `limit - slack`
        and `limit`, from a start that stays put for several messages (window_start)."""
        if limit <= 0:
            return []
        slack = max(0, min(slack, limit - 1))
        with self._lock, self._errors("read the conversation"):
            rows = self._db.execute(
                "SELECT id, speaker, time, text, kind FROM turns WHERE chat_key = ? ORDER BY id DESC LIMIT ?",
                (chat_key, limit + slack),
            ).fetchall()
        rows.reverse()
        rows = rows[window_start([row[0] for row in rows], limit, slack):]
        # message_id is the row's id: `earlier` takes it to find what came before the window.
        return [ChatRecord(speaker, datetime.fromisoformat(time), text, kind, chat=chat_key, message_id=str(row_id))
                for row_id, speaker, time, text, kind in rows]

    def earlier(self, chat_key: str, before: str | None, limit: int) -> list[ChatRecord]:
        """Up to `limit` turns of a chat older than the turn whose message_id (from `recent`) is `before`,
        oldest first: the chat's past beyond the prompt's window, for recall (bot/chat_recall.py). Only this
        chat's turns: nothing said in one chat is ever read for another."""
        if limit <= 0 or before is None:
            return []
        with self._lock, self._errors("read the conversation"):
            rows = self._db.execute(
                "SELECT id, speaker, time, text, kind FROM turns WHERE chat_key = ? AND id < ? ORDER BY id DESC LIMIT ?",
                (chat_key, int(before), limit),
            ).fetchall()
        rows.reverse()
        return [ChatRecord(speaker, datetime.fromisoformat(time), text, kind, chat=chat_key, message_id=str(row_id))
                for row_id, speaker, time, text, kind in rows]

    def earlier_span(self, chat_key: str, before: str | None, limit: int) -> tuple[str, str] | None:
        """The message_ids of the oldest and newest of the turns `earlier` would return, or None for none: read from
        the index alone, so chat recall can tell in a fraction of a millisecond whether its cached index is current."""
        if limit <= 0 or before is None:
            return None
        with self._lock, self._errors("read the conversation"):
            first, last = self._db.execute(
                "SELECT MIN(id), MAX(id) FROM (SELECT id FROM turns WHERE chat_key = ? AND id < ? ORDER BY id DESC LIMIT ?)",
                (chat_key, int(before), limit),
            ).fetchone()
        return None if first is None else (str(first), str(last))

    def reset(self, chat_key: str) -> int:
        """Forget a chat (the rows are deleted, not hidden); returns how many turns went."""
        with self._lock, self._errors("forget a chat"):
            self._appends.pop(chat_key, None)
            return self._db.execute("DELETE FROM turns WHERE chat_key = ?", (chat_key,)).rowcount

    def prune(self, chat_key: str, keep: int) -> int:
        """Keep only the newest `keep` turns of a chat; returns how many were deleted."""
        with self._lock, self._errors("prune a chat"):
            return self._prune(chat_key, keep)

    def _prune(self, chat_key: str, keep: int) -> int:
        if keep <= 0:
            return self._db.execute("DELETE FROM turns WHERE chat_key = ?", (chat_key,)).rowcount
        # The id of the newest turn to drop: an index seek on (chat_key, id), then `keep` steps.
        return self._db.execute(
            "DELETE FROM turns WHERE chat_key = ?1 AND id <= "
            "(SELECT id FROM turns WHERE chat_key = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            (chat_key, keep),
        ).rowcount

    def chats(self) -> int:
        """How many chats have something remembered."""
        with self._lock, self._errors("count chats"):
            return self._db.execute("SELECT COUNT(DISTINCT chat_key) FROM turns").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ConversationMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def window_start(ids: list[int], limit: int, slack: int) -> int:
    """Where the remembered window starts among a chat's latest turns `ids` (oldest first).

    The worker reuses a chat's cached prompt when the next prompt starts the same way, so the window's
    first turn should not move with every message, as "the last `limit` turns" does. Among the turns that
    may start the window (those leaving between `limit - slack` and `limit` turns), the start is the one
    whose id hashes lowest: it stays the start until it leaves the range or a new candidate hashes lower,
    on average for about `slack / 2` messages. No state is kept: the same turns give the same start,
    across restarts and after pruning.
    """
    if len(ids) <= limit:
        return 0
    first = len(ids) - limit
    candidates = range(first, min(len(ids), first + max(1, slack)))
    return min(candidates, key=lambda i: (ids[i] * 0x9E3779B1) & 0xFFFFFFFF)
