"""Values a user types for a flag or a config key, read one way by both: a duration and a list of export formats.
A leaf: the config file's model (finetune/config.py) and prepare's flags (prepare_args.py) both take them from here."""

from __future__ import annotations

import argparse
import re

from .trainer_formats import FORMATS as EXPORT_FORMATS

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_UNIT_SECONDS = {"": 60, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90' (minutes), '30m', '3h', '1d', '45s' -> seconds."""
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 30m, 3h, 1d)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def parse_export_formats(text: str) -> list[str]:
    """'sharegpt,alpaca' -> ['sharegpt', 'alpaca']; an unknown name is a usage error, before any reading."""
    names = [n.strip().lower() for n in str(text).split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPORT_FORMATS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown export format {(unknown or [text])[0]!r}; known: {', '.join(EXPORT_FORMATS)}"
        )
    return names
