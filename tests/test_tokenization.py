"""The tokenizer the project trains and serves with gives raw SentencePiece's ids, for every input.

A tiny rinna-shaped model is built once per module (finetune/tiny_model.py); the trap that
finetune/tokenization.py describes (transformers 5 re-tokenizing rinna's SentencePiece model) is shown on it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.tiny_model import DEFAULT_CORPUS, add_arguments, build_tiny_model, run, train_sentencepiece
from finetune.tokenization import load_tokenizer

TRICKY = [
    "",
    "😀",
    "👨‍👩‍👧‍👦 家族",  # ZWJ sequence
    "🇯🇵🇺🇸",  # flags: regional-indicator pairs
    "いいね👍🏽",  # skin-tone modifier
    "𠮷野家に行った",  # outside the BMP
    "龘",
    "𩸽の塩焼き",
    "ｶﾀｶﾅとﾊﾟﾝ",  # half-width kana, with a separate half-width handakuten
    "ＡＢＣ１２３",
    "\tタブ\t区切り\t",
    "double  space",
    "   leading spaces",
    "trailing spaces   ",
    "　全角スペース　",
    "一行目<NL>二行目<NL>",
    "Ωμέγα Привет 안녕하세요 مرحبا",  # none of these scripts is in the tokenizer's corpus
    "cafe\u0301 vs café",  # combining accent vs precomposed
    "</s> <s> [PAD] [UNK]",  # typed by a person: text, never control ids
    "今日は🍣食べた！ ｳﾏｲ 𠮷 lol",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def raw_sp(tiny) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(tiny / "spiece.model"))


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(str(tiny))


@pytest.mark.parametrize("text", TRICKY)
def test_ids_equal_raw_sentencepiece_and_text_round_trips(tok, raw_sp, text):
    ids = tok.encode(text)
    assert ids == raw_sp.encode(text)
    assert tok.decode(ids) == text


def test_unseen_characters_fall_back_to_utf8_bytes(tok, raw_sp):
    # 𩸽 is not in the tokenizer's corpus: it must become its 4 UTF-8 bytes, not [UNK] or <s>.
    ids = tok.encode("𩸽")
    assert [raw_sp.id_to_piece(i) for i in ids] == ["<0xF0>", "<0xA9>", "<0xB8>", "<0xBD>"]
    assert raw_sp.unk_id() not in tok.encode("".join(TRICKY))


def test_special_ids_follow_rinnas_layout(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert tok.backend == "sentencepiece"
    # Ids past the vocabulary (a model may pad its embedding) and control ids decode to nothing.
    assert tok.decode([tok.bos_id, *tok.encode("はい"), tok.eos_id, tok.pad_id, tok.vocab_size + 5]) == "はい"


# U+2581 "▁" is SentencePiece's own space mark and decodes as a space: the one text that cannot round-trip.
@settings(max_examples=200, deadline=None, database=None)
@given(st.text(max_size=40))
def test_any_unicode_text_matches_raw_sentencepiece(tok, raw_sp, text):
    ids = tok.encode(text)
    assert ids == raw_sp.encode(text)
    if "\u2581" not in text:
        assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None, database=None)
@given(st.text(alphabet=st.sampled_from("あ漢ｱ😀 \t\na"), max_size=30))
def test_line_breaks_survive_the_model_spelling(tok, text):
    model_text = tok.to_model_text(text)
    assert "\n" not in model_text
    assert tok.from_model_text(tok.decode(tok.encode(model_text))) == text


def test_typed_nl_is_indistinguishable_from_a_line_break(tok):
    # rinna's convention has no escape: a person typing "<NL>" reads back as a line break.
    assert tok.from_model_text(tok.decode(tok.encode(tok.to_model_text("a<NL>b")))) == "a\nb"


# --- the trap this module exists for -------------------------------------------------------------------


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="documents transformers 5's conversion")
def test_transformers_autotokenizer_does_not_give_sentencepiece_ids(tiny, raw_sp):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny), use_fast=False)
    assert hf.is_fast, "use_fast=False is ignored: the SentencePiece model is converted to a fast tokenizer"

    def hf_ids(text):
        return hf.encode(text, add_special_tokens=False)

    mismatched = [t for t in TRICKY if hf_ids(t) != raw_sp.encode(t)]
    assert len(mismatched) >= len(TRICKY) - 1, mismatched  # only "" comes out the same

    # Even text made only of known pieces gets a "▁" in front that rinna's model never saw there.
    plain = "今日はいい天気ですね。"
    assert hf_ids(plain) == [raw_sp.piece_to_id("▁"), *raw_sp.encode(plain)]
    # No byte fallback: an unseen character becomes id 2, which in this vocabulary is <s>.
    assert raw_sp.id_to_piece(2) == "<s>"
    assert hf_ids("𩸽") == [raw_sp.piece_to_id("▁"), 2]
    # Repeated spaces collapse, so the text cannot come back.
    assert hf.decode(hf_ids("double  space"), skip_special_tokens=True) != "double  space"
    # And a person typing "</s>" would end the text.
    assert raw_sp.eos_id() in hf_ids("</s>")


# --- newline convention and the transformers path -------------------------------------------------------


def test_rinna_layout_uses_nl_for_line_breaks(tok):
    assert tok.newline == "<NL>"
    assert tok.to_model_text("一行目\n二行目") == "一行目<NL>二行目"
    assert tok.encode(tok.to_model_text("\n")) == [tok.encode("<NL>")[0]]  # one piece, not a byte
    assert tok.from_model_text("一行目<NL>二行目") == "一行目\n二行目"


def _bpe_folder(folder: Path, extra_tokens: tuple[str, ...] = ()) -> Path:
    """A byte-level BPE tokenizer.json as Llama-3 / Qwen ship, trained here, and the config naming it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(["\n".join(DEFAULT_CORPUS)], trainer)
    bpe.add_tokens(list(extra_tokens))
    folder.mkdir(parents=True)
    bpe.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_bpe_tokenizer_json_is_loaded_through_transformers_with_real_newlines(tmp_path):
    from tokenizers import Tokenizer

    folder = _bpe_folder(tmp_path / "bpe")
    tok = load_tokenizer(str(folder))
    assert tok.backend == "transformers"
    assert tok.newline == "\n"
    assert tok.to_model_text("a\nb") == "a\nb"
    assert tok.eos_id == tok.pad_id == Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id("<|endoftext|>")
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in TRICKY + ["行1\n行2"]:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text)) == text


