from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def run_cli(*args: str, module: str = "finetune", timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m <module> ARGS` the way a user does, from the repo root."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli
