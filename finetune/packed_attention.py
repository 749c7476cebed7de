"""Variable-length attention for packed chat samples, on PyTorch's own flash kernel.

Packed rows with restarting position ids already keep samples apart under SDPA (transformers
builds a block-diagonal mask), but a masked SDPA call cannot use the flash kernel: it computes
every (query, key) pair of a 2048-token row and throws most away. PyTorch's `varlen_attn`
takes the samples' boundaries (`cu_seqlens`) instead, and each sample attends only over its
own ~66 tokens. This module registers it with transformers as the attention implementation
"bunshin_varlen"; the collator then hands the model one flat sequence plus the boundaries.

A sliding-window layer (Gemma 3: 512 tokens) attends within its window only where a sample is longer
than the window (`--max-length` over it); shorter samples never reach the window's edge.

CUDA only (it is a flash kernel). `finetune train --attention auto` uses it when available
and falls back to masked SDPA otherwise (CPU, older PyTorch); bench/attention_probe.py checks
that both give the same loss.
"""

from __future__ import annotations

import inspect

from engine.attention_registry import register_attention

NAME = "bunshin_varlen"


def available(device: str) -> bool:
    if not device.startswith("cuda"):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (PyTorch >= 2.9)
    except ImportError:
        return False
    return True


def register() -> str:
    """Make `attn_implementation="bunshin_varlen"` known to transformers; returns the name."""
    return register_attention(NAME, _varlen_attention)


def _varlen_attention():
    """The function transformers calls in each attention layer (built at registration: it imports torch)."""
    import torch
    from torch.nn.attention.varlen import varlen_attn
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    params = inspect.signature(varlen_attn).parameters
    # PyTorch 2.9-2.11 take is_causal=; later versions express causality as a window.
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        cu_seqlens = kwargs.get("cu_seq_lens_q")
        if cu_seqlens is None or query.shape[0] != 1:
            # Generation, evaluation of ordinary batches, anything not flattened: plain SDPA.
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        # transformers hands (batch=1, heads, tokens, dim); varlen_attn wants (tokens, heads, dim).
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        dtype = q.dtype
        if dtype not in (torch.float16, torch.bfloat16):
            # k-bit preparation keeps layer norms in fp32, so activations arrive in fp32; the flash
            # kernel takes half precision only (transformers' flash integration does the same).
            half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            q, k, v = q.to(half), k.to(half), v.to(half)
        gqa = {}
        if k.shape[1] != q.shape[1]:  # grouped-query attention (Llama 3, Qwen2, Gemma 3): fewer key/value heads
            if "enable_gqa" in params:
                gqa = {"enable_gqa": True}
            else:  # each key/value head serves the next group of query heads, as transformers' repeat_kv does
                k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        max_len = int(kwargs["max_length_q"])
        window = kwargs.get("sliding_window")
        mode = causal
        if window and max_len > window:
            if "window_size" not in params:
                raise RuntimeError(f"samples of up to {max_len} tokens cross this model's {window}-token attention window, "
                                   f"and PyTorch {torch.__version__}'s varlen_attn has no window: use --attention sdpa")
            # Flash's (left, right): keys i-left..i, the `window` positions transformers' masks allow.
            mode = {"window_size": (window - 1, 0)}
        out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale=scaling, **mode, **gqa)
        return out.to(dtype).unsqueeze(0), None  # (1, tokens, heads, dim), as the model reshapes it

    return attention
