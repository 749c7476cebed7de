"""A `tokenizer.json` that encodes and decodes as bunshin's SentencePiece tokenizer does, for serving engines.

bunshin runs a SentencePiece model with `sentencepiece` itself (tokenization.py). An engine that serves a
`finetune merge` folder (vLLM, SGLang, TGI) loads the folder's tokenizer through transformers instead, and
transformers 5 cannot be trusted with these files: rinna's `spiece.model` declared as `T5Tokenizer`
becomes a fast tokenizer that prepends `▁`, splits on whitespace, has no byte fallback and maps unknown
characters to id 2, and a model trained with the `identity` normalization rule (no normalization table)
does not load at all ("Cannot parse precompiled_charsmap"). A Llama-layout `tokenizer.model` loads, but as
other ids. The engine's tokenizer matters even though bunshin sends token ids: the engine decodes the
reply to text, matches the stop strings on that text, and knows its special ids from it.

`tokenizer_json` builds the fast tokenizer from the SentencePiece model file itself, as sentencepiece runs
it: the Unigram pieces and scores, byte fallback, the normalization table (when there is one), whitespace
as `▁`, the dummy prefix and extra-whitespace removal only where the model's normalizer spec asks for them,
user-defined pieces (rinna's `<NL>`) kept whole, control pieces as special tokens, and BOS before every
text only where bunshin puts one. `fast_tokenizer_config` names the plain fast tokenizer class
(`PreTrainedTokenizerFast`), so transformers loads that file as it is rather than rebuilding the pipeline of
the class the base declared (T5Tokenizer, LlamaTokenizer). `disagreements` compares the result with
bunshin's tokenizer on a set of texts.

Limits, where sentencepiece and a `tokenizer.json` cannot agree, none of which an engine sent token ids
meets: a text holding the spelling of a control or byte piece (`</s>`, `<0x0A>`) is that piece to the fast
tokenizer, characters to sentencepiece; the unknown piece decodes to `⁇` in sentencepiece and to nothing
here (a byte-fallback model never makes it from text). Only Unigram models are converted (rinna's, every `finetune
tiny-model`'s); a BPE SentencePiece model (Llama 2's) keeps the `tokenizer.json` its base ships, if any.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .tokenization import SentencePieceChatTokenizer

# sentencepiece_model.proto: ModelProto.SentencePiece.Type, TrainerSpec.ModelType
_UNKNOWN, _CONTROL = 2, 3
_UNIGRAM = 1
SPACE = "▁"  # U+2581: sentencepiece's whitespace


class ConversionError(ValueError):
    """The SentencePiece model has a feature no `tokenizer.json` reproduces here."""


def _model_proto(model_file: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return proto


def tokenizer_json(model_file: Path, add_bos: bool) -> str:
    """The `tokenizer.json` text for SentencePiece model `model_file`; `add_bos`: every text starts with BOS (as
    bunshin's tokenizer of the folder says). Raises ConversionError for a model it cannot reproduce."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

    proto = _model_proto(model_file)
    trainer, spec = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != _UNIGRAM:
        raise ConversionError(f"{model_file.name} is not a Unigram SentencePiece model (model_type {trainer.model_type})")
    if not spec.escape_whitespaces:
        raise ConversionError(f"{model_file.name} keeps spaces as they are (escape_whitespaces off)")
    pieces = list(proto.pieces)
    unknown = next((i for i, p in enumerate(pieces) if p.type == _UNKNOWN), None)
    if unknown is None:
        raise ConversionError(f"{model_file.name} has no unknown piece")

    # A user-defined piece has score 0 in the model, above any path of normal pieces (log probabilities, all
    # negative) that spells it, so the Unigram search here picks it wherever sentencepiece does. Kept in the model
    # rather than added as tokens, the pieces leave the normalizer one whole text, as sentencepiece's sees.
    vocab = [(p.piece, p.score) for p in pieces]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=unknown, byte_fallback=trainer.byte_fallback))
    # sentencepiece's order: the normalization table, extra whitespace, the dummy prefix, spaces as ▁.
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    # No pre-tokenizer: sentencepiece searches the whole text at once, never split at spaces.

    decode = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        decode.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(decode)
    # Special: skipped when a reply is decoded, and known to the engine by these names (the config's eos_token).
    tokenizer.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                                  for p in pieces if p.type in (_CONTROL, _UNKNOWN)])
    if add_bos:
        if trainer.bos_id < 0:
            raise ConversionError(f"{model_file.name} has no BOS piece to start texts with")
        bos = pieces[trainer.bos_id].piece
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, trainer.bos_id)])
    return tokenizer.to_str(pretty=True)


def fast_tokenizer_config(config: dict, add_bos: bool) -> dict:
    """The folder's tokenizer_config.json for the written tokenizer.json: the plain fast tokenizer class (transformers
    then loads tokenizer.json as it is) and BOS as bunshin adds it; the special tokens' names stay as the base has them."""
    return {**config, "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "add_eos_token": False}


def write_fast_tokenizer(folder: Path, tokenizer: SentencePieceChatTokenizer, model_file: Path) -> None:
    """tokenizer.json and tokenizer_config.json in `folder` for SentencePiece `model_file` (bunshin's `tokenizer`)."""
    (folder / "tokenizer.json").write_text(tokenizer_json(model_file, tokenizer.add_bos), encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if not isinstance(config, dict):
        config = {}
    config_path.write_text(json.dumps(fast_tokenizer_config(config, tokenizer.add_bos), indent=2, ensure_ascii=False)
                           + "\n", encoding="utf-8")


def probe_texts() -> list[str]:
    """Texts both tokenizers must agree on: everyday chat (the tiny tokenizers' corpus), line breaks, spaces at
    either end and in runs, tabs, digits, full-width forms, characters only byte fallback covers, emoji."""
    from .tiny_tokenizers import DEFAULT_CORPUS

    return [*DEFAULT_CORPUS,
            "おはよう\n元気？\n\nまたね", "\nはじめの改行", "おわりの改行\n", "  前後に空白  ", "a  b   c", "タブ\tの後",
            "１２３４５ ６７８ 12345", "ｶﾀｶﾅ と ＡＢＣ", "珍しい漢字：鬱蒼、齟齬、魑魅魍魎", "🦜🫠👨‍👩‍👧", "ok", " ", "x"]


def disagreements(folder: Path, ours, texts: Iterable[str]) -> list[str]:
    """Where transformers' AutoTokenizer on `folder` and bunshin's tokenizer `ours` differ on `texts` (each in the
    model's spelling): ids for the text, or the text for those ids. Empty when they agree."""
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    found = []
    for text in texts:
        model_text = ours.to_model_text(text)
        ids = ours.encode(model_text)
        other = theirs.encode(model_text, add_special_tokens=False)
        if other != ids:
            found.append(f"{model_text!r}: ids {other} instead of {ids}")
        elif (decoded := theirs.decode(ids, skip_special_tokens=True)) != ours.decode(ids):
            found.append(f"{model_text!r}: decoded as {decoded!r}")
    bos = theirs("a")["input_ids"][:1] == [ours.bos_id] if ours.bos_id is not None else False
    if bos != ours.add_bos:
        found.append(f"BOS before a text: {bos} instead of {ours.add_bos}")
    if theirs.eos_token_id != ours.eos_id:
        found.append(f"EOS is id {theirs.eos_token_id} instead of {ours.eos_id}")
    return found
