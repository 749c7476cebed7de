"""The inbox: every message the bot accepted, on disk before it is acknowledged, until it is answered.

    platform adapter ─► accept() ─► inbox.sqlite3 (fsync'd) ─► acknowledged (LINE's webhook: 200)
                                          │
    dispatcher ◄── left unfinished by the last run, then each new one
        └─► router ─► reply ─► attempt(method) ─► the platform adapter delivers ─► finish(outcome)

What it guarantees:
- A message accepted is answered even if the process dies right after (SIGKILL, an OOM kill, a power
  cut): the next start finds it unfinished and answers it once the model is ready.
- A message is taken once: (platform, event id) is unique, so a redelivered LINE event, or a Discord
  message seen twice, is refused as a duplicate, also across restarts.
- Delivery is never doubled by a restart: before a platform adapter sends a reply it records the
  attempt and its method (reply token, push, send), so after a crash it can tell "maybe sent" from
  "never tried" and act accordingly (adapters/line.py: a spent reply token is not followed by a push).

An acceptance and a delivery attempt are committed with synchronous=FULL (an fsync of the write-ahead
log) before the caller goes on, so an acknowledged message, and the record of a reply about to be
sent, survive a power cut, not only a crash of the process. Marking an entry finished is not waited
for and not fsync'd: it is committed with the next writes (or within FINISH_LINGER_S). Losing it to
a crash costs a second look at the entry after the restart, whose recorded attempts keep that from
sending anything twice. Writes go to one thread that commits whatever is waiting in one transaction
(group commit): one fsync for many events under load, and the event loop never waits on the disk.

Answered entries keep only their ids and outcome (text, reply and delivery data are cleared), long
enough to recognise a redelivery, then they are pruned. The outcome is the trace an operator reads
after a warning that names an event (`SELECT outcome FROM entries WHERE event_id = ...`).

An entry left by an earlier run that cannot be read back (a damaged row: text that is not UTF-8,
delivery data that is not JSON) is set aside at start, finished as `unreadable` with a log line that
names it by its ids, so the others are answered. No error or log line quotes a stored value: SQLite's
errors go through `storage_errors.describe` (Python's sqlite3 puts a row's text into some of them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path

from finetune.persona_home import make_private_file

from .messages import InboxEntry, IncomingMessage
from .storage_errors import describe

log = logging.getLogger("bunshin.inbox")

SCHEMA_VERSION = 1
DONE_KEEP_S = 2 * 24 * 3600  # answered entries kept this long to recognise redeliveries
DONE_KEEP_MAX = 200_000  # ... and at most this many
MAX_BATCH = 1024  # operations per group commit
FINISH_LINGER_S = 0.1  # finished marks alone wait this long for company before they are committed
CLOSE_WAIT_S = 30.0  # close() waits this long for the writer (a stuck disk must not keep the daemon from exiting)
DURABLE = frozenset({"accept", "attempt"})  # writes fsync'd before their caller goes on

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY,
    platform TEXT NOT NULL,
    event_id TEXT NOT NULL,
    chat_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    user_name TEXT NOT NULL,
    text TEXT NOT NULL,
    addressed INTEGER NOT NULL,
    received_at REAL NOT NULL,
    delivery TEXT NOT NULL,
    reply TEXT,
    attempts TEXT NOT NULL DEFAULT '[]',
    recoveries INTEGER NOT NULL DEFAULT 0,
    outcome TEXT,
    finished_at REAL,
    UNIQUE (platform, event_id)
);
CREATE INDEX IF NOT EXISTS entries_unfinished ON entries (id) WHERE finished_at IS NULL;
CREATE INDEX IF NOT EXISTS entries_finished ON entries (finished_at) WHERE finished_at IS NOT NULL;
"""


class InboxError(Exception):
    """The inbox file cannot be used or written; str() names the file and why."""


_CLOSE = object()


