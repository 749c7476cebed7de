"""Benchmark: reply generation on a GPU, plain `generate()` against the worker's slot engine.

A model with rinna/japanese-gpt-neox-3.6b's shape (random weights: the same speed as the real
one) gets a LoRA adapter saved as `finetune train` saves it (peft folder + bunshin.json), and is
loaded through the bot's own loader: unmerged, merged, 8-bit and 4-bit. In one run:

- single stream: a 200-token context, 128 new tokens, greedy: plain generate() with the adapter
  unmerged and merged, and the slot engine (CUDA graphs) on the merged model;
- 8 and 32 concurrent chats through the real Worker (asyncio queue, stepping thread): each chat
  sends a ~200-token conversation, waits for its 40-token reply, pauses a random 0-20 ms and
  sends again; the chats start 0-1 s apart. Aggregate tokens/s and p50/p95 time from a message's
  arrival to its finished reply, for the slot engine and for plain batched generate();
- greedy equality on the GPU: the engine's tokens against generate()'s for the same prompts;
- peak GPU memory of each configuration, and the memory-bandwidth limit for one stream
  (weight bytes / measured copy bandwidth).

Goals (issue 7): single stream >= 250 tokens/s on an H100; >= 5,000 tokens/s aggregate with 32
chats; p95 < 1.5 s for a 40-token reply with 32 chats.

    python bench/generation_speed.py --out bench/results/generation_h100.json            # bf16 runs
    python bench/generation_speed.py --out ... --runs 8bit,4bit                         # small-GPU runs
    python bench/generation_speed.py --shape tiny --runs bf16 --seconds 3 --out /tmp/x.json   # CPU smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from rinna_shape import RINNA_3_6B, TINY, build_model  # noqa: E402
from train_throughput import device_info  # noqa: E402

GOALS = {"single_stream_tokens_per_s": 250, "aggregate_tokens_per_s_32_chats": 5000, "p95_s_32_chats": 1.5}
CONTEXT_TOKENS = 200
SINGLE_NEW_TOKENS = 128
CHAT_NEW_TOKENS = 40
THINK_S = 0.02  # a chat's next message comes 0-20 ms after its reply: 32 chats keep ~32 requests going


def make_adapter(base_dir: Path, out: Path, max_length: int) -> Path:
    """A LoRA adapter as `finetune train` writes it (r=16, alpha=32, its default targets), with
    small random B matrices so that merging really changes the weights."""
    import torch
    from peft import LoraConfig, get_peft_model

    from finetune.manifest import AdapterManifest
    from finetune.model_loading import base_shape, load_base_model, lora_target_modules

    loaded = load_base_model(str(base_dir))
    model = get_peft_model(loaded.model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                    target_modules=lora_target_modules(loaded.model), init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.01)
    model.save_pretrained(out)
    AdapterManifest(base_model=str(base_dir), base_revision=None, base_shape=base_shape(loaded.model),
                    tokenizer_fingerprint=loaded.tokenizer.fingerprint, tokenizer_backend=loaded.tokenizer.backend,
                    newline=loaded.tokenizer.newline, template="transcript", persona="美咲", max_length=max_length,
                    speakers=["美咲", "健太"]).write(out / "bunshin.json")
    del model, loaded
    _free()
    return out


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gb() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else None


def context_turns(rng: random.Random, tokenizer, tokens: int):
    """A conversation whose prompt is about `tokens` long, from the tiny corpus' sentences."""
    from finetune.prompt import ChatTurn, encode_prompt
    from finetune.tiny_model import DEFAULT_CORPUS

    turns: list[ChatTurn] = []
    while len(encode_prompt(tokenizer, turns, "美咲", "transcript")) < tokens:
        speaker = "美咲" if len(turns) % 2 else "健太"
        turns.append(ChatTurn(speaker, rng.choice(DEFAULT_CORPUS)))
    return turns


def plain_single_stream(model, tokenizer, prompt: list[int]) -> dict:
    import torch

    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    kwargs = dict(do_sample=False, pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id)
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=8, **kwargs)  # warm-up
        _sync()
        started = time.perf_counter()
        out = model.generate(input_ids=ids, max_new_tokens=SINGLE_NEW_TOKENS, min_new_tokens=SINGLE_NEW_TOKENS, **kwargs)
        _sync()
    elapsed = time.perf_counter() - started
    new = out.shape[1] - len(prompt)
    return {"new_tokens": new, "seconds": round(elapsed, 3), "tokens_per_s": round(new / elapsed, 1)}


def engine_single_stream(engine, prompt: list[int]) -> dict:
    """One chat alone in the engine: prefill + decode until 128 tokens (EOS never ends it here)."""
    for warm in range(2):
        engine.add(f"warm{warm}", prompt)
        while engine.busy:
            engine.step()
    _sync()
    started = time.perf_counter()
    engine.add("timed", prompt)
    tokens = 0
    while engine.busy:
        for finished in engine.step():
            tokens = finished.tokens
    _sync()
    elapsed = time.perf_counter() - started
    return {"new_tokens": tokens, "seconds": round(elapsed, 3), "tokens_per_s": round(tokens / elapsed, 1)}