def test_nl_piece_alone_does_not_make_nl_the_newline(tmp_path):
    # A vocabulary that has "<NL>" *and* can write "\n" keeps real line breaks.
    tok = load_tokenizer(str(_bpe_folder(tmp_path / "bpe", extra_tokens=("<NL>",))))
    assert tok.newline == "\n"


def test_tokenizer_model_that_is_not_sentencepiece_goes_to_transformers(tmp_path):
    folder = _bpe_folder(tmp_path / "bpe")
    (folder / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # tiktoken's format, as Llama-3 ships
    assert load_tokenizer(str(folder)).backend == "transformers"


def test_folder_without_tokenizer_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(str(tmp_path))


def test_hub_id_is_read_from_the_offline_cache(tiny, raw_sp, tmp_path, monkeypatch):
    from huggingface_hub import constants

    # The cache layout huggingface_hub writes: refs/main names the commit, snapshots/<commit> holds the files.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-rinna"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny, repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    for revision in (None, commit):
        tok = load_tokenizer("someone/tiny-rinna", revision=revision)
        assert tok.backend == "sentencepiece"
        assert tok.name_or_path == "someone/tiny-rinna"
        assert tok.encode(TRICKY[-1]) == raw_sp.encode(TRICKY[-1])


# --- fingerprint -----------------------------------------------------------------------------------------


def test_fingerprint_follows_the_model_file_not_the_folder(tiny, tok, tmp_path):
    assert tok.fingerprint == hashlib.sha256((tiny / "spiece.model").read_bytes()).hexdigest()
    copy = shutil.copytree(tiny, tmp_path / "copy")
    assert load_tokenizer(str(copy)).fingerprint == tok.fingerprint

    (copy / "spiece.model").write_bytes(train_sentencepiece(["鱚の天ぷら"] * 50, vocab_size=1000))
    assert load_tokenizer(str(copy)).fingerprint != tok.fingerprint


def test_fingerprint_of_a_transformers_tokenizer_follows_tokenizer_json(tmp_path):
    before = load_tokenizer(str(_bpe_folder(tmp_path / "a"))).fingerprint
    assert load_tokenizer(str(_bpe_folder(tmp_path / "b"))).fingerprint == before
    assert load_tokenizer(str(_bpe_folder(tmp_path / "c", extra_tokens=("<|im_start|>",)))).fingerprint != before


# --- the tiny model --------------------------------------------------------------------------------------


def test_tiny_model_folder_looks_like_rinnas(tiny, raw_sp):
    from sentencepiece import sentencepiece_model_pb2

    tokenizer_files = {p.name for p in tiny.iterdir()} - {"config.json", "generation_config.json", "model.safetensors"}
    assert tokenizer_files == {"spiece.model", "spiece.vocab", "tokenizer_config.json"}
    assert json.loads((tiny / "tokenizer_config.json").read_text())["tokenizer_class"] == "T5Tokenizer"
    assert [raw_sp.id_to_piece(i) for i in range(4)] == ["[PAD]", "[UNK]", "<s>", "</s>"]
    proto = sentencepiece_model_pb2.ModelProto.FromString((tiny / "spiece.model").read_bytes())
    assert proto.trainer_spec.byte_fallback
    assert not proto.normalizer_spec.add_dummy_prefix
    assert not proto.normalizer_spec.remove_extra_whitespaces
    assert raw_sp.is_unknown(raw_sp.piece_to_id("\n"))
    assert not raw_sp.is_unknown(raw_sp.piece_to_id("<NL>"))


def test_tiny_model_loads_and_runs_a_forward_pass(tiny, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert model.config.vocab_size == tok.vocab_size
    assert (model.config.bos_token_id, model.config.eos_token_id) == (tok.bos_id, tok.eos_id)
    ids = torch.tensor([tok.encode(tok.to_model_text("おはよう\n今日も😀"))])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], tok.vocab_size)
    assert torch.isfinite(out.loss)


