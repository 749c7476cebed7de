"""The model runner: the model's forward passes over a static per-chat KV cache, and the CUDA graphs that replay them.

The engine (slot_engine.py) decides what each step does and chooses the tokens; this owns everything the GPU
holds for it: one preallocated cache row per chat ("slot", slot_attention.py) so rows at different positions run
together; the static input buffers; CUDA graphs captured at start-up for each (batch, cache-length) bucket, so a
decode step is one graph replay instead of hundreds of kernel launches (and, with `compile`, the step compiled
to fuse its ~30 small kernels per layer); and the three kinds of forward pass:

- prefill: whole prompts written into fresh slots (logits after each prompt's last token);
- extend: a prompt whose start the slot's cache already holds (a chat's next message): only its new tokens;
- decode: one token for every slot in rows 0..batch-1.

Any causal LM whose attention goes through transformers' attention interface works; `UnsupportedModel` says why
one does not (the engine's owner then falls back to plain `generate()`).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from functools import partial

from . import slot_attention
from .slot_attention import MixedStep, ProbeStep, SlotStep, UnsupportedModel, active_step, allocate_cache

log = logging.getLogger(__name__)

_MIN_LENGTH_BUCKET = 64
# Of the GPU memory free once the model is loaded, what the KV cache may take; the rest is for the
# activations of the largest prefill, the CUDA graphs' memory pool and the allocator's slack.
CACHE_SHARE_OF_FREE = 0.6
MAX_PREFILL_ROWS = 8  # prompts prefilled in one forward pass (more wait for the next step)
# New tokens of a prompt that extends a slot's cached prefix (a follow-up message: the reply and a new
# turn), in captured buckets; a longer extension is computed without a graph.
_EXTEND_BUCKETS = (32, 64, 256)
# An extension reads its rows' caches up to a bucket of their length (it gathers the rows it works on:
# reading every row to the full context cost a follow-up as much as a fresh prefill on an H200).
_MIN_EXTEND_READ = 256


class ModelRunner:
    def __init__(self, model, pad_id: int, *, slots: int, length: int, cuda_graphs: bool = True,
                 compile: bool = False) -> None:
        import torch

        if slots < 1 or length < 2:
            raise ValueError("the slot engine needs at least one slot and two positions")
        self.model = model
        self.pad_id = pad_id
        self.device = next(p for p in model.parameters()).device
        self._torch = torch
        model.eval()
        self._previous_attention = _use_slot_attention(model)

        try:
            shapes, vocab = self._probe()
            slots, self.cache_report = _size_cache(torch, self.device, shapes, slots, length)
        except UnsupportedModel:
            if self._previous_attention:  # plain generate() takes over: it needs the model as it was
                model.set_attn_implementation(self._previous_attention)
            raise
        # One row more than the slots: the scratch row, where a prefill graph's padding rows write.
        self.cache = allocate_cache(shapes, slots + 1, length, self.device)
        self._scratch = slots
        self.vocab = vocab
        self.batch_buckets = _buckets(1, slots)
        self.prefill_buckets = _buckets(1, min(slots, MAX_PREFILL_ROWS))
        self.length_buckets = _buckets(min(_MIN_LENGTH_BUCKET, length), length)
        # Prefill is compute-bound: padding a 200-token prompt to 256 would cost 28% more, so its
        # lengths come in even steps (at most 16 of them) rather than powers of two.
        stride = max(_MIN_LENGTH_BUCKET, -(-length // 16))
        self.prompt_buckets = sorted({*range(stride, length, stride), length})
        dev = self.device
        self._ids = torch.zeros((slots, 1), dtype=torch.long, device=dev)
        self._pos = torch.zeros((slots,), dtype=torch.long, device=dev)
        pin = dev.type == "cuda"
        self._ids_host = torch.zeros((slots, 1), dtype=torch.long, pin_memory=pin)
        self._pos_host = torch.zeros((slots,), dtype=torch.long, pin_memory=pin)
        # numpy views of the pinned buffers: setting an element costs ~0.1 us there, ~3 us on a tensor.
        self._ids_np, self._pos_np = self._ids_host.numpy(), self._pos_host.numpy()
        self._positions = torch.arange(length, device=dev)
        self.row_index = torch.arange(slots, device=dev).view(slots, 1)
        prefill_rows = self.prefill_buckets[-1]
        self._p_ids = torch.zeros((prefill_rows, length), dtype=torch.long, device=dev)
        self._p_rows = torch.zeros((prefill_rows,), dtype=torch.long, device=dev)
        self._p_last = torch.zeros((prefill_rows,), dtype=torch.long, device=dev)
        self._p_host = torch.zeros((3, prefill_rows, length), dtype=torch.long, pin_memory=pin)
        self._causal = torch.ones((length, length), dtype=torch.bool, device=dev).tril().view(1, 1, length, length)
        self.extend_buckets = [b for b in _EXTEND_BUCKETS if b < length] or [max(1, length - 1)]
        self.extend_read_buckets = [b for b in self.length_buckets if b >= min(_MIN_EXTEND_READ, length)]
        longest_extension = self.extend_buckets[-1]
        self._e_ids = torch.zeros((prefill_rows, longest_extension), dtype=torch.long, device=dev)
        self._e_pos = torch.zeros((prefill_rows, longest_extension), dtype=torch.long, device=dev)
        self._e_host = torch.zeros((3, prefill_rows, longest_extension), dtype=torch.long, pin_memory=pin)
        self._graphs: dict[tuple[int, int], tuple] = {}  # (rows, cache length) -> decode graph, its logits
        self._prefill_graphs: dict[tuple[int, int], tuple] = {}  # (rows, prompt length) -> graph, logits
        self._extend_graphs: dict[tuple[int, int, int], tuple] = {}  # (rows, new tokens, cache read) -> graph, logits
        self._decode_fn = self._decode_forward
        if compile and dev.type == "cuda":
            # Fuses the ~30 small kernels per layer (norms, rotary, residuals) that cost a batch-1
            # step as much time as reading the weights. Compiled lazily, at the first graph's warm-up.
            self._decode_fn = torch.compile(self._decode_forward, dynamic=True)
        if cuda_graphs and dev.type == "cuda":
            started = time.monotonic()
            try:
                self._capture_graphs()
            except Exception as exc:  # e.g. a quantization kernel that syncs with the CPU: decode eagerly
                self._graphs.clear()
                self._prefill_graphs.clear()
                self._extend_graphs.clear()
                torch.cuda.synchronize()
                log.warning("slot engine: CUDA graphs cannot be captured for this model (%s: %s); decoding without them",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            else:
                log.info("slot engine: captured %d CUDA graphs in %.1fs", self.graph_count, time.monotonic() - started)

    @property
    def slots(self) -> int:
        return self._scratch  # the cache's rows past the scratch row

    @property
    def length(self) -> int:
        return self.cache.length

    @property
    def max_extension(self) -> int:
        """The most new tokens an extension computes; a prompt needing more is prefilled afresh."""
        return self.extend_buckets[-1]

    @property
    def graph_count(self) -> int:
        return len(self._graphs) + len(self._prefill_graphs) + len(self._extend_graphs)

    def describe_cache(self) -> str:
        r = self.cache_report
        text = f"{self.slots} chats x {self.length} tokens, {self.cache.nbytes / 1e9:.2f} GB of cache"
        if r.get("free_gb") is not None:
            text += f" ({r['per_slot_gb']:.2f} GB a chat; {r['free_gb']:.1f} GB were free"
            text += ", fewer chats than asked for fit)" if r["limited_by"] == "memory" else ")"
        return text

    def detach(self) -> None:
        """Give the model back its own attention (when plain generate() takes over from this engine)."""
        if self._previous_attention:
            self.model.set_attn_implementation(self._previous_attention)
        self._graphs.clear()
        self._prefill_graphs.clear()
        self._extend_graphs.clear()

    # -- forward passes ----------------------------------------------------------------------

    def prefill(self, prompts: list[list[int]], slots: list[int]):
        """Write the prompts into their slots' cache rows; the float32 logits after each prompt."""
        graphed = bool(self._prefill_graphs)
        longest = max(len(p) for p in prompts)
        # With graphs, the batch and the length are padded up to a captured bucket; padding rows
        # write into the scratch row, padding tokens beyond each prompt (decoding overwrites them
        # before the mask ever lets a query see them).
        count = _bucket(len(prompts), self.prefill_buckets) if graphed else len(prompts)
        length = _bucket(longest, self.prompt_buckets) if graphed else longest
        host = self._p_host[:, :count]
        ids_np, rows_np, last_np = host[0].numpy(), host[1, :, 0].numpy(), host[2, :, 0].numpy()
        ids_np[:, :length] = self.pad_id
        rows_np[:] = self._scratch
        last_np[:] = 0
        for i, (prompt, slot) in enumerate(zip(prompts, slots, strict=True)):
            ids_np[i, : len(prompt)] = prompt
            rows_np[i] = slot
            last_np[i] = len(prompt) - 1
        self._p_ids[:count, :length].copy_(host[0, :, :length], non_blocking=True)
        self._p_rows[:count].copy_(host[1, :, 0], non_blocking=True)
        self._p_last[:count].copy_(host[2, :, 0], non_blocking=True)
        graph = self._prefill_graphs.get((count, length))
        if graph is not None:
            graph[0].replay()
            logits = graph[1]
        else:
            logits = self._forward_prefill(count, length)
        return logits[: len(prompts)].float()

    def extend(self, prompts: list[list[int]], placements: list):
        """Write the prompts' tokens past each slot's cached prefix into their slots, attending to that
        prefix; the float32 logits after each prompt. The follow-up message of a chat costs its new tokens."""
        new = [len(prompt) - p.reused for prompt, p in zip(prompts, placements, strict=True)]
        graphed = bool(self._extend_graphs) and max(new) <= self.extend_buckets[-1]
        count = _bucket(len(prompts), self.prefill_buckets) if graphed else len(prompts)
        width = _bucket(max(new), self.extend_buckets) if graphed else max(new)
        longest = max(len(p) for p in prompts)
        kv_length = _bucket(longest, self.extend_read_buckets if graphed else self.length_buckets)
        host = self._e_host[:, :count, :width] if graphed else self._torch.zeros((3, count, width), dtype=self._torch.long)
        ids_np, pos_np, rows_np = host[0].numpy(), host[1].numpy(), host[2, :, 0].numpy()
        ids_np[:] = self.pad_id
        pos_np[:] = range(width)  # padding rows write into the scratch row
        rows_np[:] = self._scratch
        last = [0] * count
        for i, (prompt, placement) in enumerate(zip(prompts, placements, strict=True)):
            start, end = placement.reused, len(prompt)
            ids_np[i, : end - start] = prompt[start:end]
            pos_np[i] += start
            rows_np[i] = placement.slot
            last[i] = end - start - 1
        # Padding past the prompt writes where decoding will overwrite before any query sees it.
        pos_np.clip(None, self.length - 1, out=pos_np)
        if graphed:
            self._e_ids[:count, :width].copy_(host[0], non_blocking=True)
            self._e_pos[:count, :width].copy_(host[1], non_blocking=True)
            self._p_rows[:count].copy_(host[2, :, 0], non_blocking=True)
            self._p_last[:count].copy_(self._torch.tensor(last), non_blocking=True)
            graph = self._extend_graphs[(count, width, kv_length)]
            graph[0].replay()
            return graph[1][: len(prompts)].float()
        dev = self.device
        out = self._forward_extend_from(host[0].to(dev), host[1].to(dev), host[2, :, 0].to(dev),
                                        self._torch.tensor(last, device=dev), kv_length)
        return out[: len(prompts)].float()

    def _forward_extend(self, count: int, width: int, kv_length: int):
        """The body of each extension graph: `width` new tokens for `count` rows from the static buffers."""
        return self._forward_extend_from(self._e_ids[:count, :width], self._e_pos[:count, :width], self._p_rows[:count],
                                         self._p_last[:count], kv_length)

    def _forward_extend_from(self, ids, positions, slots, last, kv_length: int):
        count, width = ids.shape
        # Each new token sees its row's cache up to its own position: the cached prefix and the new tokens before it.
        mask = self._positions[:kv_length].view(1, 1, 1, kv_length) <= positions.view(count, 1, width, 1)
        step = SlotStep(self.cache, slots.view(count, 1), positions, kv_length, mask, gather=True)
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False, slot_step=step,
                         logits_to_keep=last)
        arange = self.row_index[:count, 0]
        return out.logits[arange, arange]

    def _forward_prefill(self, count: int, length: int):
        """Prompts of `length` tokens for `count` rows from the static buffers; logits at each row's
        last prompt token. The body of each prefill CUDA graph."""
        ids, slots, last = self._p_ids[:count, :length], self._p_rows[:count], self._p_last[:count]
        positions = self._positions[:length].expand(count, length)
        mask = self._causal[:, :, :length, :length]  # transformers takes a 4D mask as given
        step = SlotStep(self.cache, slots.view(count, 1), positions, prefill=True)
        # logits_to_keep as indices: only each row's last prompt position reaches the LM head.
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False,
                         logits_to_keep=last, slot_step=step)
        arange = self.row_index[:count, 0]
        return out.logits[arange, arange]  # row i's logits at its own last prompt token

    def decode(self, feed: dict[int, tuple[int, int]]):
        """Feed each slot its token at its position (`feed`: slot -> (token, position)); (batch rows computed:
        0..batch-1, their float32 logits)."""
        batch = _bucket(max(feed) + 1, self.batch_buckets)
        kv_length = _bucket(max(position for _, position in feed.values()) + 1, self.length_buckets)
        ids_np, pos_np = self._ids_np, self._pos_np
        ids_np[:batch] = self.pad_id
        # Free slots in the batch write garbage at their row's last position, which no kept prefix covers.
        pos_np[:batch] = self.length - 1
        for slot, (token, position) in feed.items():
            ids_np[slot, 0] = token
            pos_np[slot] = position
        self._ids[:batch].copy_(self._ids_host[:batch], non_blocking=True)
        self._pos[:batch].copy_(self._pos_host[:batch], non_blocking=True)
        graph = self._graphs.get((batch, kv_length))
        if graph is not None:
            graph[0].replay()
            return batch, graph[1].float()
        return batch, self._forward_decode(batch, kv_length).float()

    def mixed(self, feed: dict[int, tuple[int, int]], chunks: list[tuple[int, list[int], int]]):
        """One forward pass that decodes and prefills: a token for every slot in rows 0..batch-1 as `decode` feeds
        them, and each chunk's tokens (slot, ids, the position of its first) written after what its slot holds.
        Returns (batch, the decode rows' float32 logits, each chunk's float32 logits after its last token).

        Eager, not a graph: its shape (rows, chunk widths, cache lengths) varies too much to capture, and a chunk's
        matrix products keep the GPU busy while the next kernels are queued."""
        torch = self._torch
        batch = _bucket(max(feed) + 1, self.batch_buckets) if feed else 0
        ids, rows, positions = [self.pad_id] * batch, list(range(batch)), [self.length - 1] * batch
        for slot, (token, position) in feed.items():
            ids[slot], positions[slot] = token, position
        keep = list(range(batch))
        for slot, chunk_ids, start in chunks:
            ids += chunk_ids
            rows += [slot] * len(chunk_ids)
            positions += range(start, start + len(chunk_ids))
            keep.append(len(ids) - 1)
        dev = self.device
        host = torch.tensor([ids, rows, positions], dtype=torch.long, pin_memory=dev.type == "cuda")
        on_device = host.to(dev, non_blocking=True)
        ids_t, rows_t, positions_t = on_device[0], on_device[1], on_device[2]
        # Cache lengths in buckets, as decode's: fewer distinct attention shapes (the masks cut at each position).
        decode_kv = _bucket(max(position for _, position in feed.values()) + 1, self.length_buckets) if feed else 0
        decode_mask = None
        if batch:
            decode_mask = self._positions[:decode_kv].view(1, 1, 1, decode_kv) <= positions_t[:batch].view(batch, 1, 1, 1)
        described, offset = [], batch
        for slot, chunk_ids, start in chunks:
            width, kv_length = len(chunk_ids), _bucket(start + len(chunk_ids), self.length_buckets)
            query_positions = positions_t[offset: offset + width].view(1, 1, width, 1)
            mask = self._positions[:kv_length].view(1, 1, 1, kv_length) <= query_positions
            described.append((slot, width, kv_length, mask))
            offset += width
        step = MixedStep(self.cache, rows_t, positions_t, batch, decode_kv, decode_mask, described)
        # A 4D mask is taken as given (transformers builds none); the attention reads the step's masks instead.
        with self._mixed_attention_kernels():
            out = self.model(input_ids=ids_t.view(1, -1), position_ids=positions_t.view(1, -1), use_cache=False,
                             attention_mask=self._causal[:, :, :1, :1], slot_step=step,
                             logits_to_keep=torch.tensor(keep, device=dev))
        logits = out.logits[0].float()
        return batch, logits[:batch], logits[batch:]

    def _mixed_attention_kernels(self):
        """On CUDA, SDPA without its cuDNN backend: cuDNN builds a plan for each new shape, and a mixed step's chunk
        widths change from step to step (the memory-efficient kernel takes the masks without planning)."""
        if self.device.type != "cuda":
            return nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def _forward_decode(self, batch: int, kv_length: int):
        """One token for rows 0..batch-1 from the static buffers: the body of each CUDA graph."""
        return self._decode_fn(self._ids[:batch], self._pos[:batch], self.row_index[:batch], self._positions[:kv_length])

    def _decode_forward(self, ids, pos, row_index, key_positions):
        """Sizes come from the tensors' shapes, so that one torch.compile (dynamic shapes) serves
        every bucket; the step travels in the model's kwargs, which reach the attention function."""
        batch, kv_length = ids.shape[0], key_positions.shape[0]
        mask = key_positions.view(1, 1, 1, kv_length) <= pos.view(batch, 1, 1, 1)
        step = SlotStep(self.cache, row_index, pos.view(batch, 1), kv_length, mask)
        out = self.model(input_ids=ids, position_ids=pos.view(batch, 1), attention_mask=mask, use_cache=False,
                         slot_step=step)
        return out.logits[:, -1, :]

    # -- start-up ---------------------------------------------------------------------------

    def _probe(self):
        """Each attention layer's key shape, and the vocabulary size, from a one-token forward."""
        torch = self._torch
        probe = ProbeStep({})
        ids = torch.tensor([[self.pad_id]], device=self.device)
        with torch.inference_mode(), active_step(probe):
            out = self.model(input_ids=ids, use_cache=False)
        if not probe.shapes:
            raise UnsupportedModel("no attention layer went through transformers' attention interface")
        return probe.shapes, out.logits.shape[-1]

    def _capture_graphs(self) -> None:
        torch = self._torch
        pool = torch.cuda.graph_pool_handle()
        for batch in self.batch_buckets:
            for kv_length in self.length_buckets:
                self._graphs[(batch, kv_length)] = self._capture(pool, partial(self._forward_decode, batch, kv_length))
        self._p_rows.fill_(self._scratch)  # capture runs write only into the scratch row
        for count in self.prefill_buckets:
            for length in self.prompt_buckets:
                self._prefill_graphs[(count, length)] = self._capture(pool, partial(self._forward_prefill, count, length))
            for width in self.extend_buckets:
                for kv_length in self.extend_read_buckets:
                    self._extend_graphs[(count, width, kv_length)] = self._capture(
                        pool, partial(self._forward_extend, count, width, kv_length))
        torch.cuda.synchronize()

    def _capture(self, pool, forward):
        torch = self._torch
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                forward()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                output = forward()
        return graph, output

    def self_check(self, prompt: list[int], steps: int = 3) -> float:
        """Largest relative logit difference between these forward passes and a plain forward pass of the
        whole sequence, after the prompt and after each of `steps` greedy tokens. Uses slot 0, which must be idle."""
        torch = self._torch
        tokens: list[int] = []
        worst = 0.0
        with torch.inference_mode():
            logits = self.prefill([list(prompt)], [0])[0]
            for _ in range(steps + 1):
                sequence = torch.tensor([list(prompt) + tokens], device=self.device)
                reference = self.model(input_ids=sequence, use_cache=False).logits[0, -1].float()
                worst = max(worst, _relative_difference(logits, reference))
                tokens.append(int(reference.argmax()))
                _, logits = self.decode({0: (tokens[-1], len(prompt) + len(tokens) - 1)})
                logits = logits[0]
        return worst


