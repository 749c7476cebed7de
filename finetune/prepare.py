"""`finetune prepare`: chat exports in, `train.jsonl` / `eval.jsonl` / `stats.json` out.

Reads every input (any mix of platforms), checks the persona and the excluded people are
really in the data, builds samples (samples.py), redacts personal data (redact.py), splits
by time, and writes the folder atomically: on any error nothing is written.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, tzinfo
from pathlib import Path

from .atomic_output import atomic_directory, check_writable
from .importers import ReadOptions, check_exports, open_export
from .person_memory import entries_from_conversations, write_memory
from .progress import WatchedProgress
from .records import ChatRecord
from .redact import KINDS, Redactor
from .samples import (
    BuildStats,
    Conversation,
    SampleOptions,
    build_samples,
    split_by_time,
    split_conversations,
)
from .trainer_formats import write_exports

BURST_GAP_S = 10 * 60


class PrepareError(Exception):
    """A problem with the request as a whole (persona not found, nothing to train on)."""


def _local_timezone(name: str | None) -> tzinfo:
    if name:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise PrepareError(f"--timezone {name!r} is not a known time zone (example: Asia/Tokyo)") from None
    return datetime.now().astimezone().tzinfo


def _closest(name: str, candidates: Counter) -> str:
    names = list(candidates)
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    folded = name.casefold()
    close += [n for n in names if (folded in n.casefold() or n.casefold() in folded) and n not in close]
    if not close:
        close = [n for n, _ in candidates.most_common(5)]
        return "speakers with the most messages: " + ", ".join(close)
    return "closest names: " + ", ".join(close[:5])


class _Progress(WatchedProgress):
    """A rich progress bar over the inputs' bytes, only when a person is watching stderr."""

    def __init__(self, paths: list[Path], enabled: bool):
        if not self.watching(enabled):
            return
        total = sum(p.stat().st_size for p in paths if p.is_file())
        if total < 8 * 1024 * 1024:
            return  # small inputs finish before a bar would help
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("reading {task.fields[name]}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), transient=True,
        )
        self.task = self.bar.add_task("read", total=total, name="")
        self.done_before = 0

    def start(self, path: Path) -> Callable[[int], None] | None:
        if self.bar is None:
            return None
        self.bar.update(self.task, name=path.name, completed=self.done_before)
        return lambda done: self.bar.update(self.task, completed=self.done_before + done)

    def finish_file(self, path: Path) -> None:
        if self.bar is not None and path.is_file():
            self.done_before += path.stat().st_size


def read_streams(args: argparse.Namespace, read_options: Callable) -> tuple[list[tuple[str, str, list[ChatRecord]]], list[dict], list[int]]:
    """Every input as (source, format, records), one entry per chat inside each input; the inputs' counts;
    and for each stream the index of its input."""
    streams = []
    inputs = []
    stream_inputs = []
    with _Progress(args.paths, not args.no_progress) as progress:
        for path in args.paths:
            options: ReadOptions = read_options(args, progress.start(path))
            fmt, records = open_export(path, args.format, options)
            by_chat: dict[str, list[ChatRecord]] = {}
            for record in records:
                by_chat.setdefault(record.chat, []).append(record)
            progress.finish_file(path)
            counts = Counter(r.kind for chat in by_chat.values() for r in chat)
            inputs.append({"path": str(path), "format": fmt, "chats": len(by_chat), "records": sum(counts.values()),
                           **{k: counts[k] for k in ("text", "placeholder", "system")}})
            for chat, chat_records in by_chat.items():
                streams.append((f"{path.name}#{chat}" if chat else path.name, fmt, chat_records))
                stream_inputs.append(len(inputs) - 1)
    return streams, inputs, stream_inputs


def drop_package_overlap(streams: list[tuple[str, str, list[ChatRecord]]]) -> int:
    """A data package repeats the persona's messages that a DiscordChatExporter export of the
    same channel already has (same message ids); keep the export's copy, which has the replies."""
    exported_ids = {r.message_id for _, fmt, records in streams if fmt != "discord-package" for r in records if r.message_id}
    dropped = 0
    for i, (source, fmt, records) in enumerate(streams):
        if fmt == "discord-package" and exported_ids:
            kept = [r for r in records if r.message_id not in exported_ids]
            dropped += len(records) - len(kept)
            streams[i] = (source, fmt, kept)
    return dropped


