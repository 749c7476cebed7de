"""Write a whole output folder or nothing.

Files are written into a hidden sibling folder, which is renamed into place only once
everything in it is complete; an error or Ctrl-C leaves the old output (if any) untouched
and no half-written folder behind. A SIGKILL or a power cut cannot clean up: the staging folder
(named after its process) stays hidden beside the output, and the next run removes it once
that process is gone.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def check_writable(out: Path, *, replace: bool = False) -> None:
    """FileExistsError unless `out` is absent, an empty folder, or allowed to be replaced.

    Callers check before slow work too, so a long run does not end in this error."""
    out = Path(out)
    if out.exists() and not replace and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty (pass --force to replace it)")


@contextmanager
def atomic_directory(out: Path, *, replace: bool = False):
    """Yields a staging folder; on success it becomes `out`. `replace` allows an existing `out` to go."""
    out = Path(out)
    check_writable(out, replace=replace)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers_of_dead_runs(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
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
