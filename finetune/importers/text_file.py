"""Decoding text exports with errors that point at the bad line."""

from __future__ import annotations

from pathlib import Path

from .errors import ExportError


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """The whole file as str, BOM removed. Undecodable bytes raise ExportError with their line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ExportError(path, None, "no such file") from None
    except IsADirectoryError:
        raise ExportError(path, None, "is a folder, expected a file") from None
    except OSError as exc:
        raise ExportError(path, None, f"cannot read: {exc.strerror}") from None
    return decode(data, path, encoding)


def decode(data: bytes, path: Path | str, encoding: str = "utf-8") -> str:
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        bad = data[exc.start : exc.end].hex(" ")
        hint = " (re-saved on Japanese Windows? try --encoding cp932)" if encoding.lower().replace("-", "") in ("utf8", "utf8sig") else ""
        raise ExportError(path, line, f"bytes {bad} at column {column} are not valid {encoding}{hint}") from None
    except LookupError:
        raise ExportError(path, None, f"unknown encoding {encoding!r}") from None
    return text[1:] if text.startswith("\ufeff") else text
