"""bunshin.json: what an adapter is, next to the peft files.

The peft files hold weights; they do not say which tokenizer produced the ids, which prompt
template the model learned, whose voice it is, or how good it got. The manifest does, and every
loader checks it: an adapter is never used with another base model or another template.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

MANIFEST_NAME = "bunshin.json"
FORMAT_VERSION = 1

DEFAULT_GENERATION = {
    "max_new_tokens": 128,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 0,
    "repetition_penalty": 1.1,
}


def bunshin_version() -> str:
    """The installed package's version, for the records an output keeps of what made it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bunshin")
    except PackageNotFoundError:
        return "unknown"


class ManifestError(Exception):
    pass


@dataclass
class AdapterManifest:
    base_model: str  # hub id or path the adapter was trained on
    base_revision: str | None  # commit of the base weights, where known
    base_shape: dict  # model_type, hidden size, layers, heads, vocab: a cheap identity check
    tokenizer_fingerprint: str  # sha256 of the tokenizer file(s)
    tokenizer_backend: str  # "sentencepiece" or "transformers"
    newline: str  # "<NL>" or "\n"
    template: str  # prompt template name (prompt.TEMPLATES)
    persona: str
    max_length: int  # longest sample in tokens the model was trained on
    generation: dict = field(default_factory=lambda: dict(DEFAULT_GENERATION))
    dataset_fingerprint: str = ""
    dataset: dict = field(default_factory=dict)  # samples used, skipped, source folder
    eval_loss: dict = field(default_factory=dict)  # {"base": float, "tuned": float} on eval.jsonl
    # The short eval at the end of training (evaluate.short_summary): style distance, chrF, stock and
    # verbatim rates of base and tuned replies to held-out conversations. Empty when skipped.
    style_eval: dict = field(default_factory=dict)
    lora: dict = field(default_factory=dict)  # r, alpha, dropout, target modules
    training: dict = field(default_factory=dict)  # steps, epochs, lr, seconds, tokens/s, device ...
    speakers: list = field(default_factory=list)  # names in the training contexts, to spot a new turn
    # The persona's memory the adapter learned to read (person_memory.py): {"notes": notes per prompt,
    # "entries": notes in memory.jsonl, "sha256": of memory.jsonl}; empty when trained without one.
    memory: dict = field(default_factory=dict)
    merged: bool = False  # the folder holds full merged weights, not a peft adapter
    created: str = ""
    bunshin_version: str = ""
    format_version: int = FORMAT_VERSION

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> AdapterManifest:
        path = Path(path)
        if not path.is_file():
            raise ManifestError(f"{path.name} is missing: not a bunshin adapter folder (train one with `python -m finetune train`)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path.name} is corrupt: {exc}") from None
        if not isinstance(data, dict):
            raise ManifestError(f"{path.name} is corrupt: expected a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(f"{path.name} has format_version {version!r}; this bunshin reads {FORMAT_VERSION}")
        known = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in data]
        if missing:
            raise ManifestError(f"{path.name} is corrupt: missing {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})
