"""`finetune inspect`: who said what in an export, counted as finetune/records.py defines the kinds."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from .records import PLACEHOLDER, SYSTEM, TEXT, ChatRecord, is_multiline


@dataclass
class SpeakerCounts:
    text: int = 0
    placeholder: int = 0
    first: datetime | None = None
    last: datetime | None = None


@dataclass
class ExportSummary:
    format: str
    speakers: dict[str, SpeakerCounts] = field(default_factory=dict)
    system: int = 0
    multiline: int = 0
    first: datetime | None = None
    last: datetime | None = None

    def as_json(self) -> dict:
        """The stable contract of `inspect --json` (the README shows it): keep these keys exactly."""
        return {
            "format": self.format,
            "speakers": {name: {"text": c.text, "placeholder": c.placeholder} for name, c in self.speakers.items()},
            "system": self.system,
            "multiline": self.multiline,
        }


def summarize(fmt: str, records: Iterable[ChatRecord]) -> ExportSummary:
    # This loop is the whole cost of `inspect` on a 1M-line export: keep it flat.
    speakers: dict[str, SpeakerCounts] = {}
    system = multiline = 0
    first = last = None
    for record in records:
        kind = record.kind
        if kind == SYSTEM:
            system += 1
            continue
        counts = speakers.get(record.speaker)
        if counts is None:
            counts = speakers[record.speaker] = SpeakerCounts()
        if kind == TEXT:
            counts.text += 1
            if is_multiline(record):
                multiline += 1
        elif kind == PLACEHOLDER:
            counts.placeholder += 1
        time = record.time
        if time is not None:
            if counts.first is None or time < counts.first:
                counts.first = time
            if counts.last is None or time > counts.last:
                counts.last = time
    for counts in speakers.values():
        if counts.first is not None and (first is None or counts.first < first):
            first = counts.first
        if counts.last is not None and (last is None or counts.last > last):
            last = counts.last
    ordered = dict(sorted(speakers.items(), key=lambda kv: -(kv[1].text + kv[1].placeholder)))
    return ExportSummary(fmt, ordered, system, multiline, first, last)
