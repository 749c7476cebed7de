"""The persona home: one private folder per persona for everything made from their chats.

    personas/                 the root (BUNSHIN_HOME overrides it), 0700, with a .gitignore of `*`
    └── misaki/               one persona (`prepare --name misaki`, else the persona's own name)
        ├── dataset/          prepare: train.jsonl, eval.jsonl, stats.json
        ├── adapter/          train: the LoRA adapter (peft files + bunshin.json)
        ├── adapter.checkpoints/  train, while it runs (kept after a finished run only with --keep-checkpoints)
        ├── report/           eval: report.html, report.json, replies/
        ├── merged/           merge: full weights + tokenizer
        └── memory.sqlite3    the bot: memory, with memory.inbox.sqlite3 and memory.names.sqlite3 beside it

Every file in it holds the person's words or was computed from them (a tokenizer trained on the chats
included), so the whole tree is created readable by its owner only (private_files.py) and ignored by
git wherever it is copied (the root's own .gitignore). The commands take the home as their unit
(`train personas/misaki`); the explicit forms (`train DATA --out ADAPTER`) still work. Wherever an
output goes, it never goes into one of bunshin's source packages: `--out adapters/misaki` used to put a
LoRA adapter into the platform adapters' package, one `git add .` from a public repository.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from .private_files import create_private_file, make_private_dirs

ROOT_ENV = "BUNSHIN_HOME"
DEFAULT_ROOT = "personas"
GITIGNORE = "*\n"
MEMORY_FILE = "memory.sqlite3"

# The folders of a bunshin checkout that hold code, tests and documentation, and what each one is.
SOURCE_PACKAGES = {
    "bot": "the bot daemon's code",
    "finetune": "the training code",
    "adapters": "the platform adapters' code (Discord, LINE, console), not a place for LoRA adapters",
    "tests": "the test suite",
    "bench": "the benchmarks",
    "docs": "the documentation",
}
_PARTS = ("dataset", "adapter", "report", "merged")


class PersonaHomeError(Exception):
    """An output path that may not be used, or a persona home that lacks what a command needs; str() says which
    and what to do."""


@dataclass(frozen=True)
class PersonaHome:
    path: Path

    @property
    def dataset(self) -> Path:
        return self.path / "dataset"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def report(self) -> Path:
        return self.path / "report"

    @property
    def merged(self) -> Path:
        return self.path / "merged"

    @property
    def memory(self) -> Path:
        return self.path / MEMORY_FILE

    def model(self) -> Path | None:
        """What `chat` and `eval` load: the adapter, else the merged model; None when there is neither."""
        return next((p for p in (self.adapter, self.merged) if p.is_dir()), None)


def personas_root() -> Path:
    """Where persona homes are made: $BUNSHIN_HOME, else `personas` in the current folder."""
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def home_named(name: str) -> PersonaHome:
    """The home of the persona called `name` (prepare's --name, or the persona's own name) under the root."""
    if not name.strip() or name != name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise PersonaHomeError(f"{name!r} cannot name a folder: give the persona home a plain name with --name "
                               "(letters, digits, - or _; e.g. --name misaki)")
    return PersonaHome(personas_root() / name)


def as_persona_home(path: Path) -> PersonaHome | None:
    """`path` as a persona home, or None: a folder that is neither a dataset nor a model itself and holds one
    of a home's parts, or any folder directly under the root."""
    path = Path(path)
    if not path.is_dir() or any((path / f).exists() for f in ("train.jsonl", "bunshin.json", "config.json")):
        return None
    if any((path / part).is_dir() for part in _PARTS) or _same(path.parent, personas_root()):
        return PersonaHome(path)
    return None


def refuse_source_package(path: Path) -> None:
    """PersonaHomeError when `path` is inside one of bunshin's source packages (in this checkout or any other)."""
    resolved = Path(os.path.abspath(path))
    try:
        resolved = resolved.resolve()
    except OSError:
        pass
    for inside in [resolved, *resolved.parents]:
        if inside.name in SOURCE_PACKAGES and _is_bunshin_checkout(inside.parent):
            raise PersonaHomeError(
                f"{path} is inside {inside.name}/, {SOURCE_PACKAGES[inside.name]}: nothing made from chats may go "
                f"there. Use a persona home, e.g. {personas_root() / Path(path).name}/ (README: \"Where your data lives\")")


