"""A random-weight model with rinna/japanese-gpt-neox-3.6b's shape, and a chat-like dataset.

Random weights run exactly as fast as the real ones, so speed and memory measured on this
model are the real model's. The tokenizer is the tiny model's rinna-style SentencePiece (the
model's vocabulary is still 32,000 wide, so the output layer costs what rinna's does).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from finetune.prompt import as_turns, encode_sample
from finetune.tiny_model import DEFAULT_CORPUS, TOKENIZER_CONFIG, train_sentencepiece
from finetune.tokenization import load_tokenizer

RINNA_3_6B = dict(
    vocab_size=32000,
    hidden_size=2816,
    intermediate_size=11264,
    num_attention_heads=22,
    num_hidden_layers=36,
    max_position_embeddings=2048,
    rotary_pct=1.0,
    rotary_emb_base=10000,
    use_parallel_residual=False,
    tie_word_embeddings=False,
    layer_norm_eps=1e-5,
    hidden_act="gelu",
    bos_token_id=2,
    eos_token_id=3,
    pad_token_id=0,
)
TINY = dict(RINNA_3_6B, hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2)


def build_model(out: Path, shape: dict, seed: int = 0) -> Path:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    spiece = train_sentencepiece([], vocab_size=1000)
    (out / "spiece.model").write_bytes(spiece)
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2), encoding="utf-8")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**shape)).to(dtype)
    model.save_pretrained(out)
    return out


def build_dataset(out: Path, model_dir: Path, samples: int, seed: int = 0, median_tokens: int = 56) -> dict:
    """train.jsonl / eval.jsonl in prepare's format whose token lengths look like real chat:
    log-normal, median ~66 tokens, about 1% over 256 (whole sentences overshoot the drawn
    length by ~10 tokens, hence the lower `median_tokens`)."""
    tokenizer = load_tokenizer(str(model_dir))
    rng = random.Random(seed)
    people = ["健太", "ryo_k", "sora", "たかし"]
    lengths = []
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(samples):
        want = max(8, int(math.exp(rng.gauss(math.log(median_tokens), 0.6))))
        context, target = [], rng.choice(DEFAULT_CORPUS)
        while True:
            pair = encode_sample(tokenizer, as_turns(context), "美咲", target, "transcript", 4096)
            if pair is None or len(pair[0]) >= want:
                break
            speaker = "美咲" if len(context) % 2 else rng.choice(people)
            context.insert(0, {"speaker": speaker, "text": rng.choice(DEFAULT_CORPUS)})
        lengths.append(len(pair[0]))
        rows.append({"id": f"{i:08x}", "persona": "美咲", "time": f"2024-01-01T00:00:{i % 60:02d}+00:00",
                     "source": "synthetic", "context": context, "target": target})
    n_eval = max(1, samples // 50)
    (out / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[n_eval:]), encoding="utf-8")
    (out / "eval.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:n_eval]), encoding="utf-8")
    lengths.sort()
    stats = {
        "samples": samples,
        "tokens_median": lengths[len(lengths) // 2],
        "tokens_p90": lengths[int(len(lengths) * 0.9)],
        "share_over_256": round(sum(1 for x in lengths if x > 256) / len(lengths), 4),
        "tokens_max": lengths[-1],
        "fingerprint": f"synthetic-{samples}-{seed}",
    }
    (out / "stats.json").write_text(json.dumps(stats), encoding="utf-8")
    return stats
