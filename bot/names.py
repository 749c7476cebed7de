"""The names platforms told us people go by, kept in SQLite so that a restart does not ask again.

The persona learned people by the names its training exports use. A LINE export names them by their
LINE display name, which a webhook does not carry: the LINE platform adapter asks LINE's profile API
while a message is answered (adapters/line.py) and keeps the answer here, with the time after which
to ask again: about a day after a lookup (people rename themselves), a few minutes after a failed
one (so an outage, or someone who blocked the bot, costs one call now and then, not one per message).

It is a cache: losing it costs lookups, never a reply. So once open it never raises: a write that
fails (a full disk) is logged and the name is used all the same. A file it cannot open at start
(damaged, not ours, written by a newer bunshin) stops the bot with NameCacheError naming the file
and what to do, like the inbox and memory do; it holds nothing but names, so deleting it is safe.

    <memory>.names.sqlite3   next to the memory file, as the inbox is (`NameCache.path_for`)

The persona's own name is kept for the bot's turns: a person who goes by it (the persona's real self
trying the clone, or a namesake) is named apart (`apart_from_persona`), or the model would read their
words as its own.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from finetune.persona_home import make_private_file

from .storage_errors import describe

log = logging.getLogger("bunshin.names")

SCHEMA_VERSION = 1
FORGET_AFTER_S = 90 * 24 * 3600  # someone unheard of this long is forgotten at the next start (asked again if back)
NAMESAKE = "{name} (user)"  # a person named like the persona, told apart from it
_DELETE_IT = "delete it: it holds only names looked up from LINE, which are looked up again"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS names (
    user_key TEXT PRIMARY KEY,
    name TEXT,
    look_up_after REAL NOT NULL,
    updated_at REAL NOT NULL
) WITHOUT ROWID;
"""


class NameCacheError(Exception):
    """The name cache's file cannot be used; str() names it and says what to do."""


@dataclass(frozen=True)
class CachedName:
    name: str | None  # None: no lookup has succeeded yet
    look_up_after: float  # wall time (time.time()) from which it is due to be asked again

    def due(self, now: float) -> bool:
        return now >= self.look_up_after


class NameCache:
    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            make_private_file(Path(self.path))  # 0600 in a 0700 folder, before SQLite creates it (and its -wal) 0644
        self._failure_logged = False
        self._closed = False
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        except sqlite3.Error as exc:  # a folder, no permission ...
            raise NameCacheError(f"{self.path}: cannot open the name cache: {describe(exc)}") from None
        try:
            self._open()
        except sqlite3.Error as exc:  # damaged, or not SQLite at all
            self._db.close()
            raise NameCacheError(f"{self.path}: cannot open the name cache: {describe(exc)} ({_DELETE_IT})") from None
        except NameCacheError as exc:
            self._db.close()
            raise NameCacheError(f"{self.path}: cannot open the name cache: {exc}") from None

    @staticmethod
    def path_for(memory_path: str) -> str:
        """Next to the memory file; in memory when memory is."""
        if memory_path == ":memory:":
            return ":memory:"
        return str(Path(memory_path).with_suffix(".names.sqlite3"))

    def _open(self) -> None:
        db = self._db
        version = db.execute("PRAGMA user_version").fetchone()[0]  # a file that is not SQLite fails here
        if version > SCHEMA_VERSION:
            raise NameCacheError(f"schema version {version} is newer than this bunshin reads ({SCHEMA_VERSION}): "
                                 f"upgrade bunshin, or {_DELETE_IT}")
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version == 0 and tables:
            raise NameCacheError(f"not a bunshin name cache: it holds other tables ({', '.join(sorted(tables))}); "
                                 "move it aside, or point [memory] path elsewhere")
        db.execute("PRAGMA journal_mode = WAL")
        # NORMAL: no fsync per name; a power cut may cost the last names, which are then looked up again.
        db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        db.execute("DELETE FROM names WHERE updated_at < ?", (time.time() - FORGET_AFTER_S,))

    def get(self, user_key: str) -> CachedName | None:
        """What is known of "platform:id", or None if it was never looked up."""
        if self._closed:  # a lookup that outlived shutdown
            return None
        try:
            row = self._db.execute("SELECT name, look_up_after FROM names WHERE user_key = ?", (user_key,)).fetchone()
        except sqlite3.Error as exc:
            self._log_failure("read", exc)
            return None
        return CachedName(*row) if row else None

    def put(self, user_key: str, name: str | None, look_up_after: float) -> None:
        """Remember `name` (None: still unknown) for "platform:id", to be asked again from `look_up_after`."""
        if self._closed:
            return
        try:
            self._db.execute(
                "INSERT INTO names (user_key, name, look_up_after, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (user_key) DO UPDATE SET name = excluded.name, look_up_after = excluded.look_up_after, "
                "updated_at = excluded.updated_at", (user_key, name, look_up_after, time.time()))
        except sqlite3.Error as exc:
            self._log_failure("write", exc)

    def _log_failure(self, action: str, exc: sqlite3.Error) -> None:
        # Once per run: a full disk would otherwise log on every message.
        if not self._failure_logged:
            self._failure_logged = True
            log.error("%s: cannot %s the name cache: %s (names are looked up again instead; logged once)",
                      self.path, action, describe(exc))

    def close(self) -> None:
        self._closed = True
        self._db.close()


def apart_from_persona(name: str, persona: str) -> str:
    """A person's `name`, marked if it is the persona's: that name is kept for the bot's own turns."""
    return NAMESAKE.format(name=name) if name == persona else name
