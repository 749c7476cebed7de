"""Private by default: everything made from someone's chats lands in their persona home, owner-only, ignored by git.

The main test runs the README's own pipeline in a fresh clone, as a new user would: its commands are read
from the README's code blocks (and the Makefile's demo-data recipe), so that the manual and this test
cannot drift apart. Only what a test must change is changed: the exports the README's `prepare` names
are the bundled examples, and `train` gets the tiny offline base (built by the README's own `tiny-model`
line) and a few steps instead of rinna and an hour. Then `git status` must be clean, every file the
commands made must be inside `personas/`, owner-only (folders 0700, files 0600, under a umask of 022),
and no checkpoints left behind.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXAMPLES, REPO, write_toml

from bot.inbox import Inbox
from bot.memory import ConversationMemory
from bot.memory_location import OLD_DEFAULT, memory_path
from bot.names import NameCache
from finetune.config import BotConfig
from finetune.persona_home import ROOT_ENV, PersonaHomeError
from tests.support.fresh_clone import fresh_clone, git, tracked_and_created

try:
    import tomllib  # novermin: guarded, tomli below on 3.10
except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli package
    import tomli as tomllib

EXPORTS = ["examples/line_demo.txt", "examples/discord_demo.json"]  # the bundled exports, relative to a clone
# The tiny base learns nothing in two steps, and needs nothing more here: only where the files go is tested.
FAST_TRAIN = ["--max-steps", "2", "--save-every", "1", "--pack-length", "256", "--batch-tokens", "512",
              "--no-style-eval", "--no-progress"]


# --------------------------------------------------------------------------- the README's commands


def _code_blocks(text: str, language: str) -> list[str]:
    return [m.group(1) for m in re.finditer(rf"```{language}\n(.*?)```", text, re.S)]


def _commands(block: str) -> list[list[str]]:
    """A shell block's commands, continuation lines joined and comments dropped, each as argv."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def readme_finetune_command(command: str) -> list[str]:
    """The arguments of the README's first `python -m finetune COMMAND ...` in a shell block."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for block in _code_blocks(readme, "sh"):
        for argv in _commands(block):
            if argv[:4] == ["python", "-m", "finetune", command]:
                return argv[3:]
    raise AssertionError(f"README.md has no `python -m finetune {command}` in a ```sh block")


def readme_bot_config() -> dict:
    """The README's first TOML block that sets [model] adapter: the config it tells a user to start the bot with."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for block in _code_blocks(readme, "toml"):
        table = tomllib.loads(block)
        if table.get("model", {}).get("adapter"):
            return table
    raise AssertionError("README.md has no ```toml block with [model] adapter")


def makefile_demo_prepare() -> list[str]:
    """`make demo-data`'s prepare command, as arguments of `python -m finetune`."""
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^demo-data:.*?\n((?:\t.*\n)+)", makefile, re.M)[1]
    for argv in _commands(recipe):
        if argv[1:4] == ["-m", "finetune", "prepare"]:
            return argv[3:]
    raise AssertionError("Makefile's demo-data runs no `python -m finetune prepare`")


def with_exports(argv: list[str], exports: list[str]) -> list[str]:
    """`prepare A B C --flags` with its export paths replaced by `exports`."""
    first_flag = next(i for i, a in enumerate(argv) if a.startswith("--"))
    return [argv[0], *exports, *argv[first_flag:]]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# --------------------------------------------------------------------------- running them as a user does


