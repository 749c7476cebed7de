"""No model folder runs its own Python: bunshin never loads with trust_remote_code, and a model whose config
needs remote code is refused with an error that names the folder.

The probe model is the tests' tiny model with a config that points at Python files of its own
(`auto_map`, as hub models with custom code do); those files leave a marker file when imported.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from finetune.tiny_model import build_tiny_model

PROBE_CODE = """
from pathlib import Path
Path({marker!r}).write_text("remote code ran")
from transformers import PretrainedConfig
class ProbeConfig(PretrainedConfig):
    model_type = "bunshin_remote_probe"
class ProbeModel:
    pass
"""


@pytest.fixture(scope="module")
def remote_code_model(tmp_path_factory) -> tuple[Path, Path]:
    folder = build_tiny_model(tmp_path_factory.mktemp("remote") / "model")
    marker = folder.parent / "remote-code-ran"
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["model_type"] = "bunshin_remote_probe"
    config["auto_map"] = {"AutoConfig": "configuration_probe.ProbeConfig",
                          "AutoModelForCausalLM": "modeling_probe.ProbeModel"}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    for name in ("configuration_probe.py", "modeling_probe.py"):
        (folder / name).write_text(PROBE_CODE.format(marker=str(marker)), encoding="utf-8")
    return folder, marker


def load_in_a_process(folder: Path, stdin: str) -> subprocess.CompletedProcess:
    """load_base_model as `finetune train` / `chat` call it, in a fresh process with `stdin` as its input."""
    script = ("from finetune.model_loading import ModelLoadError, load_base_model\n"
              "try:\n"
              f"    load_base_model({str(folder)!r}, device='cpu')\n"
              "    print('LOADED')\n"
              "except ModelLoadError as exc:\n"
              "    print('REFUSED', exc)\n")
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, input=stdin, capture_output=True, text=True,
                          encoding="utf-8", env={**os.environ, "PYTHONIOENCODING": "utf-8"}, timeout=120)


def test_no_loader_passes_trust_remote_code_other_than_false():
    passed = []
    for package in ("finetune", "bot", "adapters"):
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                    passed.append((path.relative_to(REPO), node.lineno, ast.unparse(node.value)))
                if isinstance(node, ast.keyword) and node.arg is None and "trust_remote_code" in ast.unparse(node.value):
                    passed.append((path.relative_to(REPO), node.lineno, ast.unparse(node.value)))
    assert [p for p in passed if p[2] != "False"] == []


def test_a_model_that_needs_remote_code_is_refused_with_a_clear_error(remote_code_model):
    folder, marker = remote_code_model
    marker.unlink(missing_ok=True)
    done = load_in_a_process(folder, stdin="")  # no terminal: transformers' y/N question (see below) reads nothing
    assert f"REFUSED cannot load the model in {folder}" in done.stdout, done.stdout + done.stderr
    assert "trust_remote_code" in done.stdout and "custom code" in done.stdout
    assert not marker.exists(), "the model's own Python ran"


def test_remote_code_never_runs_even_when_stdin_says_yes(remote_code_model):
    # `finetune chat` reads messages from stdin: a first message "y" must not be taken as consent.
    folder, marker = remote_code_model
    marker.unlink(missing_ok=True)
    done = load_in_a_process(folder, stdin="y\n")
    assert not marker.exists(), "the model's own Python ran"
    assert "Do you wish to run the custom code" not in done.stdout + done.stderr
    assert done.stdout.startswith("REFUSED")
