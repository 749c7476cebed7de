"""The persona's profile: a short file of facts in their own words, at the top of every prompt.

Memory recalls what the person happened to say; a profile is what someone who knows them chooses to write
down, so the clone has it in every reply, e.g.

    # 彩花のプロフィール (lines starting with # are comments)
    新潟出身、いまは船橋に住んでる。
    猫のこむぎと暮らしてる🐈
    仕事は物流の会社で事務。

One fact a line, as the person would say it. Kept short on purpose: every line is in every prompt.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

MAX_LINES = 40
MAX_LINE_CHARS = 200
MAX_BYTES = 16 * 1024


class ProfileError(Exception):
    """A profile that cannot be used; the message says `FILE:LINE: what`."""


def read_profile(path: Path) -> tuple[str, ...]:
    """The profile's lines (comments and blank lines left out). ProfileError for anything else than short text."""
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"{path}: no such file")
    raw = path.read_bytes()
    if len(raw) > MAX_BYTES:
        raise ProfileError(f"{path}: {len(raw):,} bytes; a profile is a few short lines (at most {MAX_BYTES // 1024} KiB)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ProfileError(f"{path}:{line}: not UTF-8 text") from None
    lines = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if any(unicodedata.category(c) in ("Cc", "Cs") or c in "\u2028\u2029" for c in line):
            raise ProfileError(f"{path}:{n}: control characters; write plain text, one fact a line")
        if len(line) > MAX_LINE_CHARS:
            raise ProfileError(f"{path}:{n}: {len(line)} characters; keep a line under {MAX_LINE_CHARS} (one fact a line)")
        lines.append(line)
        if len(lines) > MAX_LINES:
            raise ProfileError(f"{path}:{n}: more than {MAX_LINES} lines; every line is in every prompt, so keep it short")
    if not lines:
        raise ProfileError(f"{path}: no lines in it (only comments or blank lines)")
    return tuple(lines)
