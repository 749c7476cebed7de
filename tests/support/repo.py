"""The repository as its user has it: where it is, its examples, its CLIs run as subprocesses, a config file
written. tests/conftest.py hands the same names to tests that take them with `from conftest import ...`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
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


def write_toml(path: Path, table: dict) -> Path:
    """A config file from {section: {key: value}} (JSON's scalars and lists are TOML's too)."""
    lines = []
    for name, values in table.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
