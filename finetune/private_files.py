"""Files made from someone's chats are readable by their owner only: folders 0700, files 0600.

Explicit modes rather than the process umask: a umask is process-wide (it would also tighten the
shared Hugging Face cache a base model is downloaded into) and a library saving files (transformers,
peft, safetensors, the Trainer's checkpoints) creates them 0644 whatever bunshin asks. So whatever is
written into an output folder is tightened before the folder appears (finetune/atomic_output.py),
checkpoints after each save (finetune/train.py), and SQLite files are created 0600 before SQLite
opens them (SQLite gives its -wal and -shm files the database file's mode).

Only what bunshin creates is changed: a folder that already exists (your home, a mounted volume)
keeps its mode.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def make_private_dirs(folder: Path) -> list[Path]:
    """`folder` and its missing parents, each created 0700 (Path.mkdir(parents=True) would give the
    parents the umask's mode). Returns the folders it created, outermost first."""
    folder = Path(folder)
    missing = []
    for candidate in [folder, *folder.parents]:
        if candidate.exists():
            break
        missing.append(candidate)
    created = []
    for path in reversed(missing):
        try:
            path.mkdir(mode=DIR_MODE)
        except FileExistsError:  # made meanwhile by another process: its mode is not ours to change
            continue
        os.chmod(path, DIR_MODE)  # mkdir's mode is masked by the umask; 0700 needs no unmasking, but be exact
        created.append(path)
    return created


def make_tree_private(root: Path) -> None:
    """Every folder under `root` (itself included) 0700, every file 0600; symbolic links are left alone."""
    root = Path(root)
    _tighten(root, DIR_MODE)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            _tighten(Path(folder) / name, DIR_MODE)
        for name in files:
            _tighten(Path(folder) / name, FILE_MODE)


def create_private_file(path: Path) -> None:
    """`path` created empty with mode 0600 if it does not exist (an empty file is a new SQLite database);
    an existing regular file of ours, and its SQLite -wal / -shm companions, tightened to 0600. Anything
    else (a folder, someone else's file) is left for the opener to report."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        for existing in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            _tighten(existing, FILE_MODE, only_regular_files=True)
        return
    except OSError:  # no such folder, no permission: sqlite3.connect says so in its own words
        return
    os.close(fd)
    os.chmod(path, FILE_MODE)  # O_CREAT's mode is masked by the umask too


def _tighten(path: Path, mode: int, only_regular_files: bool = False) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode) or (only_regular_files and not stat.S_ISREG(info.st_mode)):
        return
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        return  # not ours: chmod would fail, and the file is not one bunshin made
    if stat.S_IMODE(info.st_mode) != mode:
        os.chmod(path, mode)
