"""Shared by the training benchmarks that launch `finetune train` several ways: run one launch
command as a subprocess and read back what it printed and wrote."""

from __future__ import annotations

import ast
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The shared GPU hosts this runs on require NVLink multicast off (a program using it can take the host's
# GPUs down for everyone), also in processes started with their own environment; setdefault keeps an
# operator's stricter values.
NCCL_SAFE = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def launch_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(REPO / "bench"), os.environ.get("PYTHONPATH")]))
    for key, value in NCCL_SAFE.items():
        env.setdefault(key, value)
    env.update(extra)
    return env


def step_logs(text: str) -> list[dict]:
    """The Trainer's per-step log dicts (`{'loss': ...}`) in printed order; values as printed."""
    logs = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{'loss'"):
            try:
                logs.append(ast.literal_eval(line))
            except (ValueError, SyntaxError):
                pass
    return logs


def run_launch(name: str, cmd: list[str], out: Path, env_extra: dict[str, str] | None = None, timeout: float = 300) -> dict:
    """One launch: its command line, exit code, the first and last step logs, the error line, and
    the adapter's manifest `training` and `eval_loss` when it wrote one."""
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=launch_env(**(env_extra or {})), capture_output=True, text=True,
                              timeout=timeout)
        returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        returncode, stdout, stderr = "timeout", str(exc.stdout or ""), str(exc.stderr or "")
    logs = step_logs(stdout)
    result = {
        "name": name,
        "command": " ".join(f"{k}={v}" for k, v in (env_extra or {}).items()).strip() + (" " if env_extra else "")
        + " ".join(str(c) for c in cmd).replace(sys.executable, "python").replace(str(REPO) + "/", ""),
        "returncode": returncode,
        "wall_seconds": round(time.time() - start, 1),
        "first_step_logs": logs[:3],
        "last_step_log": logs[-1] if logs else None,
        "summary_line": next((line for line in reversed(stdout.splitlines()) if "useful tokens/s" in line and "steps," in line), None),
        "errors": [line for line in stderr.splitlines() if line.startswith(("error:", "warning:"))],
        "probe": [line for line in stderr.splitlines() if line.startswith("probe[")],
    }
    manifest = out / "bunshin.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text(encoding="utf-8"))
        result["adapter_written"] = True
        result["eval_loss"] = data["eval_loss"]
        result["training"] = data["training"]
    else:
        result["adapter_written"] = False
    if returncode not in (0, 1):
        result["stderr_tail"] = stderr[-3000:]
    return result


def device_info() -> dict:
    info = {"python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_properties(i).name for i in range(torch.cuda.device_count())]
            info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
            info["cuda"] = torch.version.cuda
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        for name in ("transformers", "accelerate", "peft"):
            info[name] = __import__(name).__version__
    except ImportError:
        pass
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=30).stdout.split()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        pass
    return info
