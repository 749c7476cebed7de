"""Fact probes: does the clone know what the person said, and the latest version of it?

A probe is one JSON line a friend of the person can write in a minute:

    {"id": "job", "turns": [{"speaker": "ゆうと", "text": "今どこで働いてるんだっけ？"}],
     "right": ["物流"], "stale": ["銀行"], "wrong": ["病院", "学校"]}
    {"id": "blood", "turns": [{"speaker": "ゆうと", "text": "血液型なに？"}],
     "never_stated": true, "wrong": ["A型", "B型", "O型", "AB型"]}

- `turns`: the conversation opener (a string is taken as one turn by "友達").
- `right`: any of these in the reply is the right answer (the latest, where it changed).
- `stale`: an older value of a fact that changed; `wrong`: values that would be wrong (for a fact the
  person never stated: the specific values the clone could invent).
- `abstain` (optional): more ways of saying "I don't know / won't say" than the built-in ones.

Each reply is scored, in this order: right (a `right` value is in it), stale (a `stale` one is), wrong
(a `wrong` one is), abstained (it declines: わからない, 秘密, 覚えてない, ...), and otherwise wrong for a
stated fact (it answered, not with the fact) and abstained for a never-stated one (it named no value).
Matching is on NFKC-folded, case-folded text, so ｶﾀｶﾅ and full-width letters match.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .prompt import ChatTurn

OUTCOMES = ("right", "stale", "wrong", "abstained")
DEFAULT_SPEAKER = "友達"
MAX_PROBES = 10_000

# Ways people decline in chat. Deliberately short and common; a probe may add its own.
ABSTAIN = (
    "わからない", "わかんない", "分からない", "分かんない", "知らない", "知らん", "しらない", "覚えてない", "おぼえてない",
    "忘れた", "わすれた", "秘密", "ひみつ", "ないしょ", "内緒", "どうだろ", "言ってない",
    "決めてない", "考えたことない", "考えたことなかった", "不明",
    "i don't know", "i dont know", "not sure", "no idea", "can't remember", "secret",
)


class ProbeError(Exception):
    """A probes file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Probe:
    id: str
    turns: tuple[ChatTurn, ...]
    right: tuple[str, ...]
    stale: tuple[str, ...] = ()
    wrong: tuple[str, ...] = ()
    abstain: tuple[str, ...] = ()
    never_stated: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.stale)


def fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def score_reply(probe: Probe, reply: str) -> str:
    """One of OUTCOMES for `reply` to `probe` (the order of the checks is the module docstring's)."""
    said = fold(reply)

    def has(values: tuple[str, ...]) -> bool:
        return any(fold(v) in said for v in values if v)

    if has(probe.right):
        return "right"
    if has(probe.stale):
        return "stale"
    if has(probe.wrong):
        return "wrong"
    if has(ABSTAIN) or has(probe.abstain):
        return "abstained"
    return "abstained" if probe.never_stated else "wrong"


def _strings(row: dict, key: str, where: str, *, required: bool = False) -> tuple[str, ...]:
    value = row.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ProbeError(f"{where}: {key!r} must be a list of non-empty strings")
    if required and not value:
        raise ProbeError(f"{where}: {key!r} needs at least one accepted answer (or set \"never_stated\": true)")
    return tuple(value)


def _turns(row: dict, where: str) -> tuple[ChatTurn, ...]:
    value = row.get("turns")
    if isinstance(value, str) and value.strip():
        return (ChatTurn(DEFAULT_SPEAKER, value),)
    if not isinstance(value, list) or not value:
        raise ProbeError(f"{where}: 'turns' must be the opener: a string or a list of {{\"speaker\", \"text\"}}")
    turns = []
    for i, turn in enumerate(value):
        if not (isinstance(turn, dict) and isinstance(turn.get("speaker"), str) and turn["speaker"].strip()
                and isinstance(turn.get("text"), str) and turn["text"].strip()):
            raise ProbeError(f"{where}: turns[{i}] needs a non-empty \"speaker\" and \"text\"")
        turns.append(ChatTurn(turn["speaker"], turn["text"]))
    return tuple(turns)


def read_probes(path: Path) -> list[Probe]:
    """The probes in `path`; ProbeError (`FILE:LINE: what`) for anything malformed, before any model loads."""
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"{path}: no such file")
    probes: list[Probe] = []
    seen: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ProbeError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise ProbeError(f"{where}: not JSON ({reason})") from None
        if not isinstance(row, dict):
            raise ProbeError(f"{where}: a probe is a JSON object")
        unknown = set(row) - {"id", "turns", "right", "stale", "wrong", "abstain", "never_stated", "note"}
        if unknown:
            raise ProbeError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        probe_id = row.get("id")
        if not isinstance(probe_id, str) or not probe_id.strip():
            raise ProbeError(f"{where}: 'id' must be a non-empty string")
        if probe_id in seen:
            raise ProbeError(f"{where}: id {probe_id!r} is already used on line {seen[probe_id]}")
        never = row.get("never_stated", False)
        if not isinstance(never, bool):
            raise ProbeError(f"{where}: 'never_stated' must be true or false")
        right = _strings(row, "right", where, required=not never)
        if never and right:
            raise ProbeError(f"{where}: a never-stated fact has no right answer; list invented values under 'wrong'")
        probe = Probe(probe_id, _turns(row, where), right, _strings(row, "stale", where), _strings(row, "wrong", where),
                      _strings(row, "abstain", where), never)
        clash = set(map(fold, probe.right)) & set(map(fold, probe.stale + probe.wrong))
        if clash:
            raise ProbeError(f"{where}: {sorted(clash)[0]!r} is both a right answer and a stale/wrong one")
        seen[probe_id] = n
        probes.append(probe)
        if len(probes) > MAX_PROBES:
            raise ProbeError(f"{where}: more than {MAX_PROBES} probes")
    if not probes:
        raise ProbeError(f"{path}: no probes in the file")
    return probes


def summarize(probes: list[Probe], outcomes: list[str]) -> dict:
    """Fact accuracy, stale rate and invention rate for one system's outcomes (one per probe, same order)."""
    stated = [o for p, o in zip(probes, outcomes, strict=True) if not p.never_stated]
    changed = [o for p, o in zip(probes, outcomes, strict=True) if p.changed]
    never = [o for p, o in zip(probes, outcomes, strict=True) if p.never_stated]

    def share(items: list[str], outcome: str) -> float | None:
        return round(sum(o == outcome for o in items) / len(items), 4) if items else None

    return {
        "probes": len(probes),
        "counts": {o: sum(x == o for x in outcomes) for o in OUTCOMES},
        "fact_accuracy": share(stated, "right"),  # of the stated facts, answered right
        "stale_rate": share(changed, "stale"),  # of the changed facts, the old value given
        "invented_rate": share(never, "wrong"),  # of the never-stated facts, a specific value invented
        "abstained_rate": share(stated, "abstained"),
        "stated": len(stated),
        "changed": len(changed),
        "never_stated": len(never),
    }
