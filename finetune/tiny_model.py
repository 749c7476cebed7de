"""`finetune tiny-model OUT [--arch FAMILY]`: a random-weight base model of one model family, built offline.

Tests and dry runs need a real base model, and the real ones are gigabytes behind a download. This
builds one in a second: a tokenizer trained on a small built-in chat corpus (plus any texts given) in
the layout of the family's real tokenizer (finetune/tiny_tokenizers.py), and a tiny model of that
architecture with random weights:

- gpt_neox (default): rinna/japanese-gpt-neox-3.6b's shape. The folder holds what rinna's does as far
  as tokenizer files go (`spiece.model`, `spiece.vocab`, a `tokenizer_config.json` naming
  `T5Tokenizer`), so it falls into the same transformers trap the real model does.
- llama: Llama with grouped-query attention (Sarashina2.2, llm-jp-3): a SentencePiece `tokenizer.model`
  with byte fallback whose texts start with BOS.
- qwen2: Qwen2 with grouped-query attention and an embedding wider than the tokenizer
  (as Qwen2.5 pads its vocabulary): a byte-level BPE `tokenizer.json`, no BOS.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .atomic_output import atomic_directory
from .tiny_tokenizers import (  # noqa: F401  (DEFAULT_CORPUS, TOKENIZER_CONFIG, train_sentencepiece: used by bench/)
    DEFAULT_CORPUS,
    TOKENIZER_CONFIG,
    TinyTokenizer,
    llama_tokenizer,
    qwen2_tokenizer,
    rinna_tokenizer,
    train_sentencepiece,
)

# The size every family shares: 2 layers of 64, 2 attention heads of 32, 512 positions. Heads of 32, not 16: vLLM's
# CPU attention takes no smaller head, and a merged tiny model is what tests/test_remote_vllm.py serves with it.
_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, max_position_embeddings=512)

TINY_CONFIG = dict(
    _TINY,
    # As in rinna's config.json: rotary on every dimension, sequential residual, untied head.
    rotary_pct=1.0,
    use_parallel_residual=False,
    tie_word_embeddings=False,
)


@dataclass(frozen=True)
class Family:
    """How to build one model family's tiny base: its tokenizer, and its config from the tokenizer's ids."""

    tokenizer: Callable[[Iterable[str], int | None], TinyTokenizer]
    config: Callable[[TinyTokenizer], object]


def _gpt_neox_config(tok: TinyTokenizer):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=tok.size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                         **TINY_CONFIG)


def _llama_config(tok: TinyTokenizer):
    from transformers import LlamaConfig

    # Grouped-query attention: 1 key/value head serves the 2 query heads, as in every recent Llama-architecture base.
    return LlamaConfig(vocab_size=tok.size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                       num_key_value_heads=1, tie_word_embeddings=False, **_TINY)


def _qwen2_config(tok: TinyTokenizer):
    from transformers import Qwen2Config

    # Qwen2.5 pads its embedding past the tokenizer (151,936 rows for 151,665 tokens): here to a multiple of 64,
    # so ids no tokenizer produces exist in the model as they do in the real one. The head is untied (as in
    # Qwen2.5-7B): a random model with a tied head only repeats its last token, which would hide a wrong prompt.
    return Qwen2Config(vocab_size=-(-tok.size // 64) * 64, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                       pad_token_id=tok.pad_id, num_key_value_heads=1, tie_word_embeddings=False,
                       use_sliding_window=False, **_TINY)


# Named as transformers names the architecture (config.json's model_type).
FAMILIES = {
    "gpt_neox": Family(rinna_tokenizer, _gpt_neox_config),
    "llama": Family(llama_tokenizer, _llama_config),
    "qwen2": Family(qwen2_tokenizer, _qwen2_config),
}


def build_tiny_model(
    out_dir: str | Path,
    corpus_texts: Iterable[str] = (),
    vocab_size: int | None = None,
    seed: int = 0,
    *,
    arch: str = "gpt_neox",
    replace: bool = False,
    head_std: float | None = None,
) -> Path:
    """Writes a loadable random model of family `arch` and its tokenizer into `out_dir`.

    The folder appears complete or not at all. `vocab_size` is an upper bound on the tokenizer's
    vocabulary; None sizes it from the corpus (finetune/tiny_tokenizers.py).

    `head_std` re-draws the output layer with that standard deviation. At the default init (0.02) a
    64-wide model's logits stay within about ±1.3 whatever its hidden state, so no LoRA on the layers
    below can make it sure of a token and training stalls near a uniform guess; a real LM's head is
    far larger. 0.5 gives a model that can learn a persona's catchphrase in seconds (tests/test_evaluate.py).
    """
    if arch not in FAMILIES:
        raise ValueError(f"unknown --arch {arch!r}; choose {', '.join(FAMILIES)}")
    import torch  # heavy: only when a model is built, not when the CLI parser is made
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    family = FAMILIES[arch]
    tokenizer = family.tokenizer(corpus_texts, vocab_size)
    config = family.config(tokenizer)
    with torch.random.fork_rng(devices=[]):  # seed the weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            if head_std is not None:
                model.get_output_embeddings().weight.normal_(0.0, head_std)
            # Rows past the tokenizer (Qwen's padding) are never trained in a real model: zero, so that their
            # logit is 0 and a random model does not spend its replies on ids that decode to nothing.
            for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
                embedding.weight[tokenizer.size:] = 0.0

    with atomic_directory(out, replace=replace) as staging:
        for name, data in tokenizer.files.items():
            (staging / name).write_bytes(data)
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
    parser.add_argument("--arch", choices=list(FAMILIES), default="gpt_neox",
                        help="model family: gpt_neox (rinna's shape, the default), llama (SentencePiece with BOS, "
                             "grouped-query attention) or qwen2 (byte-level BPE, no BOS, grouped-query attention)")
    parser.add_argument(
        "--corpus", type=Path, nargs="+", default=[], metavar="FILE",
        help="texts for the tokenizer besides the built-in chat corpus (prepare's .jsonl, or one text per line)",
    )
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="upper bound on the tokenizer's vocabulary (default: sized from the corpus, "
                             "every character it needs and 1000 pieces more)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same model (default: 0)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    try:
        texts = [text for path in args.corpus for text in _read_corpus(path)]
        out = build_tiny_model(args.out, texts, vocab_size=args.vocab_size, seed=args.seed, arch=args.arch,
                               replace=args.force)
    except (OSError, ValueError) as exc:  # FileExistsError, a missing corpus file, a bad JSON line
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0
