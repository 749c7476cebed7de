"""Reading what `prepare` wrote: one sample per JSONL line, each checked, an error naming file and line.

`train`, `eval` and the short eval that ends `train` all read train.jsonl / eval.jsonl; a file edited by
hand or cut short must stop them with the line that is wrong, not a KeyError deep inside tokenization.
"""

from __future__ import annotations

import json
from pathlib import Path


class DatasetError(Exception):
    """A prepared dataset file that is missing or not what `prepare` writes; the message says where."""


def read_samples(path: Path, *, need_id: bool = False) -> list[dict]:
    """The samples in `path`, in file order. `need_id`: every sample must carry its `id` (the eval's
    replies files refer to samples by it)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (run `python -m finetune prepare` first)")
    needed = "id, persona, context and target" if need_id else "persona, context and target"
    samples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{n}: not JSON ({exc.msg})") from None
            if not (isinstance(sample, dict) and isinstance(sample.get("target"), str)
                    and isinstance(sample.get("context"), list) and isinstance(sample.get("persona"), str)
                    and (isinstance(sample.get("id"), str) or not need_id)):
                raise DatasetError(f"{path}:{n}: not a prepared sample (needs {needed})")
            samples.append(sample)
    return samples


def dataset_persona(folder: Path) -> str:
    """The persona a prepared dataset is of (its stats.json), for a command that talks as them without an adapter."""
    path = Path(folder) / "stats.json"
    if not path.is_file():
        raise DatasetError(f"{folder}: not a dataset made by `python -m finetune prepare` (no stats.json)")
    try:
        persona = json.loads(path.read_text(encoding="utf-8")).get("persona")
    except (ValueError, AttributeError):
        persona = None
    if not isinstance(persona, str) or not persona:
        raise DatasetError(f"{path}: damaged, it names no persona (run `python -m finetune prepare` again)")
    return persona
