"""What `finetune eval` scores: held-out samples, and replies of other systems read from JSONL.

The held-out samples are `eval.jsonl` from `prepare`: the latest whole conversations, never seen in
training. `--samples N` takes a seeded random subset, kept in file order, so two runs with the same
seed score the same samples and a report can be compared with an earlier one.

A `--system NAME=FILE` is any other source of replies (another bot, a prompt-only baseline, an earlier
adapter's `replies/tuned.jsonl`): one `{"id": SAMPLE_ID, "reply": TEXT}` per line. Every problem in
such a file is an error naming the file and line: a reply to a sample that does not exist would be
scored against nothing, and a missing one would quietly shrink the comparison.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

# Names the report gives itself: the reference, and the two systems an ADAPTER brings.
RESERVED_NAMES = ("real", "base", "tuned")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,39}$")


class EvalError(Exception):
    """Bad input to `finetune eval`; the message names the file (and line) and what is wrong."""


@dataclass(frozen=True)
class SystemFile:
    name: str
    path: Path


def choose_samples(samples: list[dict], count: int, seed: int) -> list[dict]:
    """`count` samples picked at random with `seed`, in their file order (all of them if fewer)."""
    if count <= 0 or count >= len(samples):
        return list(samples)
    picked = sorted(random.Random(seed).sample(range(len(samples)), count))
    return [samples[i] for i in picked]


def parse_system_arg(text: str) -> SystemFile:
    """`NAME=FILE` from the command line."""
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise EvalError(f"--system {text!r}: expected NAME=REPLIES.jsonl")
    if not _NAME.match(name):
        raise EvalError(f"--system {text!r}: a name is 1-40 letters, digits, '_', '.' or '-'")
    return SystemFile(name, Path(path))


def check_names(systems: list[SystemFile], with_adapter: bool) -> None:
    seen: set[str] = set()
    reserved = RESERVED_NAMES if with_adapter else ("real",)
    for system in systems:
        if system.name in reserved:
            why = "the persona's real replies" if system.name == "real" else "the ADAPTER's system of that name"
            raise EvalError(f"--system {system.name}={system.path}: {system.name!r} is taken by {why}; pick another name")
        if system.name in seen:
            raise EvalError(f"--system {system.name}: given twice")
        seen.add(system.name)


def read_system_replies(system: SystemFile, known_ids: set[str], wanted_ids: list[str]) -> dict[str, str]:
    """{sample id: reply} for the samples being scored. `known_ids` are every id in eval.jsonl."""
    path = system.path
    if not path.is_file():
        raise EvalError(f"--system {system.name}: {path}: no such file")
    replies: dict[str, str] = {}
    first_line: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EvalError(f"{path}:{n}: not JSON ({exc.msg})") from None
                if not (isinstance(item, dict) and isinstance(item.get("id"), str) and isinstance(item.get("reply"), str)):
                    raise EvalError(f'{path}:{n}: expected {{"id": "<sample id>", "reply": "<text>"}}')
                sample_id = item["id"]
                if sample_id not in known_ids:
                    raise EvalError(f"{path}:{n}: id {sample_id!r} is not a sample in eval.jsonl")
                if sample_id in first_line:
                    raise EvalError(f"{path}:{n}: id {sample_id!r} again (first on line {first_line[sample_id]})")
                first_line[sample_id] = n
                replies[sample_id] = item["reply"]
    except UnicodeDecodeError as exc:
        raise EvalError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not replies:
        raise EvalError(f"{path}: empty: no replies in it")
    missing = [i for i in wanted_ids if i not in replies]
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise EvalError(f"{path}: no reply for {len(missing)} of the {len(wanted_ids)} samples scored (ids {shown})")
    return {i: replies[i] for i in wanted_ids}