def make_output_parent(out: Path) -> None:
    """Before `out` (a folder or file) is written: refused inside a source package; its missing parents created
    0700; the persona root, when this creates it, given its .gitignore, so that git ignores the whole tree
    wherever it is copied."""
    refuse_source_package(out)
    out = Path(out)
    root = personas_root()
    if _within(out, root) and not root.exists():
        for created in make_private_dirs(root):
            if _same(created, root):  # only a root made here: BUNSHIN_HOME may name a folder of the user's own
                create_private_file(root / ".gitignore")
                (root / ".gitignore").write_text(GITIGNORE, encoding="utf-8")
    make_private_dirs(out.parent)


def make_private_file(path: Path) -> None:
    """Before a file made from chats is opened for writing (the bot's SQLite files): make_output_parent, then the
    file created 0600 if missing (private_files.create_private_file)."""
    make_output_parent(path)
    create_private_file(path)


def resolve_command_paths(args: argparse.Namespace) -> None:
    """The persona-home forms of the model commands, turned into their explicit forms in `args`:

        prepare EXPORTS --persona P [--name N]   --out ROOT/N/dataset (N: the persona's name unless given)
        train HOME                               DATA = HOME/dataset, --out HOME/adapter
        eval HOME                                ADAPTER = HOME/adapter, --data HOME/dataset, --out HOME/report
        chat HOME                                ADAPTER = HOME/adapter (else HOME/merged); with --system base or
                                                 prompt-only and no adapter, --data HOME/dataset
        merge HOME                               ADAPTER = HOME/adapter, --out HOME/merged

    A flag given explicitly wins over the home's default; the old forms (`train DATA --out ADAPTER`) are left
    as they are. Any command's output (tiny-model's too) inside a source package is refused here."""
    command = args.command
    if command == "prepare":
        if args.out is None:
            args.out = home_named(args.name or args.persona).dataset
        elif args.name:
            raise PersonaHomeError("--name and --out both say where the dataset goes: give one of them")
    elif command == "train":
        home = as_persona_home(args.data)
        if home is not None:
            if not (home.dataset / "train.jsonl").is_file():
                raise PersonaHomeError(f"{home.path} has no dataset yet ({home.dataset}/train.jsonl): "
                                       f"run `python -m finetune prepare EXPORTS --persona NAME --name {home.path.name}` first")
            args.data = home.dataset
            args.out = args.out or home.adapter
        elif args.out is None:
            raise PersonaHomeError(_not_a_home(args.data, "train", "a dataset folder with --out ADAPTER"))
    elif command == "eval":
        home = as_persona_home(args.adapter) if args.adapter is not None else None
        if home is not None:
            args.adapter = home.model()
            if args.adapter is None and not args.system:
                raise PersonaHomeError(f"{home.path} has no adapter yet: run `python -m finetune train {home.path}` first")
            args.data = args.data or home.dataset
            args.out = args.out or home.report
        missing = [flag for flag, value in (("--data", args.data), ("--out", args.out)) if value is None]
        if missing:
            raise PersonaHomeError(f"{' and '.join(missing)} required: give a persona home (`python -m finetune eval "
                                   f"personas/NAME`) or ADAPTER --data DATASET --out REPORT")
    elif command in ("chat", "merge"):
        home = as_persona_home(args.adapter)
        if home is not None:
            model = (home.adapter if home.adapter.is_dir() else None) if command == "merge" else home.model()
            if model is None and command == "chat" and args.system in ("base", "prompt-only"):
                args.data = args.data or home.dataset  # the --base model alone, with the dataset's persona and memory
            elif model is None:
                raise PersonaHomeError(f"{home.path} has no adapter yet: run `python -m finetune train {home.path}` first")
            args.adapter = model
            if command == "merge":
                args.out = args.out or home.merged
        elif command == "merge" and args.out is None:
            raise PersonaHomeError(_not_a_home(args.adapter, "merge", "an adapter folder with --out DIR"))
    if getattr(args, "out", None) is not None:
        refuse_source_package(args.out)  # now, before any model loads (atomic_output checks again when writing)


def _not_a_home(path: Path, command: str, explicit: str) -> str:
    if not Path(path).exists():
        if _same(Path(path).parent, personas_root()):
            return (f"{path}: no such persona home: `python -m finetune prepare EXPORTS --persona NAME --name "
                    f"{Path(path).name}` makes it")
        return f"{path}: no such folder"
    return (f"{path} is not a persona home (it holds none of {', '.join(p + '/' for p in _PARTS)}): give one, "
            f"e.g. `python -m finetune {command} personas/NAME`, or {explicit}")


def _is_bunshin_checkout(folder: Path) -> bool:
    return all((folder / package / "__init__.py").is_file() for package in ("bot", "finetune", "adapters"))


def _within(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return path == folder or folder in path.parents


def _same(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)
