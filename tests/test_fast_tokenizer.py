"""finetune/fast_tokenizer.py: the `tokenizer.json` `finetune merge` writes for engines encodes and decodes as
bunshin's SentencePiece tokenizer does, loaded the way an engine loads it (transformers' AutoTokenizer).

The tiny tokenizers (finetune/tiny_tokenizers.py) have the layouts of the families: rinna's (`<NL>` as a
user-defined piece, no dummy prefix, spaces kept, no normalization table) and Llama's (a dummy prefix, BOS
before every text). rinna's real `spiece.model` may have been trained with sentencepiece's default
normalization (`nmt_nfkc`, a table transformers must rebuild), so models trained here with that rule, with
extra-whitespace removal and with a dummy prefix beside `<NL>`, are held to the same agreement. The merged
folder itself is checked in tests/test_training.py and served by vLLM in tests/test_remote_vllm.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from finetune.fast_tokenizer import ConversionError, disagreements, probe_texts, write_fast_tokenizer
from finetune.tiny_tokenizers import (
    RINNA_NEWLINE,
    TOKENIZER_CONFIG,
    corpus_sentences,
    llama_tokenizer,
    rinna_tokenizer,
    sentencepiece_module,
)
from finetune.tokenization import load_tokenizer

# What a chat holds besides the probe texts: line breaks around <NL>'s spelling, spaces next to it, runs.
TRICKY = ["<NL>で始まる", "x <NL> y", "<NL> x", "a<NL>b", "NL>", "<N", "  a", " a", "a ", "", "改行\n\n\nみっつ"]


def folder_of(tmp_path: Path, files: dict[str, bytes]) -> Path:
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def spiece_folder(tmp_path: Path, **options) -> Path:
    """rinna's layout (special ids, `<NL>`, T5Tokenizer config), trained with other sentencepiece options."""
    model = io.BytesIO()
    settings = {**dict(model_type="unigram", vocab_size=1500, hard_vocab_limit=False, character_coverage=0.9995,
                       byte_fallback=True, split_digits=True, num_threads=1, minloglevel=2, pad_id=0,
                       pad_piece="[PAD]", unk_id=1, unk_piece="[UNK]", bos_id=2, bos_piece="<s>", eos_id=3,
                       eos_piece="</s>", user_defined_symbols=[RINNA_NEWLINE]), **options}
    sentencepiece_module().SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_sentences([], RINNA_NEWLINE)), model_writer=model, **settings)
    return folder_of(tmp_path, {"spiece.model": model.getvalue(),
                                "tokenizer_config.json": json.dumps(TOKENIZER_CONFIG).encode()})


def converted(folder: Path, name: str = "spiece.model"):
    ours = load_tokenizer(str(folder))
    write_fast_tokenizer(folder, ours, folder / name)
    return ours


def test_rinnas_layout_loads_in_transformers_with_bunshins_ids_and_text(tmp_path):
    folder = folder_of(tmp_path, rinna_tokenizer([]).files)
    before = load_tokenizer(str(folder))
    ours = converted(folder)
    assert (ours.fingerprint, ours.add_bos, ours.newline) == (before.fingerprint, False, "<NL>")  # bunshin's side as it was
    assert disagreements(folder, ours, probe_texts() + TRICKY) == []
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["add_bos_token"] is False
    assert config["eos_token"] == "</s>" and config["pad_token"] == "[PAD]"  # the base's names are kept

    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(folder))
    text = ours.to_model_text("健太: おはよう\n美咲: おはよう！  今日も")
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
    assert theirs.convert_ids_to_tokens(ours.encode("<NL>")) == ["<NL>"]  # one piece, as rinna spells a line break
    assert (theirs.eos_token_id, theirs.pad_token_id, theirs.bos_token_id) == (ours.eos_id, ours.pad_id, ours.bos_id)
    assert theirs.decode([ours.eos_id, *ours.encode("またね"), ours.pad_id], skip_special_tokens=True) == "またね"


def test_the_control_transformers_on_rinnas_own_files_gets_other_ids_or_fails(tmp_path):
    folder = folder_of(tmp_path, rinna_tokenizer([]).files)
    ours = load_tokenizer(str(folder))
    try:
        found = disagreements(folder, ours, probe_texts())
    except Exception as exc:  # noqa: BLE001 - transformers 5.19 (vLLM's): "Cannot parse precompiled_charsmap"
        assert "precompiled_charsmap" in str(exc)
    else:
        assert found  # transformers 5.25: a T5 fast tokenizer that prepends ▁ and collapses spaces


def test_llamas_layout_keeps_its_dummy_prefix_and_bos(tmp_path):
    folder = folder_of(tmp_path, llama_tokenizer([]).files)
    ours = converted(folder, "tokenizer.model")
    assert ours.add_bos and ours.newline == "\n"
    assert disagreements(folder, ours, probe_texts() + TRICKY) == []


@pytest.mark.parametrize("options", [
    # sentencepiece's default normalization (a table transformers must rebuild) with extra-whitespace removal
    dict(normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True, add_dummy_prefix=False),
    # a dummy prefix beside a user-defined piece: the prefix before the whole text only
    dict(normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=False, add_dummy_prefix=True),
    dict(normalization_rule_name="identity", remove_extra_whitespaces=True, add_dummy_prefix=True),
], ids=["nfkc-strip", "nfkc-prefix", "identity-strip-prefix"])
def test_other_sentencepiece_options_are_reproduced(tmp_path, options):
    folder = spiece_folder(tmp_path, **options)
    ours = converted(folder)
    assert disagreements(folder, ours, probe_texts() + TRICKY) == []


def test_a_user_defined_piece_wins_over_pieces_that_spell_it(tmp_path):
    """sentencepiece picks `<NL>` wherever it occurs, even where normal pieces of the best score spell it (`<N`, `L>`):
    so does the fast tokenizer. (Given as added tokens instead, it would also be cut out before normalization.)"""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(rinna_tokenizer([]).files["spiece.model"])
    best = max(p.score for p in proto.pieces if p.type == 1)
    for piece in ("<N", "L>"):
        proto.pieces.add(piece=piece, score=best, type=1)
    folder = folder_of(tmp_path, {"spiece.model": proto.SerializeToString(),
                                  "tokenizer_config.json": json.dumps(TOKENIZER_CONFIG).encode()})
    ours = converted(folder)
    assert [ours.sp.id_to_piece(i) for i in ours.encode("a<NL>b")] == ["a", "<NL>", "b"]
    assert [ours.sp.id_to_piece(i) for i in ours.encode("a<N b L>")] == ["a", "<N", "▁", "b", "▁", "L>"]
    assert disagreements(folder, ours, probe_texts() + TRICKY) == []


def test_a_bpe_model_is_left_alone(tmp_path):
    folder = spiece_folder(tmp_path, model_type="bpe", vocab_size=800)
    with pytest.raises(ConversionError, match="not a Unigram"):
        converted(folder)
    assert not (folder / "tokenizer.json").exists()
