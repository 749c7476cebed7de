"""The one tokenizer loader shared by training, `finetune chat` and the bot's worker.

Why not just `AutoTokenizer`: transformers 5 ignores `use_fast=False` and converts a SentencePiece
model (rinna's `spiece.model`, declared as `T5Tokenizer`) into a fast tokenizer that prepends `▁` to
every text, collapses repeated spaces, has no byte fallback and maps every unknown character to
id 2 (T5's `<unk>` slot, which is `<s>` in rinna's vocabulary). So a folder with a SentencePiece
model is tokenized by `sentencepiece` itself; anything else (a `tokenizer.json`: Llama-3, Qwen,
...) goes through the Hugging Face fast tokenizer, which is exact there by definition.

Token ids never include BOS/EOS: the prompt renderer decides where those go (prompt.py), from `add_bos`:
whether the model's own tokenizer starts every text with BOS (Llama-architecture bases do, rinna and Qwen do
not). A model trained with a BOS before every text and prompted without one is a model out of its element.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

# rinna's convention: the vocabulary has no newline piece; line breaks are written as this piece.
RINNA_NEWLINE = "<NL>"

SENTENCEPIECE_FILES = ("spiece.model", "tokenizer.model")
# Enough to tokenize with either backend; the weights are never downloaded for a tokenizer.
TOKENIZER_FILES = (
    *SENTENCEPIECE_FILES,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "config.json",
)
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
# SentencePiece tokenizer classes of transformers whose `add_bos_token` defaults to true, for a
# tokenizer_config.json that names one and leaves the key out. T5Tokenizer (rinna's) adds no BOS.
_BOS_BY_DEFAULT = ("LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast",
                   "GemmaTokenizer", "GemmaTokenizerFast")


class ChatTokenizer:
    """Text <-> token ids for one base model.

    encode(text) -> list[int]   ids for `text`, no BOS/EOS added
    decode(ids) -> str          text for `ids`, special ids (pad/bos/eos/control) skipped
    eos_id, bos_id              end / start of text (bos_id is None when the model has none)
    add_bos                     every text starts with bos_id (as the model's own tokenizer does it)
    pad_id                      padding id (the EOS id when the model defines no padding)
    vocab_size                  number of ids the tokenizer can produce
    newline                     how the model writes a line break: "<NL>" (rinna) or "\\n"
    to_model_text / from_model_text   "\\n" <-> `newline`, for prompts and replies
    fingerprint                 sha256 of the tokenizer file(s): what an adapter was trained with
    name_or_path                what was passed to `load_tokenizer`
    backend                     "sentencepiece" or "transformers"
    """

    backend: str
    name_or_path: str
    fingerprint: str
    eos_id: int
    bos_id: int | None
    add_bos: bool = False
    pad_id: int
    vocab_size: int
    newline: str

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def to_model_text(self, text: str) -> str:
        """A chat message as the model spells it (line breaks in the model's convention)."""
        return text if self.newline == "\n" else text.replace("\n", self.newline)

    def from_model_text(self, text: str) -> str:
        """Model output as people read it."""
        return text if self.newline == "\n" else text.replace(self.newline, "\n")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"newline={self.newline!r}, fingerprint={self.fingerprint[:12]})"
        )


class SentencePieceChatTokenizer(ChatTokenizer):
    """Raw `sentencepiece` on the model's own file: the ids the model was pre-trained on."""

    backend = "sentencepiece"

    def __init__(self, model_file: Path, name_or_path: str):
        data = model_file.read_bytes()
        self.sp = sentencepiece_module().SentencePieceProcessor(model_proto=data)
        self.name_or_path = name_or_path
        self.fingerprint = hashlib.sha256(data).hexdigest()  # equals `sha256sum spiece.model`
        self.vocab_size = self.sp.get_piece_size()
        if self.sp.eos_id() < 0:
            raise ValueError(f"{model_file} defines no end-of-text piece; a chat model needs one to stop")
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        # sentencepiece itself adds no BOS; what the model was trained with is in the folder's configuration.
        self.add_bos = self.bos_id is not None and _starts_with_bos(model_file.parent, self.sp.id_to_piece(self.bos_id))
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.newline = RINNA_NEWLINE if self._has_piece(RINNA_NEWLINE) and not self._has_piece("\n") else "\n"
        self._special = {i for i in range(self.vocab_size) if self.sp.is_control(i)}

    def _has_piece(self, text: str) -> bool:
        # A byte-fallback piece (<0x0A>) is not a piece for "\n": every byte has one.
        piece_id = self.sp.piece_to_id(text)
        return not self.sp.is_unknown(piece_id) and not self.sp.is_byte(piece_id)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        # A model's embedding may be larger than the tokenizer: ids past the vocabulary decode to nothing.
        return self.sp.decode([i for i in ids if 0 <= i < self.vocab_size and i not in self._special])


class TransformersChatTokenizer(ChatTokenizer):
    """A Hugging Face fast tokenizer (`tokenizer.json`), for models that ship one and no SentencePiece file."""

    backend = "transformers"

    def __init__(self, folder: Path, name_or_path: str):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        self.name_or_path = name_or_path
        self.fingerprint = _fingerprint_files(folder, TOKENIZER_FILES)
        if self.hf.eos_token_id is None:
            raise ValueError(f"the tokenizer of {name_or_path} defines no end-of-text token; a chat model needs one to stop")
        self.eos_id = self.hf.eos_token_id
        self.bos_id = self.hf.bos_token_id
        # The fast tokenizer's own special-token template says whether a text starts with BOS (Llama 3: yes, Qwen: none).
        probe = self.hf("a", add_special_tokens=True)["input_ids"]
        self.add_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id
        self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self.hf)  # includes added tokens
        newline_ids = self.encode("\n")
        has_newline_piece = len(newline_ids) == 1 and not _BYTE_PIECE.fullmatch(self.hf.convert_ids_to_tokens(newline_ids[0]))
        self.newline = RINNA_NEWLINE if RINNA_NEWLINE in self.hf.get_vocab() and not has_newline_piece else "\n"

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)


