"""`finetune tiny-model OUT`: a random-weight base model with rinna's shape of tokenizer, built offline.

Tests and dry runs need a real base model, and the real one (rinna/japanese-gpt-neox-3.6b) is
7 GB behind a download. This builds one in a second: a SentencePiece unigram model trained on a
small built-in chat corpus (plus any texts given) with rinna's layout — `[PAD]` 0, `[UNK]` 1,
`<s>` 2, `</s>` 3, byte fallback, `<NL>` for line breaks and no newline piece, no dummy `▁`
prefix, spaces kept as they are — and a tiny GPT-NeoX with random weights. The folder holds what
rinna's does as far as tokenizer files go (`spiece.model`, `spiece.vocab`, a `tokenizer_config.json`
naming `T5Tokenizer`) so it falls into the same transformers trap the real model does.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from .atomic_output import atomic_directory
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

# One line break per sample in rinna's spelling, so `<NL>` appears in context during training.
_CORPUS_JOINED = tuple(f"{a}{RINNA_NEWLINE}{b}" for a, b in zip(DEFAULT_CORPUS, DEFAULT_CORPUS[1:], strict=False))

TINY_CONFIG = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=256,
    max_position_embeddings=512,
    # As in rinna's config.json: rotary on every dimension, sequential residual, untied head.
    rotary_pct=1.0,
    use_parallel_residual=False,
    tie_word_embeddings=False,
)

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


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> bytes:
    """A serialized SentencePiece unigram model with rinna's special-id layout.

    Unigram training samples nothing (every sentence is read), so the same texts give the same model.
    """
    sentences = [t.replace("\r\n", "\n").replace("\n", RINNA_NEWLINE) for t in texts if t.strip()]
    sentences += [*DEFAULT_CORPUS, *_CORPUS_JOINED]
    model = io.BytesIO()
    try:
        sentencepiece_module().SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type="unigram",
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # a small corpus may not fill the vocabulary: take what it gives
            character_coverage=0.9995,  # the rarest characters are left to byte fallback, as in a real vocabulary
            byte_fallback=True,
            pad_id=0, pad_piece="[PAD]",
            unk_id=1, unk_piece="[UNK]",
            bos_id=2, bos_piece="<s>",
            eos_id=3, eos_piece="</s>",
            user_defined_symbols=[RINNA_NEWLINE],
            add_dummy_prefix=False,  # rinna: no "▁" prepended to every text
            remove_extra_whitespaces=False,  # rinna: leading, trailing and repeated spaces are kept
            normalization_rule_name="identity",  # full-width and half-width forms stay distinct
            split_digits=True,
            num_threads=1,  # thread scheduling must not change the result
            minloglevel=2,
        )
    except RuntimeError as exc:  # e.g. more distinct characters than vocab_size leaves room for
        raise ValueError(f"training the tokenizer failed (try a larger --vocab-size): {exc}") from None
    return model.getvalue()


def build_tiny_model(
    out_dir: str | Path,
    corpus_texts: Iterable[str] = (),
    vocab_size: int = 1000,
    seed: int = 0,
    *,
    replace: bool = False,
    head_std: float | None = None,
) -> Path:
    """Writes a loadable random GPT-NeoX + rinna-style SentencePiece tokenizer into `out_dir`.

    The folder appears complete or not at all. `vocab_size` is an upper bound: the tokenizer
    gets what the corpus supports (at least the 256 byte pieces and the special pieces).

    `head_std` re-draws the output layer with that standard deviation. At the default init (0.02) a
    64-wide model's logits stay within about ±1.3 whatever its hidden state, so no LoRA on the layers
    below can make it sure of a token and training stalls near a uniform guess; a real LM's head is
    far larger. 0.5 gives a model that can learn a persona's catchphrase in seconds (tests/test_evaluate.py).
    """
    import torch  # heavy: only when a model is built, not when the CLI parser is made
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    out = Path(out_dir)
    spiece = train_sentencepiece(corpus_texts, vocab_size)
    sp = sentencepiece_module().SentencePieceProcessor(model_proto=spiece)

    config = GPTNeoXConfig(
        vocab_size=sp.get_piece_size(),
        bos_token_id=sp.bos_id(),
        eos_token_id=sp.eos_id(),
        pad_token_id=sp.pad_id(),
        **TINY_CONFIG,
    )
    with torch.random.fork_rng(devices=[]):  # seed the weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(config)
        if head_std is not None:
            with torch.no_grad():
                model.get_output_embeddings().weight.normal_(0.0, head_std)

    with atomic_directory(out, replace=replace) as staging:
        (staging / "spiece.model").write_bytes(spiece)
        vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
        (staging / "spiece.vocab").write_text(vocab, encoding="utf-8")
        (staging / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")
        model.save_pretrained(staging)
    return out


def _read_corpus(path: Path) -> list[str]:
    # `prepare`'s train.jsonl: the persona's replies and their context; any other file: one text per line.
    if path.suffix == ".jsonl":
        texts = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                sample = json.loads(line)
                texts.append(sample.get("target") or "")
                texts += [turn.get("text") or "" for turn in sample.get("context", [])]
        return texts
    return path.read_text(encoding="utf-8").splitlines()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, metavar="OUT", help="folder to create")
    parser.add_argument(
        "--corpus", type=Path, nargs="+", default=[], metavar="FILE",
        help="texts for the tokenizer besides the built-in chat corpus (prepare's .jsonl, or one text per line)",
    )
    parser.add_argument("--vocab-size", type=int, default=1000, help="upper bound on the tokenizer's vocabulary (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same model (default: 0)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    try:
        texts = [text for path in args.corpus for text in _read_corpus(path)]
        out = build_tiny_model(args.out, texts, vocab_size=args.vocab_size, seed=args.seed, replace=args.force)
    except (OSError, ValueError) as exc:  # FileExistsError, a missing corpus file, a bad JSON line
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0
