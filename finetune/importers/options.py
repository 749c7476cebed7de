"""Knobs an importer may need beyond the path itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ReadOptions:
    # LINE PC "save chat": names that may contain spaces, so a line can be split into name and text.
    speakers: tuple[str, ...] = ()
    # LINE `Mon, 08/05/2024` dates: "auto" decides from values > 12, else "mdy" (LINE's English default).
    date_order: str = "auto"
    # Text encoding of .txt/.csv exports; UTF-8 by default, cp932 for files re-saved on Japanese Windows.
    encoding: str = "utf-8"
    # Called now and then with the number of bytes of the source consumed so far (progress bars).
    on_progress: Callable[[int], None] | None = None
