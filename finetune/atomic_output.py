"""Write a whole output folder or nothing.

Files are written into a hidden sibling folder, which is renamed into place only once
everything in it is complete; an error or Ctrl-C leaves the old output (if any) untouched
and no half-written folder behind. A SIGKILL or a power cut cannot clean up: the staging folder
(named after its process) stays hidden beside the output, and the next run removes it once
that process is gone.

Everything in the folder is made readable by its owner only before it appears (private_files.py:
transformers, peft and the tokenizer files copied in would otherwise be 0644), its missing parents are
created 0700, and no output goes into one of bunshin's source packages (persona_home.py).
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .persona_home import make_output_parent, refuse_source_package
from .private_files import make_tree_private


def check_writable(out: Path, *, replace: bool = False) -> None:
    """FileExistsError unless `out` is absent, an empty folder, or allowed to be replaced; PersonaHomeError
    when it is inside a source package.

    Callers check before slow work too, so a long run does not end in this error."""
    out = Path(out)
    refuse_source_package(out)
    if out.exists() and not replace and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty (pass --force to replace it)")


@contextmanager
def atomic_directory(out: Path, *, replace: bool = False):
    """Yields a staging folder; on success it becomes `out`. `replace` allows an existing `out` to go."""
    out = Path(out)
    check_writable(out, replace=replace)
    make_output_parent(out)
    _remove_leftovers_of_dead_runs(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
        make_tree_private(staging)
        for f in staging.iterdir():
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _remove_leftovers_of_dead_runs(out: Path) -> None:
    """Staging and replaced folders of runs that were killed: `.NAME.PID.xxxx.partial`, `.NAME.old-PID`."""
    for entry in out.parent.glob(f".{glob.escape(out.name)}.*"):
        rest = entry.name[len(out.name) + 2 :]
        if rest.endswith(".partial"):
            pid = rest.split(".", 1)[0]
        elif rest.startswith("old-"):
            pid = rest[4:]
        else:
            continue
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