class Inbox:
    def __init__(self, path: str | Path, done_keep_s: float = DONE_KEEP_S, done_keep_max: int = DONE_KEEP_MAX):
        self.path = str(path)
        self.done_keep_s = done_keep_s
        self.done_keep_max = done_keep_max
        if self.path != ":memory:":
            make_private_file(Path(self.path))  # 0600 in a 0700 folder, before SQLite creates it (and its -wal) 0644
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
            self._open()
            self.recovered = self._recover()
        except sqlite3.DatabaseError as exc:
            raise InboxError(f"{self.path}: cannot open the inbox: {describe(exc)} (move it aside and start with "
                             "`python -m bot --new-inbox` for an empty inbox; messages it held would not be "
                             "answered)") from None
        self._ops: queue.SimpleQueue = queue.SimpleQueue()
        self._finished_since_prune = 0
        self._durable = True  # the connection's synchronous setting: FULL
        self._closed = False
        self._writer = threading.Thread(target=self._write_forever, name="bunshin-inbox", daemon=True)
        self._writer.start()

    @staticmethod
    def path_for(memory_path: str) -> str:
        """Next to the memory file; in memory when memory is."""
        if memory_path == ":memory:":
            return ":memory:"
        return str(Path(memory_path).with_suffix(".inbox.sqlite3"))

    def _open(self) -> None:
        db = self._db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise InboxError(f"{self.path}: inbox schema version {version} is newer than this bunshin reads "
                             f"({SCHEMA_VERSION}); upgrade bunshin")
        db.execute("PRAGMA journal_mode = WAL")
        # FULL: each commit fsyncs the write-ahead log, so an acknowledged event survives a power cut.
        db.execute("PRAGMA synchronous = FULL")
        db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")

    def _recover(self) -> list[InboxEntry]:
        """What earlier runs left unfinished, oldest first; each counts one more recovery (committed). One that
        cannot be read back is finished as `unreadable` (logged by its ids), not answered."""
        db = self._db
        db.execute("UPDATE entries SET recoveries = recoveries + 1 WHERE finished_at IS NULL")
        # Text as bytes, decoded here: sqlite3's own decoding error would quote the text, and would stop at the
        # first bad row instead of setting that one aside.
        db.text_factory = bytes
        try:
            rows = db.execute(
                "SELECT id, platform, event_id, chat_id, user_id, user_name, text, addressed, received_at, delivery, "
                "reply, attempts, recoveries FROM entries WHERE finished_at IS NULL ORDER BY id").fetchall()
        finally:
            db.text_factory = str
        now = time.monotonic()
        entries, unreadable = [], []
        for row in rows:
            try:
                entries.append(_entry_from_row(row, now))
            except (UnicodeDecodeError, ValueError, TypeError) as exc:
                unreadable.append(row[0])
                event_id = row[2].decode("ascii", "replace") if isinstance(row[2], bytes) else "?"
                log.error("%s: inbox entry %d (event %s) cannot be read back (%s): set aside as 'unreadable', not "
                          "answered", self.path, row[0], event_id[:40], _why_unreadable(exc))
        for entry_id in unreadable:
            db.execute("UPDATE entries SET finished_at = ?, outcome = 'unreadable', text = '', reply = NULL, "
                       "delivery = '{}', user_name = '' WHERE id = ?", (time.time(), entry_id))
        return entries

    # --- writes: queued to the writer thread, awaited until committed -------------------------

    async def accept(self, messages: list[IncomingMessage]) -> list[InboxEntry | None]:
        """Store messages, committed (fsync'd) before this returns; None for one already taken (a duplicate)."""
        if not messages:
            return []
        return await self._submit("accept", messages)

    async def attempt(self, entry: InboxEntry, method: str, reply: str) -> None:
        """Record, committed, that a delivery of `reply` by `method` is about to be tried (once per method)."""
        if entry.attempted(method) is not None:
            return
        entry.reply = reply
        entry.attempts.append((method, time.time()))
        await self._submit("attempt", (entry.id, reply, json.dumps(entry.attempts)))

    def finish(self, entry: InboxEntry, outcome: str) -> None:
        """Mark an entry answered (or given up, as `outcome` says); its text and reply are cleared. Not waited for:
        committed with the next writes, and kept by close()."""
        if self._closed:
            raise InboxError(f"{self.path}: the inbox is closed")
        self._ops.put(("finish", (entry.id, outcome), None))

    async def _submit(self, kind: str, args):
        if self._closed:
            raise InboxError(f"{self.path}: the inbox is closed")
        future = asyncio.get_running_loop().create_future()
        self._ops.put((kind, args, future))
        return await future

    # --- the writer thread ----------------------------------------------------------------------

    def _write_forever(self) -> None:
        closing = False
        while not closing:
            op = self._ops.get()
            if op is _CLOSE:
                return
            batch = [op]
            closing = self._take_waiting(batch)
            # Nobody waits for finished marks: let them wait a little for other writes to share a commit.
            lingering_until = time.monotonic() + FINISH_LINGER_S
            while not closing and all(future is None for _, _, future in batch) and len(batch) < MAX_BATCH:
                try:
                    op = self._ops.get(timeout=max(0.0, lingering_until - time.monotonic()))
                except queue.Empty:
                    break
                if op is _CLOSE:
                    closing = True
                    break
                batch.append(op)
                closing = self._take_waiting(batch)
            results = self._commit(batch, durable=any(kind in DURABLE for kind, _, _ in batch))
            by_loop: dict = {}
            for (_, _, future), result in zip(batch, results, strict=True):
                if future is not None:
                    by_loop.setdefault(future.get_loop(), []).append((future, result))
            for loop, settled in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_settle, settled)
                except RuntimeError:  # that loop has closed: nobody waits for these
                    pass

    def _take_waiting(self, batch: list) -> bool:
        """Adds what is queued already to `batch`; True if close() was asked for."""
        while len(batch) < MAX_BATCH:
            try:
                op = self._ops.get_nowait()
            except queue.Empty:
                return False
            if op is _CLOSE:
                return True
            batch.append(op)
        return False

    def _commit(self, batch: list, durable: bool) -> list:
        """Runs a batch in one transaction, fsync'd if `durable`; each op's result, or one InboxError for all if the
        commit failed."""
        db = self._db
        try:
            if durable != self._durable:
                db.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
                self._durable = durable
            db.execute("BEGIN IMMEDIATE")
            try:
                results = [getattr(self, "_do_" + kind)(args) for kind, args, _ in batch]
                self._maybe_prune()
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except Exception as exc:  # noqa: BLE001 - a full disk, or a bug: every waiter hears it, the thread lives on
            why = describe(exc)
            log.error("%s: cannot write the inbox: %s", self.path, why)
            error = InboxError(f"{self.path}: cannot write the inbox: {why}")
            return [error] * len(batch)
        return results

    def _do_accept(self, messages: list[IncomingMessage]) -> list[InboxEntry | None]:
        entries = []
        for m in messages:
            cursor = self._db.execute(
                "INSERT INTO entries (platform, event_id, chat_id, user_id, user_name, text, addressed, received_at, "
                "delivery) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (platform, event_id) DO NOTHING",
                (m.platform, m.event_id, m.chat_id, m.user_id, m.user_name, m.text, int(m.addressed), m.received_at,
                 json.dumps(m.delivery, ensure_ascii=False)))
            entries.append(InboxEntry(cursor.lastrowid, m) if cursor.rowcount == 1 else None)
        return entries

    def _do_attempt(self, args) -> None:
        entry_id, reply, attempts = args
        self._db.execute("UPDATE entries SET reply = ?, attempts = ? WHERE id = ?", (reply, attempts, entry_id))

    def _do_finish(self, args) -> None:
        entry_id, outcome = args
        # The conversation lives in memory; the inbox keeps only what recognises a redelivery.
        self._db.execute("UPDATE entries SET finished_at = ?, outcome = ?, text = '', reply = NULL, delivery = '{}', "
                         "user_name = '' WHERE id = ?", (time.time(), outcome, entry_id))
        self._finished_since_prune += 1

    def _maybe_prune(self) -> None:
        if self._finished_since_prune < 1000:
            return
        self._finished_since_prune = 0
        self._db.execute("DELETE FROM entries WHERE finished_at < ?", (time.time() - self.done_keep_s,))
        self._db.execute(
            "DELETE FROM entries WHERE finished_at IS NOT NULL AND finished_at <= (SELECT finished_at FROM entries "
            "WHERE finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT 1 OFFSET ?)", (self.done_keep_max,))

    # --- counting and closing ------------------------------------------------------------------

    async def counts(self) -> dict[str, int]:
        """Entries by outcome ("unfinished" for those not answered yet): for tests and the operator."""
        return await self._submit("counts", None)

    def _do_counts(self, _) -> dict[str, int]:
        return dict(self._db.execute("SELECT COALESCE(outcome, 'unfinished'), COUNT(*) FROM entries GROUP BY 1"))

    def close(self) -> None:
        """Commits what is queued, then closes. Later writes raise InboxError."""
        if self._closed:
            return
        self._closed = True
        self._ops.put(_CLOSE)
        self._writer.join(timeout=CLOSE_WAIT_S)
        self._db.close()


