from finetune.dependencies import run


def main() -> int:
    from .cli import main  # only once dependencies.run has found every package it needs

    return main()


raise SystemExit(run("bot", main))
