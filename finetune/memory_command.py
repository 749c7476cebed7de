"""`finetune memory rebuild FOLDER` and `finetune memory search FOLDER TEXT`: the persona's memory by hand.

`rebuild` makes memory.index.npz again from memory.jsonl (in a dataset or an adapter folder): after the
index was lost or damaged, or memory.jsonl was edited (a note removed on request, say). `search` shows the
notes a message would recall, with their dates and scores, to see what the clone would be reminded of.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .person_memory import PersonMemory, PersonMemoryError, rebuild_index
from .prompt import ChatTurn


def add_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    rebuild = actions.add_parser("rebuild", help="rebuild memory.index.npz from memory.jsonl")
    rebuild.add_argument("folder", type=Path, metavar="FOLDER", help="a dataset (prepare) or adapter (train) folder")
    search = actions.add_parser("search", help="the notes a message would recall")
    search.add_argument("folder", type=Path, metavar="FOLDER")
    search.add_argument("text", help="a message, as a friend would send it")
    search.add_argument("-k", type=int, default=3, help="notes to recall (default 3)")


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "rebuild":
            count = rebuild_index(args.folder)
            print(f"{args.folder}: memory index rebuilt over {count} notes")
            return 0
        memory = PersonMemory.load(args.folder)
        found = memory.recall([ChatTurn("you", args.text)], args.k)
        if not found:
            print("(no note shares a word with that)")
        for entry in found:
            for turn in entry.note().turns:
                print(f"{entry.time.date()} {turn.speaker}: {turn.text}")
            print()
        return 0
    except PersonMemoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
