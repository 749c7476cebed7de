"""A damaged row in the inbox, the memory or the name cache (real SQLite files): the error or log line says
what and where, and never quotes the row. Python's sqlite3 would: a text column that is not UTF-8 raises an
error holding the stored text (bot/storage_errors.py). The damage is made the way it happens: bytes that are not
UTF-8 in a text column, around a marker that must not show up anywhere.
"""

from __future__ import annotations

import logging
import sqlite3

import pytest

from bot.inbox import Inbox
from bot.memory import ConversationMemory, MemoryStoreError
from bot.messages import IncomingMessage
from bot.names import NameCache
from bot.storage_errors import describe

MARKER = "ひみつ-MARKER-51c2"
DAMAGED = MARKER.encode() + b"\xff"  # not UTF-8


def damage(db_file, sql: str, *params) -> None:
    with sqlite3.connect(db_file) as db:
        db.execute(sql, params)


def test_sqlites_own_errors_are_kept_and_a_decoding_error_loses_its_text():
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (text TEXT)")
    db.execute("INSERT INTO t VALUES (CAST(? AS TEXT))", (DAMAGED,))
    with pytest.raises(sqlite3.OperationalError) as undecodable:
        db.execute("SELECT text FROM t").fetchall()
    assert "MARKER-51c2" in str(undecodable.value)  # what sqlite3 does (bytes as Latin-1), and why describe() exists
    assert describe(undecodable.value) == ("a stored value in column 'text' is not valid UTF-8 (damaged, or written "
                                           "by another program)")
    with pytest.raises(sqlite3.OperationalError) as missing:
        db.execute("SELECT missing FROM t")
    assert describe(missing.value) == "no such column: missing"
    db.close()
    with pytest.raises(sqlite3.ProgrammingError) as closed:
        db.execute("SELECT 1")
    assert describe(closed.value) == "ProgrammingError"  # raised by the module itself: its type only
    assert describe(OSError(28, "No space left on device")) == "OSError: [Errno 28] No space left on device"


async def test_an_inbox_entry_that_cannot_be_read_back_is_set_aside_by_its_ids_and_the_rest_is_recovered(
        tmp_path, caplog):
    path = tmp_path / "bot.inbox.sqlite3"
    inbox = Inbox(path)
    entries = await inbox.accept([IncomingMessage("line", "U1", "U1", "LINE user", f"{MARKER} {i}", True,
                                                  event_id=f"E{i}", delivery={"reply_token": "t"}) for i in range(4)])
    inbox.close()
    damage(path, "UPDATE entries SET text = CAST(? AS TEXT) WHERE id = ?", DAMAGED, entries[0].id)
    damage(path, "UPDATE entries SET delivery = ? WHERE id = ?", MARKER + " {", entries[1].id)
    damage(path, "UPDATE entries SET attempts = ? WHERE id = ?", '[["reply"]]', entries[2].id)

    caplog.set_level(logging.ERROR)
    inbox = Inbox(path)
    assert [e.message.event_id for e in inbox.recovered] == ["E3"]
    assert await inbox.counts() == {"unreadable": 3, "unfinished": 1}
    inbox.close()
    assert "MARKER" not in caplog.text
    lines = [r.getMessage() for r in caplog.records]
    for entry, why in zip(entries[:3], ("text that is not UTF-8", "delivery data that is not JSON", "ValueError"),
                          strict=True):
        assert any(f"inbox entry {entry.id} (event {entry.message.event_id}) cannot be read back ({why}" in line
                   for line in lines), lines
    with sqlite3.connect(path) as db:  # the trace: the ids and the outcome, not the text
        assert db.execute("SELECT COUNT(*) FROM entries WHERE outcome = 'unreadable' AND text = ''").fetchone() == (3,)
    inbox = Inbox(path)
    assert [e.message.event_id for e in inbox.recovered] == ["E3"]  # set aside once, for good
    inbox.close()


def test_a_damaged_memory_turn_is_an_error_naming_the_file_not_the_turn(tmp_path):
    path = tmp_path / "memory.sqlite3"
    with ConversationMemory(path) as memory:
        memory.append("line:U1", "健太", "ふつうの話")
    damage(path, "UPDATE turns SET text = CAST(? AS TEXT)", DAMAGED)
    with ConversationMemory(path) as memory, pytest.raises(MemoryStoreError) as raised:
        memory.recent("line:U1", 10)
    assert "MARKER" not in str(raised.value)
    assert str(raised.value).startswith(f"{path}: the memory database is damaged (a stored value in column 'text' "
                                        "is not valid UTF-8")


def test_a_damaged_name_is_logged_without_it_and_looked_up_again(tmp_path, caplog):
    path = tmp_path / "memory.names.sqlite3"
    names = NameCache(path)
    names.put("line:U1", "健太", 0.0)
    names.close()
    damage(path, "UPDATE names SET name = CAST(? AS TEXT)", DAMAGED)
    caplog.set_level(logging.ERROR)
    names = NameCache(path)
    assert names.get("line:U1") is None  # unknown: asked of LINE again
    names.close()
    assert "MARKER" not in caplog.text and "is not valid UTF-8" in caplog.text
