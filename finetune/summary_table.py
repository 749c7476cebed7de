"""The human-readable side of `finetune inspect`: a rich table per export."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .summary import ExportSummary


def _day(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d") if t else "-"


def print_summaries(summaries: list[tuple[Path, ExportSummary]], console: Console | None = None) -> None:
    console = console or Console()
    for path, s in summaries:
        table = Table(title=f"{path}  [{s.format}]", title_justify="left")
        table.add_column("speaker")
        table.add_column("text", justify="right")
        table.add_column("placeholder", justify="right")
        table.add_column("first", justify="right")
        table.add_column("last", justify="right")
        for name, c in s.speakers.items():
            table.add_row(name, str(c.text), str(c.placeholder), _day(c.first), _day(c.last))
        console.print(table)
        console.print(
            f"system lines: {s.system}   multi-line messages: {s.multiline}   "
            f"span: {_day(s.first)} .. {_day(s.last)}\n"
        )
