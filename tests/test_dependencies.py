"""Run with a Python that lacks bunshin's packages, both CLIs say so and how to get the right one, never a traceback.

The "wrong Python" is a real one: a fresh virtual environment with nothing installed, run from the repository
folder, which is what a new user's bare `python3 -m finetune ...` is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv

import pytest
from conftest import EXAMPLES, REPO
from packaging.requirements import Requirement

from finetune import dependencies


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """A Python with the standard library only (no pip either: nothing to install)."""
    folder = tmp_path_factory.mktemp("bare") / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(folder)
    return str(folder / "bin" / "python")


def run_bare(python: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return subprocess.run([python, *args], cwd=REPO, capture_output=True, text=True, encoding="utf-8",
                          env={**env, "PYTHONIOENCODING": "utf-8"}, stdin=subprocess.DEVNULL, timeout=120)


@pytest.mark.parametrize("argv", [
    ("-m", "finetune", "inspect", str(EXAMPLES / "line_demo.txt")),
    # prepare on a LINE export needs nothing outside the standard library: it must refuse all the same, before
    # a dataset is written by a Python that cannot train on it
    ("-m", "finetune", "prepare", str(EXAMPLES / "line_demo.txt"), "--persona", "美咲", "--out", "OUT"),
    ("-m", "bot", "--demo"),
])
def test_a_python_without_the_packages_is_told_how_to_get_the_right_one(bare_python, tmp_path, argv):
    argv = tuple(str(tmp_path / "out") if a == "OUT" else a for a in argv)
    proc = run_bare(bare_python, *argv)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr
    assert "Traceback" not in err, err
    first = err.splitlines()[0]
    assert first.startswith(f"error: this Python ({bare_python}) lacks packages bunshin needs: "), err
    assert {"rich", "ijson", "torch", "pydantic"} <= set(first.split(": ", 2)[2].split(", ")), first
    assert "source .venv/bin/activate" in err and f".venv/bin/python -m {argv[1]} ..." in err, err
    assert ("make setup" in err) == (not (REPO / ".venv" / "bin" / "python").exists()), err
    assert not (tmp_path / "out").exists()


def test_the_python_with_the_packages_runs_the_command():
    proc = subprocess.run([sys.executable, "-m", "finetune", "inspect", "--json", str(EXAMPLES / "line_demo.txt")],
                          cwd=REPO, capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert proc.returncode == 0 and '"format": "line"' in proc.stdout, proc.stderr
    assert dependencies.missing_packages() == []


def test_a_module_imported_on_one_path_only_is_named_too(capsys):
    def needs_bitsandbytes() -> int:
        raise ModuleNotFoundError("No module named 'bitsandbytes'", name="bitsandbytes")

    assert dependencies.run("finetune", needs_bitsandbytes) == 1
    err = capsys.readouterr().err
    assert "has no module 'bitsandbytes'" in err and "/bin/activate" in err


def test_a_missing_module_of_our_own_is_a_bug_and_keeps_its_traceback():
    def broken() -> int:
        raise ModuleNotFoundError("No module named 'finetune.gone'", name="finetune.gone")

    with pytest.raises(ModuleNotFoundError):
        dependencies.run("finetune", broken)


def test_the_checked_packages_are_pyproject_dependencies():
    try:
        import tomllib  # novermin: guarded, tomli below on 3.10
    except ModuleNotFoundError:
        import tomli as tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    wanted = {r.name.lower() for r in map(Requirement, declared) if r.marker is None or r.marker.evaluate()}
    # bitsandbytes is the optional extra `quantize`, imported only for --quantize (the run() fallback names it)
    assert set(dependencies.REQUIRED.values()) == wanted and "bitsandbytes" not in wanted