def run_prepare(args: argparse.Namespace, read_options: Callable) -> int:
    try:
        return _run(args, read_options)
    except (PrepareError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, read_options: Callable) -> int:
    check_writable(args.out, replace=args.force)  # before reading gigabytes of exports, not after
    local = _local_timezone(args.timezone)
    check_exports(args.paths, args.format, read_options(args))  # every bad input named before the first is read
    options = SampleOptions(
        session_gap_s=args.session_gap,
        max_context_turns=args.max_context_turns,
        max_context_chars=args.max_context_chars,
        max_turn_chars=args.max_turn_chars,
        min_context_turns=args.min_context_turns,
        eval_fraction=args.eval_fraction,
    )
    streams, inputs, stream_inputs = read_streams(args, read_options)
    overlap = drop_package_overlap(streams)

    said = Counter(r.speaker for _, _, records in streams for r in records if r.speaker and r.kind == "text")
    anyone = Counter(r.speaker for _, _, records in streams for r in records if r.speaker)
    persona_names = [args.persona, *args.alias]
    if not any(said[n] for n in persona_names):
        raise PrepareError(
            f"persona {args.persona!r}{' (or its aliases)' if args.alias else ''} has no text messages in the inputs; "
            + _closest(args.persona, anyone or said)
        )
    for name in args.exclude_speaker:
        if name not in anyone:
            # A typo here would silently keep the words of someone who did not consent.
            raise PrepareError(f"--exclude-speaker {name!r} is not a speaker in the inputs; " + _closest(name, anyone))
    if set(args.exclude_speaker) & set(persona_names):
        raise PrepareError("the persona cannot also be excluded with --exclude-speaker")

    aliases = set(args.alias)
    rename = (lambda s: args.persona if s in aliases else s) if aliases else (lambda s: s)
    stats = BuildStats()
    conversations: list[Conversation] = []
    conversation_inputs: list[int] = []  # the input each conversation came from, for the counts per input
    excluded = frozenset(args.exclude_speaker)
    redactor = Redactor()
    for (source, _fmt, records), input_index in zip(streams, stream_inputs, strict=True):
        found = split_conversations(
            records, source=source, rename=rename, excluded=excluded, gap_s=options.session_gap_s,
            burst_gap_s=BURST_GAP_S, local=local, redact=(lambda t: t) if args.no_redact else redactor, stats=stats,
        )
        conversations += found
        conversation_inputs += [input_index] * len(found)
        # What this input gave the persona, after a data package's copies of exported messages were dropped.
        inputs[input_index]["persona_messages"] = inputs[input_index].get("persona_messages", 0) + sum(
            1 for r in records if r.kind == "text" and r.speaker in persona_names)
    samples = build_samples(conversations, args.persona, options, stats)
    if not samples:
        raise PrepareError(
            f"no training samples: {stats.persona_turns} turns by {args.persona!r}, of which "
            f"{stats.placeholder_only} only stickers/media, {stats.too_long} longer than --max-turn-chars, "
            f"{stats.too_little_context} with fewer than --min-context-turns earlier turns"
        )
    train, held_out = split_by_time(samples, conversations, options.eval_fraction)
    for item in inputs:
        item.setdefault("persona_messages", 0)
        item["samples"] = {"train": 0, "eval": 0}
    for part, part_samples in (("train", train), ("eval", held_out)):
        for sample in part_samples:
            inputs[conversation_inputs[sample.conversation]]["samples"][part] += 1
    # The persona's memory: every typed turn of theirs, eval conversations included (a sample only ever
    # recalls what was said before its conversation began, so eval replies cannot leak into eval prompts).
    memory_entries = entries_from_conversations(conversations, args.persona)

    train_rows = [s.as_json(args.persona) for s in train]
    eval_rows = [s.as_json(args.persona) for s in held_out]
    train_lines = [json.dumps(row, ensure_ascii=False) for row in train_rows]
    eval_lines = [json.dumps(row, ensure_ascii=False) for row in eval_rows]
    exports = list(dict.fromkeys(args.export))  # a format named twice is written once
    fingerprint = hashlib.sha256()
    for line in train_lines + ["--eval--"] + eval_lines:
        fingerprint.update(line.encode())
        fingerprint.update(b"\n")
    report = {
        "persona": args.persona,
        "aliases": args.alias,
        "excluded_speakers": args.exclude_speaker,
        "inputs": inputs,
        "conversations": len(conversations),
        "persona_turns": stats.persona_turns,
        "samples": {"train": len(train), "eval": len(held_out)},
        "skipped": {
            "placeholder_only": stats.placeholder_only,
            "too_long": stats.too_long,
            "too_little_context": stats.too_little_context,
            "duplicate": stats.duplicates,
        },
        "excluded_messages": stats.excluded_messages,
        "system_lines": stats.system_lines,
        "package_messages_also_in_exports": overlap,
        "redactions": {k: redactor.counts.get(k, 0) for k in KINDS},
        "split": {
            "train_last": max((s.time for s in train), default=None),
            "eval_first": min((s.time for s in held_out), default=None),
        },
        "options": {**asdict(options), "burst_gap_s": BURST_GAP_S, "redact": not args.no_redact, "timezone": str(local)},
        "fingerprint": fingerprint.hexdigest(),
        "exports": exports,
        "memory": {"notes": len(memory_entries)},
    }
    with atomic_directory(args.out, replace=args.force) as staging:
        (staging / "train.jsonl").write_text("".join(line + "\n" for line in train_lines), encoding="utf-8")
        (staging / "eval.jsonl").write_text("".join(line + "\n" for line in eval_lines), encoding="utf-8")
        written = write_exports(staging, exports, train_rows, eval_rows)  # inside: all files appear or none
        report["memory"]["sha256"] = write_memory(staging, memory_entries)
        (staging / "stats.json").write_text(json.dumps(report, ensure_ascii=False, indent=2, default=str) + "\n", encoding="utf-8")

    red = report["redactions"]
    print(
        f"{args.out}: {len(train)} train / {len(held_out)} eval samples from {len(conversations)} conversations; "
        f"redacted {red['url']} URLs, {red['email']} e-mails, {red['phone']} phone numbers, {red['postal_code']} postal codes, "
        f"{red['address']} addresses, {red['card']} card numbers, {red['my_number']} My Numbers"
    )
    for item in inputs:
        print(f"  {item['path']} ({item['format']}): {item['records']} records, {item['persona_messages']} text messages "
              f"by {args.persona} -> {item['samples']['train']} train / {item['samples']['eval']} eval samples")
    if written:
        print(f"{args.out}: for other trainers: {', '.join(written)}")
    if not held_out:
        print("note: eval.jsonl is empty (too few conversations to hold any out)", file=sys.stderr)
    return 0

