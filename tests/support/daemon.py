"""`python -m bot` as an operator runs it, for the tests that drive the daemon as a real process
(tests/test_daemon.py, tests/test_kill_restart.py): a config on a tiny model with the console on stdin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .repo import REPO, write_toml

PERSONA = "美咲"


def write_config(folder: Path, tiny: Path, **sections) -> Path:
    """bot.toml in `folder`: the tiny model on CPU, greedy short replies, memory next to it, the console as
    健太, health on a free port; `sections` override or add keys table by table."""
    table = {
        "model": {"base": str(tiny), "device": "cpu"},
        "persona": {"name": PERSONA},
        "generation": {"max_new_tokens": 12, "temperature": 0.0},
        "memory": {"path": str(folder / "memory.sqlite3")},
        "console": {"enabled": True, "user_name": "健太"},
        "server": {"port": 0},
    }
    for name, values in sections.items():
        table.setdefault(name, {}).update(values)
    return write_toml(folder / "bot.toml", table)


def start_bot(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bot", "--config", str(config), *extra],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, encoding="utf-8", env={**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1"},
    )


def converse(config: Path, lines: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """The daemon started, `lines` typed into its console, stdin closed: it answers each and exits."""
    proc = start_bot(config)
    out, err = proc.communicate("".join(line + "\n" for line in lines), timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def replies(stdout: str) -> list[str]:
    """The persona's lines in the console's output."""
    return [line for line in stdout.splitlines() if line.startswith(f"{PERSONA}: ")]
