"""Which platform adapters exist, each under the name of its config table: a new platform is a module in adapters/,
a factory here and its table in finetune/config.py, never an edit of the daemon.

Each module is imported only when its table says `enabled = true`: a console-only bot never imports discord.py."""

from __future__ import annotations

from collections.abc import Callable


def _console(config, metrics, persona: str):
    from .console import ConsoleAdapter

    return ConsoleAdapter(config.console.user_name, persona)


def _line(config, metrics, persona: str):
    from .line import LineAdapter

    return LineAdapter(config, metrics, persona)


def _discord(config, metrics, persona: str):
    from .discord import DiscordAdapter

    return DiscordAdapter(config, metrics, persona)


# config table -> the adapter it enables, built from the whole config, the metrics and the persona's name
PLATFORMS: dict[str, Callable] = {"console": _console, "line": _line, "discord": _discord}


def enabled_platforms(config, metrics, persona: str) -> list:
    """The adapters whose table is enabled, in PLATFORMS' order (bot/messages.py says what one is)."""
    return [make(config, metrics, persona) for table, make in PLATFORMS.items() if getattr(config, table).enabled]
