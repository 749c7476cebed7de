"""The project says Python >= 3.10, but only 3.11 runs on the machines that test it.

So the claim is checked statically: vermin reads every module (product, tests and benchmarks) and reports
any syntax, module, function or keyword that needs a newer Python. A 3.11-only import that is guarded by a
fallback (tomllib, with tomli on 3.10) carries a `# novermin` mark saying so.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_nothing_needs_a_newer_python_than_the_one_pyproject_claims():
    vermin = shutil.which("vermin", path=str(Path(sys.executable).parent)) or shutil.which("vermin")
    assert vermin, "vermin is a dev dependency: pip install -e '.[dev]'"
    claimed = next(line for line in (REPO / "pyproject.toml").read_text(encoding="utf-8").splitlines()
                   if line.startswith("requires-python"))
    assert claimed == 'requires-python = ">=3.10"'
    proc = subprocess.run([vermin, "-t=3.10-", "--violations", "--no-tips", "--eval-annotations",
                           "finetune", "bot", "adapters", "tests", "bench"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
