"""The tokenizers `finetune tiny-model` trains, one per model family, offline, from a built-in chat corpus.

Each has the layout of the real family's tokenizer, so that a tiny model falls into the traps the real one
does (special ids, padding, BOS, line breaks, ids past the vocabulary):

- rinna (gpt_neox): a SentencePiece unigram model, `[PAD]` 0, `[UNK]` 1, `<s>` 2, `</s>` 3, byte fallback,
  `<NL>` for line breaks and no newline piece, no dummy `▁` prefix, spaces kept; declared as `T5Tokenizer`,
  so no BOS starts a text.
- llama: a SentencePiece model in Llama's layout (Llama 2, Sarashina2.2, llm-jp-3): `<unk>` 0, `<s>` 1,
  `</s>` 2, no padding piece, byte fallback, a dummy `▁` prefix, real line breaks; declared as
  `LlamaTokenizer` with `add_bos_token`, so every text starts with `<s>`.
- qwen2: a byte-level BPE `tokenizer.json` (the Hugging Face tokenizers library) with Qwen2's
  pre-tokenizer; `<|endoftext|>` ends a text and pads, and there is no BOS.

The vocabulary size is an upper bound. By default it is sized from the corpus: room for every distinct
character, the byte and special pieces, and DEFAULT_VOCAB_SIZE pieces more. A fixed 1,000 failed on a real
export (its thousands of kanji: SentencePiece's "Vocabulary size is smaller than required_chars"), while
the built-in corpus cannot fill even 1,000, so it gives the same vocabulary either way.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from .tokenization import RINNA_NEWLINE, sentencepiece_module

# Everyday chat, mostly Japanese, some English: enough for common kana/kanji to get their own pieces.
# Anything else (rare kanji, most emoji) is left to byte fallback, as rare text is in rinna's vocabulary.
DEFAULT_CORPUS = (
    "おはよう！今日も一日がんばろう",
    "おはようございます。昨日はありがとうございました。",
    "こんにちは、元気ですか？",
    "こんばんは。今から帰るね",
    "おやすみなさい、また明日",
    "今日はいい天気ですね。散歩に行きたいな",
    "明日は雨らしいから傘を持っていってね",
    "今どこにいるの？",
    "駅に着いたよ。改札の前で待ってる",
    "ごめん、ちょっと遅れる！あと10分くらい",
    "了解です。気をつけてきてね",
    "ラーメン食べに行こうよ",
    "いいね！どこのお店にする？",
    "駅前の新しいお店が気になってるんだよね",
    "週末は何してた？",
    "家で映画を見てたよ。すごく面白かった",
    "それ私も見たい！タイトル教えて",
    "ありがとう、助かった〜",
    "どういたしまして。またいつでも言ってね",
    "仕事おつかれさま",
    "今日は会議が長くて疲れた……",
    "お疲れさまです。ゆっくり休んでください",
    "誕生日おめでとう🎉",
    "ありがとう！すごくうれしい😊",
    "写真送るね",
    "かわいい！これどこで撮ったの？",
    "京都の嵐山だよ。紅葉がきれいだった",
    "来月の旅行、楽しみだね",
    "新幹線の切符はもう買った？",
    "まだだから、今夜予約しておくね",
    "猫がずっと寝てる笑",
    "うちの犬も朝から寝てばかりだよ",
    "明日の予定って空いてる？",
    "午後なら大丈夫だよ",
    "じゃあ3時にカフェで会おう",
    "わかった、また連絡するね",
    "それな",
    "ほんとにそう思う",
    "まじで？知らなかった",
    "うん、そうだね",
    "えー、どうしよう",
    "なるほど、そういうことか",
    "大丈夫？無理しないでね",
    "風邪ひいたかも。熱は37度くらい",
    "お大事にね。何か買っていこうか？",
    "ゲームしようぜ",
    "今日の夜9時からどう？",
    "OK、ボイスチャンネルで待ってる",
    "すみません、資料の締め切りは金曜日でしたっけ？",
    "はい、金曜日の17時までにお願いします。",
    "東京は人が多いね",
    "大阪のたこ焼きが一番おいしい",
    "コーヒーと紅茶、どっちが好き？",
    "カタカナとひらがなと漢字、全部使うのが日本語です。",
    "Good morning! How are you doing today?",
    "I'm fine, thanks. See you at 3 pm.",
    "lol that's so funny",
    "Sounds good, let's meet at the station.",
    "Thank you so much for your help!",
    "The meeting was moved to Friday.",
    "Can you send me the link?",
    "Happy birthday! Have a great day.",
    "ok",
    "yes",
    "no problem",
    "1 2 3 4 5 6 7 8 9 0",
    "URL: https://example.com/path?q=1",
    "「はい」と『いいえ』、（かっこ）【見出し】",
    "、。！？・…ー〜",
)

# Pieces beyond the characters a corpus needs (see the module docstring).
DEFAULT_VOCAB_SIZE = 1000
_BYTE_PIECES = 256
_SPECIAL_PIECES = 8  # room for any family's special pieces

# What rinna/japanese-gpt-neox-3.6b declares: a T5Tokenizer over spiece.model with its special pieces.
TOKENIZER_CONFIG = {
    "tokenizer_class": "T5Tokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "[UNK]",
    "pad_token": "[PAD]",
    "extra_ids": 0,
    "additional_special_tokens": [],
    "do_lower_case": False,
    "sp_model_kwargs": {},
}

# What Llama-architecture bases with a SentencePiece model declare (Llama 2, Sarashina2.2, llm-jp-3):
# `add_bos_token` is what makes every text start with <s>.
LLAMA_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "legacy": False,
    "clean_up_tokenization_spaces": False,
    "sp_model_kwargs": {},
}

# Qwen2 / Qwen2.5 base models: no BOS, <|endoftext|> ends a text and pads.
QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN2_TOKENIZER_CONFIG = {
    "tokenizer_class": "Qwen2Tokenizer",
    "add_bos_token": False,
    "add_prefix_space": False,
    "bos_token": None,
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": None,
    "errors": "replace",
    "clean_up_tokenization_spaces": False,
    "split_special_tokens": False,
    "model_max_length": 32768,
}
# Qwen2's pre-tokenizer: letters, single digits, punctuation runs and whitespace runs split before BPE.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass
class TinyTokenizer:
    """A trained tokenizer: the files of its folder and the ids a model config needs."""

    files: dict[str, bytes] = field(default_factory=dict)
    size: int = 0  # ids it can produce
    bos_id: int | None = None
    eos_id: int = 0
    pad_id: int | None = None


def corpus_sentences(texts: Iterable[str], newline: str = "\n") -> list[str]:
    """The given texts and the built-in corpus, with some line breaks inside a text (as in chats), written `newline`."""
    given = [t.replace("\r\n", "\n").replace("\n", newline) for t in texts if t.strip()]
    joined = [f"{a}{newline}{b}" for a, b in zip(DEFAULT_CORPUS, DEFAULT_CORPUS[1:], strict=False)]
    return [*given, *DEFAULT_CORPUS, *joined]


def vocabulary_bound(sentences: list[str], vocab_size: int | None) -> int:
    """`vocab_size` as given, or sized from the corpus: every distinct character, the byte and special pieces,
    and DEFAULT_VOCAB_SIZE more (an upper bound: a small corpus gives fewer)."""
    if vocab_size is not None:
        return vocab_size
    return len(set().union(*map(set, sentences))) + _BYTE_PIECES + _SPECIAL_PIECES + DEFAULT_VOCAB_SIZE


def _train_sentencepiece(sentences: list[str], vocab_size: int | None, **layout) -> bytes:
    model = io.BytesIO()
    try:
        sentencepiece_module().SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type="unigram",  # unigram training samples nothing: the same texts give the same model
            vocab_size=vocabulary_bound(sentences, vocab_size),
            hard_vocab_limit=False,  # a small corpus may not fill the vocabulary: take what it gives
            character_coverage=0.9995,  # the rarest characters are left to byte fallback, as in a real vocabulary
            byte_fallback=True,
            remove_extra_whitespaces=False,  # leading, trailing and repeated spaces are kept
            normalization_rule_name="identity",  # full-width and half-width forms stay distinct
            split_digits=True,
            num_threads=1,  # thread scheduling must not change the result
            minloglevel=2,
            **layout,
        )
    except RuntimeError as exc:  # e.g. a --vocab-size too small for the corpus's characters
        hint = "leave out --vocab-size to size it from the corpus" if vocab_size is not None else "see above"
        raise ValueError(f"training the tokenizer failed ({hint}): {exc}") from None
    return model.getvalue()


def train_sentencepiece(texts: Iterable[str], vocab_size: int | None = None) -> bytes:
    """A serialized SentencePiece unigram model with rinna's special-id layout (the built-in corpus included)."""
    return _train_sentencepiece(
        corpus_sentences(texts, RINNA_NEWLINE), vocab_size,
        pad_id=0, pad_piece="[PAD]",
        unk_id=1, unk_piece="[UNK]",
        bos_id=2, bos_piece="<s>",
        eos_id=3, eos_piece="</s>",
        user_defined_symbols=[RINNA_NEWLINE],
        add_dummy_prefix=False,  # rinna: no "▁" prepended to every text
    )


