"""What a SQLite error may say in a log line or an error message: never a stored value.

The inbox, memory and name cache hold people's messages and names. Python's sqlite3 puts a stored
value into one of its own errors: a text column that is not valid UTF-8 (a damaged page, another
program's write) raises OperationalError("Could not decode to UTF-8 column 'text' with text '<the
stored text>'"), so a corrupt row would print someone's message into the log and onto the
operator's terminal. SQLite's own errors (they carry `sqlite_errorname`) name files, tables,
columns and constraints, never a value bound as a parameter, which is how bunshin passes every
value: those are kept as they are. The decoding error keeps its column and loses its text; any
other error raised by the sqlite3 module itself is reduced to its type.
"""

from __future__ import annotations

import re
import sqlite3

_UNDECODABLE = re.compile(r"Could not decode to UTF-8 column '([^']*)'")


def describe(exc: BaseException) -> str:
    """`exc` in words fit for a log line: what went wrong, without any stored value."""
    if not isinstance(exc, sqlite3.Error):
        return f"{type(exc).__name__}: {exc}"
    if getattr(exc, "sqlite_errorname", None):  # SQLite's own message
        return str(exc)
    if found := _UNDECODABLE.match(str(exc)):
        return f"a stored value in column {found[1]!r} is not valid UTF-8 (damaged, or written by another program)"
    return type(exc).__name__
