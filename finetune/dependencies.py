"""Is this Python the one bunshin was installed into? Checked by `python -m finetune` and `python -m bot` first.

From the repository folder a bare `python3 -m finetune` finds the code (the working directory is on sys.path)
but not the packages `make setup` installed into `.venv`. Some commands would then half-work (`prepare` on a
LINE export needs nothing outside the standard library) and others end in a traceback about a module deep
inside. So both entry points look for every dependency first, without importing any (`find_spec` only reads
the path, so `inspect` stays fast), and name what is missing and how to get the right Python.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

# import name -> the distribution pyproject.toml's `dependencies` names (tests/test_dependencies.py keeps them
# equal). Not bitsandbytes: an optional extra (`.[quantize]`), imported only for --quantize.
REQUIRED = {
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "accelerate": "accelerate",
    "sentencepiece": "sentencepiece",
    "google.protobuf": "protobuf",
    "discord": "discord.py",
    "aiohttp": "aiohttp",
    "pydantic": "pydantic",
    "rich": "rich",
    "ijson": "ijson",
    "prometheus_client": "prometheus-client",
    "sacrebleu": "sacrebleu",
    "regex": "regex",
    "gguf": "gguf",  # get-base reads Gemma 3 270M's GGUF through it
}
if sys.version_info < (3, 11):
    REQUIRED["tomli"] = "tomli"  # tomllib's twin; the standard library has it from 3.11

CHECKOUT = Path(__file__).resolve().parents[1]


def _installed(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing ("google"), or a broken one
        return False


def missing_packages() -> list[str]:
    """The distributions (pip names) whose modules this Python cannot find."""
    return [dist for module, dist in REQUIRED.items() if not _installed(module)]


def setup_hint(program: str) -> str:
    """How to run `program` (finetune or bot) with bunshin's own environment, from where the user is."""
    venv = CHECKOUT / ".venv"
    try:
        venv = venv.relative_to(Path.cwd())  # `.venv/bin/activate` from the repository folder, as the README says
    except ValueError:
        pass
    setup = "" if (venv / "bin" / "python").exists() else f"Set it up once with `make setup` in {CHECKOUT}, then a"
    return (f"bunshin runs in its own virtual environment, {venv}. {setup or 'A'}ctivate it in each new terminal:\n"
            f"    source {venv}/bin/activate\n"
            f"or call its Python directly: {venv}/bin/python -m {program} ...")


def missing_message(program: str, missing: list[str]) -> str:
    return (f"error: this Python ({sys.executable}) lacks packages bunshin needs: {', '.join(missing)}\n"
            f"{setup_hint(program)}")


def run(program: str, main: Callable[[], int]) -> int:
    """`main()` of `python -m program`, after checking the dependencies: a missing one is a message, not a traceback.

    Also one that is imported only on some paths and so is not in REQUIRED (bitsandbytes for --quantize).
    """
    missing = missing_packages()
    if missing:
        print(missing_message(program, missing), file=sys.stderr)
        return 1
    try:
        return main()
    except ModuleNotFoundError as exc:
        if not exc.name or exc.name.partition(".")[0] in ("finetune", "bot", "adapters"):
            raise  # our own code is broken: that traceback is for a developer
        print(f"error: this Python ({sys.executable}) has no module {exc.name!r}\n{setup_hint(program)}", file=sys.stderr)
        return 1