async def chats_over_time(backend, chats: int, seconds: float, seed: int) -> dict:
    """`chats` concurrent conversations through the real Worker for `seconds`."""
    from bot.metrics import BotMetrics
    from bot.worker import Worker

    worker = Worker(backend, BotMetrics(), max_queue=4 * chats, max_batch=chats, batch_wait_s=0.002)
    await worker.start()
    rng = random.Random(seed)
    conversations = [context_turns(rng, backend.loaded.tokenizer, CONTEXT_TOKENS) for _ in range(chats)]
    latencies: list[float] = []
    tokens = [0]
    start = time.monotonic()
    end = start + seconds

    async def chat(i: int) -> None:
        await asyncio.sleep(rng.uniform(0, 1.0))
        while time.monotonic() < end:
            sent = time.monotonic()
            reply = await worker.submit(conversations[i], deadline=sent + 120, received=sent)
            done = time.monotonic()
            if done <= end:
                latencies.append(done - sent)
                tokens[0] += reply.tokens
            await asyncio.sleep(rng.uniform(0, THINK_S))

    await asyncio.gather(*(chat(i) for i in range(chats)))
    wall = time.monotonic() - start
    await worker.stop(30)
    latencies.sort()
    return {
        "chats": chats,
        "seconds": round(wall, 1),
        "replies": len(latencies),
        "tokens": tokens[0],
        "mean_tokens_per_reply": round(tokens[0] / max(1, len(latencies)), 1),
        "aggregate_tokens_per_s": round(tokens[0] / min(wall, seconds), 1),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3) if latencies else None,
        "max_s": round(latencies[-1], 3) if latencies else None,
    }


def greedy_agreement(model, tokenizer, engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """How many of the engine's greedy tokens equal generate()'s, prompt by prompt (bf16 rounding
    can make a near-tie go the other way; the first differing position is reported)."""
    import torch

    results = []
    recorded: dict = {}
    saved = engine.settings
    engine.settings = dataclasses.replace(saved, temperature=0.0, repetition_penalty=1.0, max_new_tokens=new_tokens)
    try:
        for i, prompt in enumerate(prompts):
            engine.add(i, prompt)
        while engine.busy:
            for finished in engine.step():
                recorded[finished.key] = finished.ids
    finally:
        engine.settings = saved
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([prompt], device=next(model.parameters()).device),
                                 max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_id,
                                 eos_token_id=tokenizer.eos_id)
        plain = out[0, len(prompt):].tolist()
        if tokenizer.eos_id in plain:
            plain = plain[: plain.index(tokenizer.eos_id)]
        mine = recorded[i]
        same = next((k for k, (a, b) in enumerate(zip(mine, plain, strict=False)) if a != b), min(len(mine), len(plain)))
        results.append({"tokens": len(plain), "equal_prefix": same, "identical": mine == plain})
    return {"prompts": len(prompts), "identical": sum(r["identical"] for r in results), "per_prompt": results}