def _size_cache(torch, device, shapes: dict, slots: int, length: int) -> tuple[int, dict]:
    """How many chats' cache rows fit: `slots` asked for, fewer if the GPU's free memory says so."""
    per_slot = sum(2 * heads * dim * length * torch.empty((), dtype=dtype).element_size()
                   for heads, dim, dtype in shapes.values())
    report = {"asked": slots, "positions": length, "per_slot_gb": round(per_slot / 1e9, 4), "free_gb": None,
              "limited_by": "asked"}
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        affordable = int(free * CACHE_SHARE_OF_FREE // per_slot) - 1  # one row is the scratch row
        report["free_gb"] = round(free / 1e9, 2)
        if affordable < 1:
            raise UnsupportedModel(f"{free / 1e9:.1f} GB of GPU memory are free, too little for one chat's cache of "
                                   f"{length} tokens ({per_slot / 1e9:.2f} GB)")
        if affordable < slots:
            slots, report["limited_by"] = affordable, "memory"
    report["slots"] = slots
    return slots, report


def _use_slot_attention(model) -> str | None:
    """Switch the model to the slot attention; returns the implementation it had."""
    name = slot_attention.register()
    previous = getattr(model.config, "_attn_implementation", None)
    try:
        model.set_attn_implementation(name)
    except (AttributeError, ValueError, TypeError) as exc:
        raise UnsupportedModel(f"cannot switch the model to {name} attention: {exc}") from None
    return previous


def _relative_difference(a, b) -> float:
    scale = float(b.abs().max()) or 1.0
    return float((a - b).abs().max()) / scale


def _buckets(smallest: int, largest: int) -> list[int]:
    sizes, size = [], smallest
    while size < largest:
        sizes.append(size)
        size *= 2
    sizes.append(largest)
    return sizes


def _bucket(n: int, sizes: list[int]) -> int:
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")
