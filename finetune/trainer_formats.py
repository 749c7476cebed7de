"""The prepared samples in the formats other trainers read: LLaMA-Factory, axolotl, TRL, unsloth.

`prepare --export sharegpt,alpaca,messages` writes them beside bunshin's own files, one line per
sample in the same order (line N of `train.sharegpt.jsonl` is line N of `train.jsonl`), so a
person can train with the tool they know on exactly the data bunshin would train on.

bunshin keeps a group chat as it was, every speaker by name; a chat trainer knows two sides that
take turns. The mapping, the same for every format that has turns:

- the persona's turns are the assistant's (`gpt`); the sample's reply is always the last turn;
- everyone else is the user (`human`): other people's consecutive turns become one user turn, each
  led by its speaker's name (`健太: ...`), since one role cannot tell people apart otherwise and
  most chat templates drop a `name` field (one user turn may also hold several people);
- turns alternate and start with the user. LLaMA-Factory checks it (human/observation at odd
  positions, gpt/function at even, an even count; other rows are skipped with a warning) and many
  chat templates (Llama 2, Mistral, Gemma) raise on anything else. Where the persona speaks first,
  or twice with nobody in between (a follow-up after a pause; no context at all), the user turn
  before hers is empty: nobody said anything, and no invented words enter the data.

Earlier persona turns are context, not replies to learn: they may be cut (`…`) or hold `[スタンプ]`,
which bunshin never trains on. The messages format marks the one turn to learn (`"train": true`,
axolotl's `message_field_training`); for LLaMA-Factory set `mask_history: true`; alpaca has only
one output and needs nothing. The README has each trainer's lines.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

FORMATS = ("sharegpt", "alpaca", "messages")
USER, ASSISTANT = "user", "assistant"
_SHAREGPT_ROLE = {USER: "human", ASSISTANT: "gpt"}
# As prompt.py's "instruction" template asks: the context follows as a transcript.
ALPACA_INSTRUCTION = "{persona}として、次の会話の続きを返信してください。"


def alternating_turns(sample: dict) -> list[tuple[str, str]]:
    """A prepared sample as (role, text) turns: user first, alternating, the reply last."""
    persona = sample["persona"]
    turns: list[tuple[str, str]] = []
    others: list[str] = []  # what other people said since the persona last spoke
    for turn in sample["context"]:
        if turn["speaker"] == persona:
            turns += [(USER, "\n".join(others)), (ASSISTANT, turn["text"])]
            others = []
        else:
            others.append(f"{turn['speaker']}: {turn['text']}")
    return turns + [(USER, "\n".join(others)), (ASSISTANT, sample["target"])]


def sharegpt_row(sample: dict) -> dict:
    """LLaMA-Factory's `formatting: sharegpt` with its default tags; unsloth's `standardize_sharegpt` input."""
    return {"conversations": [{"from": _SHAREGPT_ROLE[role], "value": text} for role, text in alternating_turns(sample)]}


def messages_row(sample: dict) -> dict:
    """TRL's conversational `messages`, axolotl's `type: chat_template` default fields. `train` marks the reply."""
    turns = alternating_turns(sample)
    last = len(turns) - 1
    return {"messages": [{"role": role, "content": text, "train": i == last} for i, (role, text) in enumerate(turns)]}


def alpaca_row(sample: dict) -> dict:
    """One instruction, the whole context as a transcript in `input` (names kept, the persona's too), the reply.

    No `history`: its pairs would need the alternation above and LLaMA-Factory learns their answers
    too by default; axolotl's alpaca type ignores it. `input` is empty when there is no context."""
    transcript = "\n".join(f"{t['speaker']}: {t['text']}" for t in sample["context"])
    return {"instruction": ALPACA_INSTRUCTION.format(persona=sample["persona"]), "input": transcript, "output": sample["target"]}


ROWS: dict[str, Callable[[dict], dict]] = {"sharegpt": sharegpt_row, "alpaca": alpaca_row, "messages": messages_row}


def export_file_name(split: str, fmt: str) -> str:
    return f"{split}.{fmt}.jsonl"


def llama_factory_dataset_info(formats: Iterable[str], *, has_eval: bool) -> dict:
    """`dataset_info.json` entries, so LLaMA-Factory's `dataset_dir` can be the prepared folder itself.

    An empty eval file gets no entry: `datasets` cannot load a JSON file without rows."""
    splits = ("train", "eval") if has_eval else ("train",)
    info = {}
    for fmt in formats:
        if fmt == "sharegpt":
            entry = {"formatting": "sharegpt", "columns": {"messages": "conversations"},
                     "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}}
        elif fmt == "alpaca":
            entry = {"formatting": "alpaca", "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
        else:
            continue
        for split in splits:
            info[f"bunshin_{fmt}_{split}"] = {"file_name": export_file_name(split, fmt), **entry}
    return info


def write_exports(folder: Path, formats: Sequence[str], train: list[dict], held_out: list[dict]) -> list[str]:
    """Write each format's train and eval files (and dataset_info.json for LLaMA-Factory) into `folder`;
    returns the names written. `folder` is prepare's staging folder: all of it appears, or none."""
    written = []
    for fmt in formats:
        row = ROWS[fmt]
        for split, samples in (("train", train), ("eval", held_out)):
            name = export_file_name(split, fmt)
            lines = (json.dumps(row(s), ensure_ascii=False) + "\n" for s in samples)
            (folder / name).write_text("".join(lines), encoding="utf-8")
            written.append(name)
    info = llama_factory_dataset_info(formats, has_eval=bool(held_out))
    if info:
        (folder / "dataset_info.json").write_text(json.dumps(info, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        written.append("dataset_info.json")
    return written