def _sentencepiece_files(name: str, model: bytes, config: dict) -> TinyTokenizer:
    sp = sentencepiece_module().SentencePieceProcessor(model_proto=model)
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    files = {name: model, "tokenizer_config.json": _json(config)}
    if name == "spiece.model":
        files["spiece.vocab"] = vocab.encode("utf-8")  # rinna's folder has it
    return TinyTokenizer(files, sp.get_piece_size(), sp.bos_id(), sp.eos_id(), sp.pad_id() if sp.pad_id() >= 0 else None)


def rinna_tokenizer(texts: Iterable[str], vocab_size: int | None = None) -> TinyTokenizer:
    """rinna's folder: spiece.model, spiece.vocab and a tokenizer_config.json naming T5Tokenizer."""
    return _sentencepiece_files("spiece.model", train_sentencepiece(texts, vocab_size), TOKENIZER_CONFIG)


def llama_tokenizer(texts: Iterable[str], vocab_size: int | None = None) -> TinyTokenizer:
    """A Llama-layout SentencePiece tokenizer.model and a tokenizer_config.json naming LlamaTokenizer."""
    model = _train_sentencepiece(
        corpus_sentences(texts), vocab_size,
        unk_id=0, unk_piece="<unk>",
        bos_id=1, bos_piece="<s>",
        eos_id=2, eos_piece="</s>",
        pad_id=-1,  # Llama's vocabulary has no padding piece: the end-of-text id pads
        add_dummy_prefix=True,  # Llama: "▁" before every text
    )
    return _sentencepiece_files("tokenizer.model", model, LLAMA_TOKENIZER_CONFIG)


def qwen2_tokenizer(texts: Iterable[str], vocab_size: int | None = None) -> TinyTokenizer:
    """A byte-level BPE tokenizer.json with Qwen2's pre-tokenizer and special tokens, and its tokenizer_config.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    sentences = corpus_sentences(texts)
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocabulary_bound(sentences, vocab_size) - len(QWEN2_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(sentences, trainer)  # deterministic: BPE picks the most frequent pair, ties by order
    bpe.add_special_tokens(list(QWEN2_SPECIAL_TOKENS))  # after the learned pieces, as in Qwen's vocabulary
    end = bpe.token_to_id("<|endoftext|>")
    return TinyTokenizer({"tokenizer.json": bpe.to_str().encode("utf-8"), "tokenizer_config.json": _json(QWEN2_TOKENIZER_CONFIG)},
                         bpe.get_vocab_size(), None, end, end)


def _json(data: dict) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