def copy_bandwidth_gbs() -> float | None:
    """Measured device-memory bandwidth: a 2 GB copy reads and writes 4 GB."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    _sync()
    started = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    _sync()
    elapsed = time.perf_counter() - started
    del a, b
    _free()
    return round(2 * 2 * 1024**3 * 10 / elapsed / 1e9, 1)


def run_configuration(name: str, adapter: Path, args) -> dict:
    """One way of loading the model: its single-stream and concurrent-chat figures."""
    from bot.worker import ModelBackend
    from finetune.model_loading import load_adapter

    quantize = {"bf16": "none", "bf16-compiled": "none", "8bit": "8bit", "4bit": "4bit"}[name]
    compiled = name.endswith("-compiled")
    result: dict = {"quantize": quantize, "compile": compiled}
    _free()
    rng = random.Random(0)
    if name == "bf16":
        unmerged = load_adapter(adapter, quantize="none")
        prompt = None
        from finetune.prompt import encode_prompt

        prompt = encode_prompt(unmerged.tokenizer, context_turns(rng, unmerged.tokenizer, CONTEXT_TOKENS), "美咲", "transcript")
        result["prompt_tokens"] = len(prompt)
        result["plain_generate_unmerged"] = plain_single_stream(unmerged.model, unmerged.tokenizer, prompt)
        del unmerged
        _free()
    loaded = load_adapter(adapter, quantize=quantize, merge=quantize == "none")
    result["adapter_merged"] = quantize == "none"
    result["weights_gb"] = round(sum(p.numel() * p.element_size() for p in loaded.model.parameters()) / 1e9, 2)
    from finetune.prompt import encode_prompt

    prompt = encode_prompt(loaded.tokenizer, context_turns(random.Random(0), loaded.tokenizer, CONTEXT_TOKENS), "美咲", "transcript")
    result["plain_generate"] = plain_single_stream(loaded.model, loaded.tokenizer, prompt)
    result["plain_generate"]["peak_gpu_gb"] = _peak_gb()

    chat_overrides = {"max_new_tokens": CHAT_NEW_TOKENS, "temperature": 0.0, "repetition_penalty": 1.0}
    if name == "bf16":
        # Plain generate() first, on a model the slot engine has not touched yet.
        for chats in (8, 32):
            backend = ModelBackend.from_loaded(loaded, generation_overrides=chat_overrides, engine="plain")
            _free()
            figures = asyncio.run(chats_over_time(backend, chats, args.seconds, seed=chats))
            figures["peak_gpu_gb"] = _peak_gb()
            result[f"plain_generate_{chats}_chats"] = figures
            print(name, "plain", chats, figures, flush=True)

    overrides = {"max_new_tokens": SINGLE_NEW_TOKENS, "temperature": 0.0, "repetition_penalty": 1.0}
    # No EOS in the timed runs: every reply is exactly as long as asked (a random model may say EOS).
    no_eos = dataclasses.replace(loaded, tokenizer=_WithoutEos(loaded.tokenizer))
    backend = ModelBackend.from_loaded(no_eos, generation_overrides=overrides, compile=compiled)
    started = time.monotonic()
    stepper = backend.make_stepper(32)
    result["engine_warmup_s"] = round(time.monotonic() - started, 1)
    engine = getattr(stepper, "engine", None)
    if engine is None:
        result["engine"] = "fell back to plain generate(): see the log"
        return result
    result["engine"] = {"slots": engine.slots, "cache_tokens": engine.length, "cache_gb": round(engine.cache.nbytes / 1e9, 2),
                        "cuda_graphs": engine.graph_count}
    result["engine_single_stream"] = engine_single_stream(engine, prompt)
    if name == "bf16":
        prompts = [encode_prompt(loaded.tokenizer, context_turns(random.Random(s), loaded.tokenizer, CONTEXT_TOKENS),
                                 "美咲", "transcript") for s in range(1, 5)]
        engine.tokenizer = loaded.tokenizer  # EOS counts again: compared with generate()'s stop
        result["greedy_equality"] = greedy_agreement(loaded.model, loaded.tokenizer, engine, prompts, 64)
        engine.tokenizer = no_eos.tokenizer
    del stepper, engine
    _free()

    for chats in (8, 32):
        backend = ModelBackend.from_loaded(no_eos, generation_overrides=chat_overrides, compile=compiled)
        _free()
        figures = asyncio.run(chats_over_time(backend, chats, args.seconds, seed=chats))
        figures["peak_gpu_gb"] = _peak_gb()
        result[f"engine_{chats}_chats"] = figures
        print(name, "slots", chats, figures, flush=True)
    del loaded, no_eos, backend
    _free()
    return result


class _WithoutEos:
    """The tokenizer with an end-of-text id no model produces, for fixed-length timed replies."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.eos_id = -1

    def __getattr__(self, name):
        return getattr(self._inner, name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--runs", default="bf16", help="comma-separated: bf16, bf16-compiled, 8bit, 4bit")
    p.add_argument("--shape", choices=("rinna", "tiny"), default="rinna")
    p.add_argument("--seconds", type=float, default=15.0, help="length of each concurrent-chat run")
    p.add_argument("--work", default=None)
    p.add_argument("--no-cudnn-attention", action="store_true",
                   help="turn off PyTorch's cuDNN SDPA backend (it plans anew for every new sequence length)")
    args = p.parse_args()
    if args.no_cudnn_attention:
        import torch

        torch.backends.cuda.enable_cudnn_sdp(False)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    work = Path(args.work or tempfile.mkdtemp(prefix="bunshin-gen-"))
    shape = RINNA_3_6B if args.shape == "rinna" else TINY
    started = time.monotonic()
    base = work / "base"
    if not (base / "config.json").exists():
        build_model(base, shape)
    adapter = work / "adapter"
    if not (adapter / "bunshin.json").exists():
        make_adapter(base, adapter, max_length=512)
    print(f"model and adapter ready in {time.monotonic() - started:.0f}s", flush=True)
    bandwidth = copy_bandwidth_gbs()
    result = {
        "benchmark": "generation_speed",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(),
        "model": f"GPT-NeoX, {args.shape} shape, random weights, LoRA r=16 adapter",
        "goals": GOALS,
        "chat_load": {"context_tokens": CONTEXT_TOKENS, "reply_tokens": CHAT_NEW_TOKENS, "pause_after_reply_s": [0, THINK_S],
                      "start_spread_s": 1.0},
        "measured_copy_bandwidth_gb_s": bandwidth,
        "configurations": {},
    }
    for name in [r.strip() for r in args.runs.split(",") if r.strip()]:
        figures = run_configuration(name, adapter, args)
        if bandwidth and "weights_gb" in figures:
            # One stream must read every weight once per token: the ceiling for single-stream decoding.
            figures["bandwidth_limit_tokens_per_s"] = round(bandwidth / figures["weights_gb"], 1)
        result["configurations"][name] = figures
        Path(args.out).write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(json.dumps({name: figures}, ensure_ascii=False, indent=1), flush=True)


if __name__ == "__main__":
    main()