def test_tiny_model_is_deterministic_for_a_seed(tiny, tmp_path):
    again = build_tiny_model(tmp_path / "again")
    for name in ("spiece.model", "model.safetensors", "config.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), name
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()


def test_tiny_model_build_failure_leaves_no_folder(tmp_path, monkeypatch):
    from transformers import GPTNeoXForCausalLM

    def disk_full(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(GPTNeoXForCausalLM, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        build_tiny_model(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging sibling


def test_tiny_model_refuses_to_overwrite_unless_asked(tiny, tmp_path):
    out = shutil.copytree(tiny, tmp_path / "model")
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny_model(out)
    assert (out / "keep.txt").read_text() == "mine"
    build_tiny_model(out, replace=True)
    assert not (out / "keep.txt").exists()


def test_tiny_model_cli_trains_the_tokenizer_on_the_given_corpus(tmp_path, capsys):
    # prepare's train.jsonl: 鱚 (a fish no default text mentions) is frequent enough to earn its own piece.
    corpus = tmp_path / "train.jsonl"
    sample = {"target": "鱚の天ぷらが食べたい", "context": [{"speaker": "A", "text": "鱚釣りに行こう"}]}
    corpus.write_text("\n".join(json.dumps(sample, ensure_ascii=False) for _ in range(30)), encoding="utf-8")
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    assert run(parser.parse_args([str(tmp_path / "model"), "--corpus", str(corpus), "--seed", "3"])) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "model")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "model" / "spiece.model"))
    assert not any(sp.is_byte(i) for i in sp.encode("鱚"))

    assert run(parser.parse_args([str(tmp_path / "model")])) == 1  # exists: refused, not overwritten
    assert "already exists" in capsys.readouterr().err


# --- the other model families' tokenizers -----------------------------------------------------------------


def _llama_folder(folder: Path, config: dict | None, tokenizer_json: dict | None = None) -> Path:
    """The llama family's tokenizer.model, with the tokenizer_config.json (and tokenizer.json) given."""
    from finetune.tiny_tokenizers import llama_tokenizer

    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(llama_tokenizer([]).files["tokenizer.model"])
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if tokenizer_json is not None:
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json), encoding="utf-8")
    return folder


