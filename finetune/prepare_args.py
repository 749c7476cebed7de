"""The flags of `finetune prepare`: every knob of sample building, with defaults for chat data."""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli_values import parse_duration, parse_export_formats


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1): {text}")
    return value


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="TOML",
                   help="take defaults from the [prepare] table of this file (flags still win)")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="export files or folders, any mix of platforms")
    p.add_argument("--persona", required=True, help="the person to clone, as `inspect` names them")
    p.add_argument("--alias", action="append", default=[], metavar="NAME", help="another name of the persona (repeatable)")
    p.add_argument("--name", default=None, metavar="NAME",
                   help="the persona home to write: personas/NAME/dataset (default: the persona's name; "
                   "BUNSHIN_HOME moves personas/)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="write the dataset (train.jsonl, eval.jsonl, stats.json) here instead of the persona home")
    p.add_argument("--force", action="store_true", help="replace DIR if it already holds a dataset")
    p.add_argument(
        "--exclude-speaker",
        action="append",
        default=[],
        metavar="NAME",
        help="drop everything this person said, context included (for people who did not consent); repeatable",
    )
    p.add_argument("--session-gap", type=parse_duration, default=parse_duration("3h"), metavar="DURATION",
                   help="silence that starts a new conversation (default 3h)")
    p.add_argument("--max-context-turns", type=int, default=10, metavar="N",
                   help="earlier turns kept as context for each reply (default 10)")
    p.add_argument("--max-context-chars", type=int, default=1500, metavar="N",
                   help="cap on the context's total characters; oldest turns go first (default 1500)")
    p.add_argument("--max-turn-chars", type=int, default=1000, metavar="N",
                   help="a merged turn longer than this is cut (context) or skipped (target) (default 1000)")
    p.add_argument("--min-context-turns", type=int, default=0, metavar="N",
                   help="skip replies with fewer earlier turns than this (default 0: openers are kept)")
    p.add_argument("--eval-fraction", type=_fraction, default=0.05, metavar="F",
                   help="share of samples, taken from the latest conversations, held out for eval (default 0.05)")
    p.add_argument("--no-redact", action="store_true", help="keep URLs, e-mail addresses, phone numbers, postal codes, street addresses, card numbers and My Numbers")
    p.add_argument("--timezone", default=None, metavar="TZ",
                   help="zone of exports without an offset (LINE), e.g. Asia/Tokyo; default: this machine's")
    p.add_argument("--export", type=parse_export_formats, action="extend", default=[], metavar="FORMAT[,FORMAT]",
                   help="also write the samples for other trainers: sharegpt (LLaMA-Factory, unsloth), alpaca, "
                   "messages (TRL, axolotl); repeatable or a comma list")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def prepare_defaults_from_config(path: Path) -> dict:
    """argparse defaults from the [prepare] table of a config file: only the keys it sets, so the other flags
    keep their own defaults. The whole file is read and validated by finetune/config.py (its pydantic model), whose
    ConfigError names every problem; imported here, not above, so that `inspect` never loads pydantic."""
    from .config import load_config

    defaults = load_config(path).prepare.overrides()
    if "redact" in defaults:  # the file says what to do, the flag what not to
        defaults["no_redact"] = not defaults.pop("redact")
    return defaults
