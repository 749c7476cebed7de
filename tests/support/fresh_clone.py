"""A fresh clone of this repository, as a new user gets one, for tests that run its documented commands.

`git clone` takes the last commit; the working tree's own changes (edited, new and deleted files, as
`git status` would list them) are then laid over the clone and committed there. So the code under
test is the code on disk, committed or not, and the clone's `git status` starts clean: whatever it
lists afterwards, the commands made.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .repo import REPO

GIT = ["git", "-c", "user.name=bunshin-test", "-c", "user.email=test@bunshin.local", "-c", "commit.gpgsign=false"]


def git(*args: str | Path, cwd: Path) -> str:
    done = subprocess.run([*GIT, *map(str, args)], cwd=cwd, capture_output=True, text=True, encoding="utf-8",
                          stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 0, f"git {' '.join(map(str, args))} in {cwd}: {done.stderr}"
    return done.stdout


def fresh_clone(dest: Path) -> Path:
    """This repository cloned into `dest`, with the working tree's uncommitted changes committed in the clone."""
    git("clone", "--quiet", "--no-hardlinks", REPO, dest, cwd=dest.parent)
    listed = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO).split("\0")
    for relative in filter(None, listed):
        source, target = REPO / relative, dest / relative
        if source.is_file():
            if not target.is_file() or target.read_bytes() != source.read_bytes():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        elif not source.exists() and target.exists():  # deleted in the working tree, not yet in a commit
            target.unlink()
    if git("status", "--porcelain", cwd=dest):
        git("add", "-A", cwd=dest)
        git("commit", "--quiet", "--no-verify", "-m", "the working tree under test", cwd=dest)
    return dest


def tracked_and_created(clone: Path) -> tuple[set[str], set[str]]:
    """The clone's tracked files, and every other file now on disk (outside .git), as relative POSIX paths."""
    tracked = set(filter(None, git("ls-files", "-z", cwd=clone).split("\0")))
    on_disk = set()
    for folder, dirs, files in os.walk(clone):
        if Path(folder) == clone:
            dirs.remove(".git")
        on_disk |= {(Path(folder) / name).relative_to(clone).as_posix() for name in files}
    return tracked, on_disk - tracked
