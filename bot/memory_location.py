"""Where the bot keeps what it hears: the memory file, and beside it the inbox and LINE's names cache.

`[memory] path = ""` (the default) puts `memory.sqlite3` in the persona home (finetune/persona_home.py)
of `[model] adapter`: `personas/misaki/` for `adapter = "personas/misaki/adapter"` (or `.../merged`).
An adapter elsewhere, or none, gives the home named after the persona (`personas/美咲/`). The files
hold people's messages, so they are created readable by their owner only, never inside a source
package. An explicit `[memory] path` puts them anywhere else (deploy/ uses a volume); ":memory:"
keeps nothing.

The default used to be `bunshin-memory.sqlite3` in the working directory. Such a file is not silently
left behind for an empty memory: the bot stops and says how to keep it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from finetune.persona_home import PersonaHomeError, as_persona_home, home_named, refuse_source_package

OLD_DEFAULT = "bunshin-memory.sqlite3"


def memory_path(config, persona: Callable[[], str]) -> str:
    """The memory file `config` asks for; `persona()` (read only when needed) names the home of an adapter kept
    outside one. PersonaHomeError when the path may not be used, naming it and what to do."""
    configured = config.memory.path
    if configured:
        if configured != ":memory:":
            refuse_source_package(Path(configured))
        return configured
    if Path(OLD_DEFAULT).is_file():
        raise PersonaHomeError(
            f"{OLD_DEFAULT} (in the current folder) is this bot's memory from an older bunshin, which kept it there; "
            f"memory now lives in the persona home. To go on with it, set [memory] path = \"{OLD_DEFAULT}\" in "
            f"{config.source}, or move it, with its .inbox.sqlite3 and .names.sqlite3 files, into the persona home "
            f"as memory.sqlite3, memory.inbox.sqlite3 and memory.names.sqlite3")
    adapter = Path(config.model.adapter) if config.model.adapter else None
    if adapter is not None and adapter.name in ("adapter", "merged"):
        home = as_persona_home(adapter.parent)
        if home is not None:
            return str(home.memory)
    name = persona()
    try:
        return str(home_named(name).memory)
    except PersonaHomeError:
        raise PersonaHomeError(f"the persona's name {name!r} cannot name its home folder: set [memory] path in "
                               f"{config.source}") from None


def with_memory_path(config, persona: Callable[[], str]):
    """`config` with [memory] path resolved (memory_path), so that every part (memory, inbox, the LINE platform
    adapter's names cache) opens the same files."""
    memory = config.memory.model_copy(update={"path": memory_path(config, persona)})
    return config.model_copy(update={"memory": memory})
