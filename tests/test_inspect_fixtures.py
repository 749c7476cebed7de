"""Every fixture under tests/fixtures with a `*.expected.json` beside it is run through the real CLI.

`NAME.expected.json` holds {"args": [extra CLI args], "inspect": <exact --json output>,
"notes": "how the counts were got by hand"}; the fixture is the file or folder `NAME`
(the expected file's name minus `.expected.json`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

FIXTURES = Path(__file__).parent / "fixtures"
CASES = sorted(FIXTURES.rglob("*.expected.json"))


def _fixture_for(expected: Path) -> Path:
    return expected.with_name(expected.name[: -len(".expected.json")])


@pytest.mark.parametrize("expected_file", CASES, ids=[str(c.relative_to(FIXTURES)) for c in CASES])
def test_inspect_json_matches_hand_counts(expected_file: Path) -> None:
    spec = json.loads(expected_file.read_text(encoding="utf-8"))
    fixture = _fixture_for(expected_file)
    assert fixture.exists(), f"{expected_file} has no fixture {fixture.name} beside it"
    proc = run_cli("inspect", "--json", fixture, *spec.get("args", []), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == spec["inspect"]


def test_there_are_fixtures_for_every_format() -> None:
    formats = {json.loads(c.read_text(encoding="utf-8"))["inspect"]["format"] for c in CASES}
    assert formats >= {"line", "line-pc", "discord-json", "discord-csv", "discord-package", "plain"}
