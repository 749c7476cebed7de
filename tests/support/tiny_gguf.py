"""A tiny Gemma 3 GGUF file written with gguf's own writer: what `get-base` converts, in a few kilobytes.

Its layout is Gemma 3 270M's (the same metadata keys, tensor names, a SentencePiece-style vocabulary with
control, unknown and byte tokens, weights in F32 and Q8_0), so transformers converts it along the very path the
real file takes, in seconds and offline.
"""

from __future__ import annotations

from pathlib import Path

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 2, 2, 1, 32, 128


def tiny_vocabulary() -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) in the file's spelling: ▁ for a space, control tokens first, then bytes."""
    import gguf

    kind = gguf.TokenType
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"]
    types = [kind.CONTROL, kind.CONTROL, kind.CONTROL, kind.UNKNOWN]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [kind.BYTE] * 256
    pieces = ["▁", "a", "b", "c", "▁a", "ab", "▁ab", "あ", "い", "あい", "新", "潟", "新潟", "\n", "  "]
    tokens += pieces
    types += [kind.NORMAL] * len(pieces)
    scores = [0.0] * 260 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, [int(t) for t in types]


def write_tiny_gemma3_gguf(path: Path, seed: int = 0) -> Path:
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens, scores, types = tiny_vocabulary()
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name("tiny gemma3")
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_sliding_window(32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(0)
    writer.add_unk_token_id(3)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    def f32(name: str, *shape: int) -> None:
        writer.add_tensor(name, rng.normal(0, 0.05, shape).astype(np.float32))

    def q8(name: str, *shape: int) -> None:  # quantized as the real file's matrices are (Q8_0 among them)
        weights = rng.normal(0, 0.05, shape).astype(np.float32)
        writer.add_tensor(name, gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0),
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    q8("token_embd.weight", len(tokens), HIDDEN)
    f32("output_norm.weight", HIDDEN)
    for block in range(LAYERS):
        b = f"blk.{block}"
        q8(f"{b}.attn_q.weight", HEADS * HEAD_DIM, HIDDEN)
        q8(f"{b}.attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        q8(f"{b}.attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        q8(f"{b}.attn_output.weight", HIDDEN, HEADS * HEAD_DIM)
        f32(f"{b}.attn_q_norm.weight", HEAD_DIM)
        f32(f"{b}.attn_k_norm.weight", HEAD_DIM)
        q8(f"{b}.ffn_gate.weight", FFN, HIDDEN)
        q8(f"{b}.ffn_up.weight", FFN, HIDDEN)
        q8(f"{b}.ffn_down.weight", HIDDEN, FFN)
        for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            f32(f"{b}.{norm}.weight", HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