def load_tokenizer(model_dir_or_id: str, revision: str | None = None) -> ChatTokenizer:
    """The tokenizer of a local model folder or a Hugging Face model id (from the local cache when offline).

    `revision` (branch, tag or commit) applies to model ids; a local folder is used as it is.
    A SentencePiece file, when there is one, wins over `tokenizer.json`: the `.model` file is what
    the model was trained with, `tokenizer.json` only a conversion of it.
    """
    folder = tokenizer_folder(model_dir_or_id, revision)
    for name in SENTENCEPIECE_FILES:
        if _is_sentencepiece_model(folder / name):
            return SentencePieceChatTokenizer(folder / name, model_dir_or_id)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer in {model_dir_or_id}: expected one of {', '.join(SENTENCEPIECE_FILES)} or tokenizer.json"
        )
    return TransformersChatTokenizer(folder, model_dir_or_id)


def tokenizer_folder(model_dir_or_id: str, revision: str | None) -> Path:
    local = Path(model_dir_or_id).expanduser()
    if local.is_dir():
        return local
    # Only the tokenizer's files: a few MB, never the weights. With HF_HUB_OFFLINE=1 (or no network)
    # huggingface_hub answers from its cache, so a model downloaded once keeps working offline.
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_dir_or_id, revision=revision, allow_patterns=list(TOKENIZER_FILES)))


def _is_sentencepiece_model(path: Path) -> bool:
    # Llama-3's `tokenizer.model` is a tiktoken BPE table, not a SentencePiece model; it goes to HF.
    if not path.is_file():
        return False
    try:
        return sentencepiece_module().SentencePieceProcessor(model_file=str(path)).get_piece_size() > 0
    except (RuntimeError, OSError):
        return False


def _starts_with_bos(folder: Path, bos_piece: str) -> bool:
    """Whether the tokenizer the model ships puts BOS before every text: tokenizer_config.json's `add_bos_token`,
    else tokenizer.json's template, else the default of the tokenizer class it names."""
    config = _read_json_object(folder / "tokenizer_config.json")
    if isinstance(config.get("add_bos_token"), bool):
        return config["add_bos_token"]
    processor = _read_json_object(folder / "tokenizer.json").get("post_processor") or {}
    steps = processor.get("processors", [processor]) if processor.get("type") == "Sequence" else [processor]
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "TemplateProcessing" and step.get("single"):
            first = step["single"][0]
            return isinstance(first, dict) and (first.get("SpecialToken") or {}).get("id") == bos_piece
    return config.get("tokenizer_class") in _BOS_BY_DEFAULT


def _read_json_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def _fingerprint_files(folder: Path, names: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for name in sorted(names):
        path = folder / name
        if path.is_file() and name != "config.json":  # config.json holds no tokenizer data
            data = path.read_bytes()
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)
    return digest.hexdigest()


def sentencepiece_module():
    # Imported on first use: `python -m finetune inspect` builds every command's flags and must stay light.
    import sentencepiece

    return sentencepiece