def _entry_from_row(row: tuple, now: float) -> InboxEntry:
    """An unfinished entry from its row, text columns as bytes (the connection's text_factory during recovery);
    UnicodeDecodeError, ValueError or TypeError if the row is damaged."""
    (id_, platform, event_id, chat_id, user_id, user_name, text, addressed, received_at, delivery, reply, attempts,
     recoveries) = row
    platform, event_id, chat_id, user_id, user_name, text, delivery, attempts = (
        _text(v) for v in (platform, event_id, chat_id, user_id, user_name, text, delivery, attempts))
    reply = None if reply is None else _text(reply)
    if not isinstance(received_at, (int, float)) or not isinstance(addressed, int):
        raise TypeError("a number column holds something else")
    delivery, attempts = json.loads(delivery), [(m, at) for m, at in json.loads(attempts)]
    if not isinstance(delivery, dict) or not all(isinstance(m, str) and isinstance(at, (int, float))
                                                 for m, at in attempts):
        raise TypeError("delivery data or attempts of the wrong shape")
    message = IncomingMessage(platform, chat_id, user_id, user_name, text, bool(addressed), received=now,
                              event_id=event_id, received_at=received_at, delivery=delivery)
    return InboxEntry(id_, message, reply, attempts, recoveries)


def _text(value) -> str:
    if not isinstance(value, bytes):
        raise TypeError("a text column holds something else")
    return value.decode("utf-8")


def _why_unreadable(exc: Exception) -> str:
    """Why a row could not be read, in words that hold none of it (a decoding error's str() would not; JSON's
    names a position)."""
    if isinstance(exc, UnicodeDecodeError):
        return "text that is not UTF-8"
    if isinstance(exc, json.JSONDecodeError):
        return f"delivery data that is not JSON ({exc.msg})"
    return str(exc) if isinstance(exc, TypeError) else type(exc).__name__


def _settle(settled: list) -> None:
    for future, result in settled:
        if future.done():
            continue  # the caller gave up waiting (cancelled); what it asked for is committed all the same
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

