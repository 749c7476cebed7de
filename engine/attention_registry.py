"""Registering bunshin's own attention implementations with transformers, once each.

bot/slot_attention.py ("bunshin_slots", the serving engine's slot cache) and finetune/packed_attention.py
("bunshin_varlen", packed training samples) each keep their attention function; this is how either becomes a
name that `attn_implementation=` accepts.
"""

from __future__ import annotations

from collections.abc import Callable

_registered: set[str] = set()


def register_attention(name: str, make_attention: Callable[[], Callable]) -> str:
    """Make `attn_implementation=name` known to transformers; returns `name`.

    `make_attention()` builds the attention function on the first call only: building it imports torch and
    transformers, which the callers leave until a model is about to be loaded."""
    if name in _registered:
        return name
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, make_attention())
    # transformers still builds a mask for a registered implementation, and both of ours fall back to plain
    # SDPA where they do not apply (generate(), evaluation batches, a call without a slot step): SDPA's mask.
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    _registered.add(name)
    return name
