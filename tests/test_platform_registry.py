"""adapters/registry.py: the daemon builds its platform adapters from one table of factories, each named by its
config table, and imports a platform's module only when that table enables it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from adapters.console import ConsoleAdapter
from adapters.line import LineAdapter
from adapters.registry import PLATFORMS, enabled_platforms
from bot.metrics import BotMetrics
from finetune.config import BotConfig

REPO = Path(__file__).resolve().parents[1]


def test_each_platform_is_a_config_table_that_can_be_enabled():
    for table in PLATFORMS:
        assert "enabled" in type(getattr(BotConfig(), table)).model_fields, table


def test_the_enabled_tables_give_their_adapters_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("REGISTRY_LINE_SECRET", "secret")
    monkeypatch.setenv("REGISTRY_LINE_TOKEN", "token")
    config = BotConfig.from_dict({
        "memory": {"path": str(tmp_path / "memory.sqlite3")},
        "console": {"enabled": True, "user_name": "健太"},
        "line": {"enabled": True, "channel_secret_env": "REGISTRY_LINE_SECRET", "access_token_env": "REGISTRY_LINE_TOKEN"},
    })
    console, line = enabled_platforms(config, BotMetrics(), "美咲")
    assert (type(console), type(line)) == (ConsoleAdapter, LineAdapter)
    assert (console.user_name, console.persona, line.persona) == ("健太", "美咲", "美咲")
    assert enabled_platforms(BotConfig.from_dict({"console": {"enabled": False}}), BotMetrics(), "美咲") == []


def test_a_platform_that_is_not_enabled_is_not_imported():
    code = ("import sys\nfrom adapters.registry import enabled_platforms\nfrom bot.metrics import BotMetrics\n"
            "from finetune.config import BotConfig\n"
            "found = enabled_platforms(BotConfig.from_dict({'console': {'enabled': True}}), BotMetrics(), 'p')\n"
            "print([type(a).__name__ for a in found], sorted(m for m in sys.modules if m in "
            "('adapters.discord', 'discord', 'adapters.line', 'adapters.line_api')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['ConsoleAdapter'] []"