def user_env(clone: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != ROOT_ENV}
    # The clone's code (the venv's editable install points elsewhere); no __pycache__ in the clone.
    return {**env, "PYTHONPATH": str(clone), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8", **extra}


def run_in(clone: Path, argv: list[str], *, module: str = "finetune", stdin: str = "", env: dict | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    # umask 022, a usual one: the modes checked below must be bunshin's doing, not a strict umask's.
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=clone, input=stdin, capture_output=True,
                          text=True, encoding="utf-8", env=env or user_env(clone), timeout=timeout, umask=0o022)


def ran(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{shlex.join(proc.args)}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc


def not_owner_only(folder: Path) -> list[str]:
    """Everything under `folder` (itself included) that is not a 0700 folder or a 0600 file."""
    wrong = []
    for path in [folder, *folder.rglob("*")]:
        info = path.lstat()
        want = 0o700 if stat.S_ISDIR(info.st_mode) else 0o600 if stat.S_ISREG(info.st_mode) else None
        if stat.S_IMODE(info.st_mode) != want:
            wrong.append(f"{oct(stat.S_IMODE(info.st_mode))} {path}")
    return wrong


@pytest.fixture
def clone(tmp_path) -> Path:
    return fresh_clone(tmp_path / "bunshin")


# --------------------------------------------------------------------------- the pipeline


def test_the_readmes_pipeline_leaves_git_clean_and_everything_private_in_the_persona_home(clone, tmp_path):
    demo = makefile_demo_prepare()
    tiny_model = readme_finetune_command("tiny-model")
    prepare = with_exports(readme_finetune_command("prepare"), EXPORTS) + ["--timezone", "Asia/Tokyo"]
    tiny_base = tiny_model[1]

    ran(run_in(clone, demo))
    ran(run_in(clone, tiny_model))  # a tokenizer trained on the demo chats
    ran(run_in(clone, prepare))
    ran(run_in(clone, readme_finetune_command("train") + ["--base", tiny_base, *FAST_TRAIN]))
    ran(run_in(clone, readme_finetune_command("eval") + ["--no-progress"]))
    chat = ran(run_in(clone, readme_finetune_command("chat"), stdin="おはよう\n"))
    ran(run_in(clone, readme_finetune_command("merge")))
    config = readme_bot_config()
    config["model"].update(device="cpu", base=tiny_base)  # the manifest's base, named again: not rinna's default
    config.setdefault("generation", {}).update(max_new_tokens=8)
    config.setdefault("server", {}).update(port=0)
    bot = ran(run_in(clone, ["--config", str(write_toml(tmp_path / "bot.toml", config))], module="bot",
                     stdin="おはよう\n"))

    home = clone / "personas" / flag(prepare, "--name")
    persona = "美咲"
    assert chat.stdout.startswith(f"{persona}: ") and f"{persona}: " in bot.stdout  # both answered
    assert config["model"]["adapter"] == f"personas/{home.name}/adapter"
    # What leaked before, now in the home: the report holds the person's real replies, the tokenizer was
    # trained on the chats, memory holds the conversation.
    real_reply = (home / "dataset" / "eval.jsonl").read_text(encoding="utf-8").split('"target": "')[1].split('"')[0]
    assert real_reply and real_reply in (home / "report" / "report.json").read_text(encoding="utf-8")
    assert (home / "report" / "report.html").is_file() and (clone / tiny_base / "spiece.model").is_file()
    assert (home / "merged" / "spiece.model").is_file() and (home / "adapter" / "bunshin.json").is_file()
    with sqlite3.connect(home / "memory.sqlite3") as db:
        assert ("おはよう",) in db.execute("SELECT text FROM turns").fetchall()
    assert (home / "memory.inbox.sqlite3").is_file()

    assert git("status", "--porcelain", "--ignored=no", "--untracked-files=all", cwd=clone) == ""
    _, created = tracked_and_created(clone)
    assert created and all(path.startswith("personas/") for path in created), sorted(created)
    assert not list((clone / "personas").rglob("*.checkpoints")), "a finished run leaves no checkpoints"
    assert not_owner_only(clone / "personas") == []
    assert (clone / "personas" / ".gitignore").read_text(encoding="utf-8") == "*\n"

    # Copied anywhere else, into another repository, the folder stays ignored on its own.
    elsewhere = tmp_path / "another-repo"
    elsewhere.mkdir()
    git("init", "--quiet", cwd=elsewhere)
    shutil.copytree(clone / "personas", elsewhere / "personas")
    assert git("status", "--porcelain", "--untracked-files=all", cwd=elsewhere) == ""


# --------------------------------------------------------------------------- no output into the code


def test_an_output_inside_a_source_package_is_refused_naming_it_and_nothing_is_written(clone, tmp_path):
    ran(run_in(clone, ["prepare", *EXPORTS, "--persona", "美咲", "--name", "misaki", "--timezone", "Asia/Tokyo"]))
    replies = tmp_path / "replies.jsonl"
    replies.write_text("", encoding="utf-8")
    bot_config = write_toml(tmp_path / "bot.toml", {"persona": {"name": "美咲"}, "memory": {"path": "bot/memory.sqlite3"},
                                                    "console": {"enabled": True}, "server": {"port": 0}})
    cases = [
        (["prepare", *EXPORTS, "--persona", "美咲", "--out", "adapters/misaki"], {}, "adapters/misaki"),
        (["prepare", *EXPORTS, "--persona", "美咲", "--name", "misaki"], {ROOT_ENV: "docs/personas"},
         "docs/personas/misaki/dataset"),
        (["train", "personas/misaki", "--out", "finetune/misaki"], {}, "finetune/misaki"),
        (["eval", "--data", "personas/misaki/dataset", "--out", "tests/report", "--system", f"other={replies}"], {},
         "tests/report"),
        (["merge", "personas/misaki/adapter", "--out", "bench/merged"], {}, "bench/merged"),
        (["tiny-model", "bot/tiny"], {}, "bot/tiny"),
        (["--config", str(bot_config)], {}, "bot/memory.sqlite3"),
    ]
    for argv, env, path in cases:
        module = "bot" if argv[0] == "--config" else "finetune"
        proc = run_in(clone, argv, module=module, env=user_env(clone, **env))
        assert proc.returncode == 1, (argv, proc.stderr)
        message = proc.stderr.strip()
        assert message.startswith(f"error: {path} is inside {path.split('/')[0]}/"), (argv, message)
        assert "persona home" in message and "Traceback" not in message
    assert "not a place for LoRA adapters" in run_in(clone, cases[0][0]).stderr

    assert git("status", "--porcelain", "--ignored=no", "--untracked-files=all", cwd=clone) == ""
    _, created = tracked_and_created(clone)
    dataset = ("train.jsonl", "eval.jsonl", "stats.json", "memory.jsonl", "memory.index.npz")
    assert created == {"personas/.gitignore", *(f"personas/misaki/dataset/{f}" for f in dataset)}


def test_bunshin_home_moves_the_homes_and_a_folder_of_the_users_keeps_its_mode(tmp_path):
    made, existing = tmp_path / "new" / "homes", tmp_path / "mine"
    existing.mkdir(mode=0o755)
    os.chmod(existing, 0o755)
    for root in (made, existing):
        proc = subprocess.run(
            [sys.executable, "-m", "finetune", "prepare", *(EXAMPLES / Path(e).name for e in EXPORTS), "--persona", "美咲",
             "--name", "misaki", "--timezone", "Asia/Tokyo"],
            cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", timeout=300, umask=0o022,
            env={**os.environ, "PYTHONPATH": str(REPO), ROOT_ENV: str(root), "PYTHONIOENCODING": "utf-8"})
        assert proc.returncode == 0, proc.stderr
        assert (root / "misaki" / "dataset" / "train.jsonl").is_file()
        assert not_owner_only(root / "misaki") == []
    assert not (tmp_path / "personas").exists()
    # A root bunshin made: owner-only down from the first folder it created, and ignored by git.
    assert not_owner_only(tmp_path / "new") == []
    assert (made / ".gitignore").read_text(encoding="utf-8") == "*\n"
    # A folder of the user's own (BUNSHIN_HOME may name any): its mode stays, and no .gitignore appears in it.
    assert stat.S_IMODE(existing.stat().st_mode) == 0o755 and not (existing / ".gitignore").exists()


# --------------------------------------------------------------------------- the bot's files


def test_the_bots_memory_defaults_to_the_adapters_persona_home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ROOT_ENV, raising=False)
    (tmp_path / "personas" / "misaki" / "adapter").mkdir(parents=True)
    asked = []

    def persona() -> str:
        asked.append(True)
        return "美咲"

    def config(**model) -> BotConfig:
        return BotConfig.from_dict({"model": model, "persona": {"name": "美咲"}})

    assert memory_path(config(adapter="personas/misaki/adapter"), persona) == "personas/misaki/memory.sqlite3"
    assert not asked  # the home came from the adapter's path
    assert memory_path(config(adapter="/srv/models/misaki"), persona) == "personas/美咲/memory.sqlite3"
    assert memory_path(config(), persona) == "personas/美咲/memory.sqlite3"
    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "elsewhere"))
    assert memory_path(config(), persona) == str(tmp_path / "elsewhere" / "美咲" / "memory.sqlite3")
    explicit = BotConfig.from_dict({"persona": {"name": "美咲"}, "memory": {"path": "state/m.sqlite3"}})
    assert memory_path(explicit, persona) == "state/m.sqlite3"

    with pytest.raises(PersonaHomeError, match=r"bot/m\.sqlite3 is inside bot/"):
        memory_path(BotConfig.from_dict({"memory": {"path": str(REPO / "bot" / "m.sqlite3")}}), persona)
    # The old default's file is not silently left behind for an empty memory.
    (tmp_path / OLD_DEFAULT).write_bytes(b"")
    with pytest.raises(PersonaHomeError) as refused:
        memory_path(config(adapter="personas/misaki/adapter"), persona)
    assert OLD_DEFAULT in str(refused.value) and "[memory] path" in str(refused.value)
    assert memory_path(explicit, persona) == "state/m.sqlite3"  # a path set explicitly is used as it is


def test_memory_inbox_and_names_files_are_owner_only_even_when_they_existed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old_umask = os.umask(0o022)
    try:
        older = tmp_path / "older.sqlite3"  # made before bunshin set modes, under the umask: 0644
        older.write_bytes(b"")
        assert stat.S_IMODE(older.stat().st_mode) == 0o644
        memory_file = tmp_path / "personas" / "misaki" / "memory.sqlite3"
        memory = ConversationMemory(memory_file)
        memory.append("console:local", "健太", "おはよう")
        inbox = Inbox(Inbox.path_for(str(memory_file)))
        names = NameCache(NameCache.path_for(str(memory_file)))
        try:
            written = sorted(p.name for p in memory_file.parent.iterdir())
            assert {"memory.sqlite3", "memory.inbox.sqlite3", "memory.names.sqlite3"} <= set(written)
            assert any(name.endswith("-wal") for name in written)  # the WAL files SQLite made are checked too
            assert not_owner_only(tmp_path / "personas") == []
            assert (tmp_path / "personas" / ".gitignore").is_file()
        finally:
            names.close()
            inbox.close()
            memory.close()
        ConversationMemory(older).close()
        assert stat.S_IMODE(older.stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)
