"""`python -m bot [--config config.toml] [--demo] [--new-inbox]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

DEMO_PERSONA = "美咲"


def demo_config(base: Path):
    """The offline demo: the tiny model, the console, memory in the user's cache folder."""
    from finetune.config import BotConfig

    cache = base.parent
    return BotConfig.from_dict({
        "model": {"base": str(base), "adapter": "", "device": "cpu"},
        "persona": {"name": DEMO_PERSONA},
        "generation": {"max_new_tokens": 40},
        "memory": {"path": str(cache / "demo-memory.sqlite3")},
        "console": {"enabled": True},
        "server": {"port": 0},
    }, source="--demo")


def demo_model_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bunshin"
    model = cache / "demo-tiny-model"
    if not (model / "config.json").is_file():
        from finetune.tiny_model import build_tiny_model

        print(f"building the offline demo model in {model} (one time, a few seconds)", file=sys.stderr)
        build_tiny_model(model, replace=True)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot", description="bunshin's bot daemon")
    parser.add_argument("--config", type=Path, default=Path("config.toml"), help="configuration file (default: config.toml)")
    parser.add_argument("--demo", action="store_true",
                        help="chat in the terminal with an offline tiny model (no GPU, no download, no tokens)")
    parser.add_argument("--new-inbox", action="store_true",
                        help="start with an empty inbox beside an existing memory (needed only after the inbox was "
                             "deleted: what it held unanswered is not answered)")
    args = parser.parse_args(argv)

    from finetune.config import ConfigError, load_config

    try:
        config = demo_config(demo_model_dir()) if args.demo else load_config(args.config)
        config.check_ready()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, config.logging.level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from finetune.model_loading import quiet_libraries

    quiet_libraries()
    from .daemon import run_daemon
    from .loading import still_running

    try:
        code = asyncio.run(run_daemon(config, new_inbox=args.new_inbox))
    except KeyboardInterrupt:
        code = 0
    except ConfigError as exc:  # a file the configuration names ([memory] profile, the adapter's memory) is unusable
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    if still_running():
        # A signal stopped the daemon while the model loaded: the files are closed, the load runs on in its thread
        # and cannot be stopped. End now, without waiting for it or finalizing the interpreter under it.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