def _template(first: str) -> dict:
    return {"post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": first, "type_id": 0}},
                                                                       {"Sequence": {"id": "A", "type_id": 0}}]}}


@pytest.mark.parametrize(("config", "tokenizer_json", "adds_bos"), [
    ({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}, None, True),
    ({"tokenizer_class": "LlamaTokenizer", "add_bos_token": False}, None, False),  # the key wins over the class
    ({"tokenizer_class": "LlamaTokenizerFast"}, None, True),  # the class's default
    ({"tokenizer_class": "T5Tokenizer"}, None, False),  # rinna's
    ({"tokenizer_class": "PreTrainedTokenizerFast"}, _template("<s>"), True),  # the fast tokenizer's template
    ({"tokenizer_class": "PreTrainedTokenizerFast"}, _template("</s>"), False),
    (None, None, False),  # a bare SentencePiece model: nothing says to add one
], ids=["add_bos_token", "add_bos_token-false", "llama-default", "t5", "template-bos", "template-other", "bare"])
def test_a_sentencepiece_model_starts_texts_with_bos_as_its_folder_says(tmp_path, config, tokenizer_json, adds_bos):
    from finetune.prompt import ChatTurn, encode_prompt

    tok = load_tokenizer(str(_llama_folder(tmp_path / "llama", config, tokenizer_json)))
    assert tok.backend == "sentencepiece" and tok.bos_id == 1
    assert tok.add_bos is adds_bos
    prompt = encode_prompt(tok, [ChatTurn("健太", "おはよう")], "美咲", "transcript")
    assert (prompt[0] == tok.bos_id) is adds_bos
    assert prompt[adds_bos:] == tok.encode("健太: おはよう\n美咲: ")


def test_a_corrupt_tokenizer_config_is_a_clear_error(tmp_path):
    folder = _llama_folder(tmp_path / "llama", None)
    (folder / "tokenizer_config.json").write_text('{"add_bos_token": tru', encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        load_tokenizer(str(folder))


# --- the default vocabulary, on the built-in corpus and on a real-size one ------------------------------------


def test_the_default_vocabulary_keeps_the_built_in_corpus_model_as_it_was():
    # The built-in corpus cannot fill 1,000 pieces: sized from the corpus, the vocabulary comes out the same.
    assert train_sentencepiece([]) == train_sentencepiece([], vocab_size=1000)
    assert train_sentencepiece(DEFAULT_CORPUS[:5]) == train_sentencepiece(DEFAULT_CORPUS[:5], vocab_size=1000)


@pytest.fixture(scope="module")
def real_size_corpus(tmp_path_factory) -> Path:
    from tests.support.varied_corpus import varied_lines

    path = tmp_path_factory.mktemp("corpus") / "chats.txt"
    path.write_text("\n".join(varied_lines(20_000)), encoding="utf-8")
    return path


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "qwen2"])
def test_the_default_vocabulary_trains_on_a_real_size_corpus(arch, real_size_corpus, tmp_path, capsys):
    """20,000 varied chat lines over ~4,800 distinct characters: a fixed 1,000 failed on them (SentencePiece's
    "Vocabulary size is smaller than required_chars"); the default is sized from the corpus."""
    from collections import Counter

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "model"
    assert run(parser.parse_args([str(out), "--arch", arch, "--corpus", str(real_size_corpus)])) == 0, capsys.readouterr().err
    tok = load_tokenizer(str(out))
    lines = real_size_corpus.read_text(encoding="utf-8").splitlines()
    counts = Counter("".join(lines))
    assert tok.vocab_size > 4000  # far past the old 1,000: the bound grew with the corpus
    if tok.backend == "sentencepiece":  # every common character has a piece of its own, not byte fallback
        common = [c for c, _ in counts.most_common(1500)]
        assert not [c for c in common if any(tok.sp.is_byte(i) for i in tok.encode(c))]
    for line in lines[:200]:
        assert tok.decode(tok.encode(line)) == line


def test_a_vocab_size_too_small_for_the_corpus_says_what_to_do(real_size_corpus, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "model"), "--corpus", str(real_size_corpus), "--vocab-size", "1000"])
    assert run(args) == 1
    err = capsys.readouterr().err
    assert "leave out --vocab-size to size it from the corpus" in err and "required_chars" in err
    assert not (tmp_path / "model").exists()
