"""Random-weight models with real models' shapes, and a chat-like dataset.

RINNA_3_6B is rinna/japanese-gpt-neox-3.6b (GPT-NeoX); LLAMA_3B is sbintuitions/sarashina2.2-3b
(Llama with grouped-query attention, the architecture of the newer Japanese bases). Random
weights run exactly as fast as the real ones, so speed and memory measured on these models are
the real models'. The tokenizer is the tiny model's rinna-style SentencePiece for every shape
(the model's vocabulary stays as wide as the real one's, so the output layer costs what it does
there; prompts never contain ids beyond the tokenizer's 1,000).
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

# sbintuitions/sarashina2.2-3b's config.json (https://huggingface.co/sbintuitions/sarashina2.2-3b/blob/main/config.json):
# LlamaForCausalLM, hidden 2560, 32 layers, 16 attention heads over 8 KV heads (head_dim 160), MLP 8960,
# vocab 102400, untied output layer, rope_theta 500000, 8192 positions: 3.36B parameters. Its bos/eos
# are 1/2; here they are the bench tokenizer's (2/3) so generation stops where the tokenizer says.
LLAMA_3B = dict(
    model_type="llama",  # build_model's switch to LlamaForCausalLM (not a config field it passes on)
    vocab_size=102400,
    hidden_size=2560,
    intermediate_size=8960,
    num_attention_heads=16,
    num_key_value_heads=8,
    num_hidden_layers=32,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    bos_token_id=2,
    eos_token_id=3,
    pad_token_id=0,
)
LLAMA_TINY = dict(LLAMA_3B, hidden_size=64, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2)
SHAPES = {"rinna": RINNA_3_6B, "tiny": TINY, "llama3b": LLAMA_3B, "llama-tiny": LLAMA_TINY}


def describe(shape: dict) -> str:
    """One line naming the architecture and its sizes."""
    arch = "Llama" if shape.get("model_type") == "llama" else "GPT-NeoX"
    heads, kv = shape["num_attention_heads"], shape.get("num_key_value_heads", shape["num_attention_heads"])
    return (f"{arch}: {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, {heads} attention heads / "
            f"{kv} KV heads, MLP {shape['intermediate_size']}, vocab {shape['vocab_size']}")


def build_model(out: Path, shape: dict, seed: int = 0) -> Path:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    spiece = train_sentencepiece([], vocab_size=1000)
    (out / "spiece.model").write_bytes(spiece)
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2), encoding="utf-8")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        if shape.get("model_type") == "llama":
            model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in shape.items() if k != "model_type"})).to(dtype)
        else:
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
