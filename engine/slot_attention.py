"""A static KV cache with one row per chat ("slot"), written and read by a custom attention function.

Continuous batching needs every chat in the batch at its own position: one chat is 300 tokens
into its reply while another has just been prefilled. transformers' caches keep one write
position for the whole batch, so instead of a Cache object this module registers an attention
implementation ("bunshin_slots") with transformers. The model is called with `use_cache=False`;
each attention layer hands this function its new keys and values (rotary already applied), and
the function writes them into the layer's rows of a preallocated cache at each row's own
positions, then attends over the cache with a mask built from those positions.

Everything the function needs for one forward pass is in a `SlotStep`, passed as the model call's
`slot_step` keyword (transformers hands unknown keywords down to the attention function; that also
keeps a torch.compile'd step free of module globals). Inside a CUDA graph the Python runs once at
capture; the step's tensors are the graph's static buffers, so each replay reads whatever positions
were copied into them. `active_step()` sets one for calls that cannot pass it (the start-up probe).

Sliding-window layers (Gemma 2/3, Mistral; transformers passes their `sliding_window`) attend to the
last `sliding_window` positions up to and including their own, as transformers' masks do: the step's
mask narrowed per window. Their cache rows still hold the whole length (Gemma 3 270M: 18 KB a token
over all its layers in bf16), so a window costs no bookkeeping of where a row's window starts.

Without an active step the function is plain SDPA, so `model.generate()` keeps working on a
model switched to this implementation (tests and benchmarks compare the two on one model).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

from .attention_registry import register_attention

NAME = "bunshin_slots"
_active: SlotStep | MixedStep | ProbeStep | None = None


@dataclass
class SlotCache:
    """Per layer, keys and values of shape (slots, kv_heads, length, head_dim)."""

    keys: list
    values: list

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass
class SlotStep:
    """One forward pass over `len(write_positions)` rows.

    row_index: (batch, 1) cache row (slot) of each batch row: the first index of the cache writes.
    write_positions: (batch, tokens) cache position of each new token.
    Decode reads cache rows 0..batch-1 (batch row i is slot i), as a view:
    kv_length: how many cache positions attention reads (a bucket >= every row's length);
    mask: (batch, 1, tokens, kv_length) bool, True where a query may attend.
    """

    cache: SlotCache
    row_index: object
    write_positions: object
    kv_length: int = 0
    mask: object | None = None
    # Prefill: the rows' caches start empty, so the new tokens attend causally to each other only
    # (no cache read, no mask: the flash kernel). Right padding comes after every real token.
    prefill: bool = False
    # The batch rows are arbitrary slots (row_index), not slots 0..batch-1: read those cache rows.
    gather: bool = False
    # Masks of sliding-window layers by window size, made by the first such layer of the forward pass.
    window_masks: dict = field(default_factory=dict)

    def mask_within(self, window: int):
        """The mask narrowed to keys less than `window` positions before each query (transformers'
        `kv_idx > q_idx - sliding_window`). Prefill: causal over the new tokens, which start at position 0."""
        mask = self.window_masks.get(window)
        if mask is None:
            import torch

            queries = self.write_positions.unsqueeze(1).unsqueeze(-1)  # (batch, 1, tokens, 1)
            if self.prefill:
                keys = self.write_positions.unsqueeze(1).unsqueeze(2)  # the new tokens are the keys
                mask = (keys <= queries) & (keys > queries - window)
            else:
                keys = torch.arange(self.kv_length, device=queries.device).view(1, 1, 1, -1)
                mask = self.mask & (keys > queries - window)
            self.window_masks[window] = mask
        return mask


@dataclass
class MixedStep:
    """One forward pass that decodes and prefills together: a flat run of tokens in a batch of one, the first
    `decode` of them one token for each of slots 0..decode-1, then prompt chunks, each a slot's next tokens.

    The weights are read once for all of them (a step's cost at decode batch sizes); attention is computed per
    kind: the decode tokens batched over their rows' caches as in a decode step, each chunk over its own row up to
    its last token. That needs no varlen kernel: a chunk's hundreds of queries read one cache row, not one each.

    write_rows, write_positions: (tokens,) the cache row and position of each token's keys and values.
    decode_mask: (decode, 1, 1, decode_kv_length) bool, True where a decode token may attend.
    chunks: (slot, width, kv_length, mask (1, 1, width, kv_length)) of each chunk, in the order of the tokens.
    """

    cache: SlotCache
    write_rows: object
    write_positions: object
    decode: int
    decode_kv_length: int
    decode_mask: object | None
    chunks: list
    window_masks: dict = field(default_factory=dict)

    def masks_within(self, window: int | None) -> list:
        """The decode mask (or None), then each chunk's, narrowed to keys less than `window` positions before each
        query when the layer has a sliding window (transformers' `kv_idx > q_idx - sliding_window`, as
        SlotStep.mask_within)."""
        if not window:
            return [self.decode_mask, *(chunk[3] for chunk in self.chunks)]
        masks = self.window_masks.get(window)
        if masks is None:
            import torch

            def narrowed(mask, queries):  # queries: each query's position, shaped to broadcast over mask's keys
                keys = torch.arange(mask.shape[-1], device=mask.device).view(1, 1, 1, -1)
                return mask & (keys > queries - window)

            count = self.decode
            masks = [None if self.decode_mask is None else
                     narrowed(self.decode_mask, self.write_positions[:count].view(count, 1, 1, 1))]
            start = count
            for _, width, _, mask in self.chunks:
                masks.append(narrowed(mask, self.write_positions[start: start + width].view(1, 1, width, 1)))
                start += width
            self.window_masks[window] = masks
        return masks


@dataclass
class ProbeStep:
    """Records each layer's key shape and dtype, so the cache can be sized for any architecture."""

    shapes: dict


@contextmanager
def active_step(step: SlotStep | MixedStep | ProbeStep):
    global _active
    previous, _active = _active, step
    try:
        yield step
    finally:
        _active = previous


def register() -> str:
    """Make `attn_implementation="bunshin_slots"` known to transformers; returns the name."""
    return register_attention(NAME, _slot_attention)


def _slot_attention():
    """The function transformers calls in each attention layer (built at registration: it imports torch)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, slot_step=None, **kwargs):
        step = slot_step if slot_step is not None else _active
        if step is None or isinstance(step, ProbeStep):
            if step is not None:
                _record_shape(step, module, key, kwargs)
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        layer = module.layer_idx
        window = kwargs.get("sliding_window")
        cache_k, cache_v = step.cache.keys[layer], step.cache.values[layer]
        if isinstance(step, MixedStep):
            return _mixed_attention(torch, step, query, key, value, cache_k, cache_v, scaling, window)
        # (batch, heads, tokens, dim) -> (batch, tokens, heads, dim): the layout of cache[row, :, position].
        cache_k[step.row_index, :, step.write_positions] = key.transpose(1, 2).to(cache_k.dtype)
        cache_v[step.row_index, :, step.write_positions] = value.transpose(1, 2).to(cache_v.dtype)
        gqa = {"enable_gqa": True} if key.shape[1] != query.shape[1] else {}
        if step.prefill:
            if window and query.shape[2] > window:  # the window cuts into the prompt: an explicit mask
                out = torch.nn.functional.scaled_dot_product_attention(
                    query, key, value, attn_mask=step.mask_within(window), scale=scaling, **gqa)
            else:
                out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, **gqa)
            return out.transpose(1, 2).contiguous(), None
        if step.gather:
            rows = step.row_index.view(-1)
            k, v = cache_k[rows, :, : step.kv_length], cache_v[rows, :, : step.kv_length]
        else:
            k = cache_k[: query.shape[0], :, : step.kv_length]
            v = cache_v[: query.shape[0], :, : step.kv_length]
        mask = step.mask_within(window) if window else step.mask
        out = torch.nn.functional.scaled_dot_product_attention(
            query, k.to(query.dtype), v.to(query.dtype), attn_mask=mask, scale=scaling, **gqa
        )
        return out.transpose(1, 2).contiguous(), None

    return attention


def _mixed_attention(torch, step: MixedStep, query, key, value, cache_k, cache_v, scaling, window):
    """A MixedStep's attention: query, key, value are (1, heads, tokens, dim); returns (1, tokens, heads, dim)."""
    # (1, heads, tokens, dim) -> (tokens, heads, dim): the layout of cache[row, :, position].
    cache_k[step.write_rows, :, step.write_positions] = key[0].transpose(0, 1).to(cache_k.dtype)
    cache_v[step.write_rows, :, step.write_positions] = value[0].transpose(0, 1).to(cache_v.dtype)
    gqa = {"enable_gqa": True} if key.shape[1] != query.shape[1] else {}
    masks = step.masks_within(window)
    parts = []
    count = step.decode
    if count:
        queries = query[0, :, :count].transpose(0, 1).unsqueeze(2)  # (rows, heads, 1, dim)
        k = cache_k[:count, :, : step.decode_kv_length].to(query.dtype)
        v = cache_v[:count, :, : step.decode_kv_length].to(query.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(queries, k, v, attn_mask=masks[0], scale=scaling, **gqa)
        parts.append(out[:, :, 0])  # (rows, heads, dim)
    start = count
    for (slot, width, kv_length, _), mask in zip(step.chunks, masks[1:], strict=True):
        queries = query[:, :, start: start + width]  # (1, heads, width, dim)
        k = cache_k[slot: slot + 1, :, :kv_length].to(query.dtype)
        v = cache_v[slot: slot + 1, :, :kv_length].to(query.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(queries, k, v, attn_mask=mask, scale=scaling, **gqa)
        parts.append(out[0].transpose(0, 1))  # (width, heads, dim)
        start += width
    return torch.cat(parts).unsqueeze(0), None


class UnsupportedModel(Exception):
    """The architecture does something the slot cache cannot represent (shared KV, soft-capped or
    bidirectional attention)."""


def _record_shape(step: ProbeStep, module, key, kwargs) -> None:
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise UnsupportedModel(f"{type(module).__name__} has no layer_idx")
    if kwargs.get("softcap") is not None:  # Gemma 2: tanh on the scores, which SDPA cannot do
        raise UnsupportedModel(f"layer {layer} soft-caps its attention scores")
    if getattr(module, "is_causal", True) is False:
        raise UnsupportedModel(f"layer {layer} attends in both directions")
    if layer in step.shapes:
        raise UnsupportedModel(f"layer index {layer} is used by two attention modules (shared KV)")
    step.shapes[layer] = (key.shape[1], key.shape[3], key.dtype)


def allocate_cache(shapes: dict, slots: int, length: int, device) -> SlotCache:
    """Zeroed keys and values for every probed layer."""
    import torch

    layers = sorted(shapes)
    if layers != list(range(len(layers))):
        raise UnsupportedModel(f"attention layers are numbered {layers[:5]}..., not 0..{len(layers) - 1}")
    keys, values = [], []
    for layer in layers:
        heads, dim, dtype = shapes[layer]
        keys.append(torch.zeros((slots, heads, length, dim), dtype=dtype, device=device))
        values.append(torch.zeros((slots, heads, length, dim), dtype=dtype, device=device))
    return SlotCache(keys, values)
