"""Benchmark: reply generation on a GPU, plain `generate()` against the worker's slot engine.

Random-weight models with real shapes (bench/rinna_shape.py: rinna/japanese-gpt-neox-3.6b, GPT-NeoX;
sbintuitions/sarashina2.2-3b, Llama with grouped-query attention) run as fast as the real ones. Each
gets a LoRA adapter saved as `finetune train` saves it (peft folder + bunshin.json), loaded through the
bot's own loader: unmerged, merged, 8-bit and 4-bit. For each shape (`--shape rinna,llama3b` measures
both in one call) and each configuration:

- one chat: a 200-token context, 128 new tokens, greedy: plain generate() (adapter unmerged and
  merged) and the slot engine (CUDA graphs) on the merged model;
- 8 and 32 chats whose conversations go on, through the real Worker (asyncio queue, stepping
  thread): each chat starts from a ~200-token conversation, waits for its 40-token reply, pauses a
  random 0-20 ms and sends the next message, whose turns are the previous ones + the persona's
  reply + a new friend turn (as the bot's memory builds them; the oldest turns drop once the prompt
  budget is full). The chats start 0-1 s apart. Tokens/s in all and per 1-s window (min/median/max:
  a collapse shows), p50/p95/max from a message's arrival to its finished reply, mean prompt tokens,
  and the prompt tokens the engine prefilled vs reused from a chat's earlier cache; the same load on
  plain batched generate();
- time to first token, the follow-up against the first message: a ~400-token first prompt, its
  40-token reply, then the follow-up prompt (+ reply turn + friend turn), each prefill timed alone,
  5 conversations; plain generate()'s prefill of the same prompts beside it;
- warm-up (engine build: CUDA graph capture, compilation for `-compiled`), the cache it reserved,
  greedy equality against generate(), peak GPU memory, and the bandwidth limit for one stream
  (weight bytes / measured copy bandwidth).

Goals (issue 14, H200, bf16): one chat >= 400 tokens/s; 32 chats >= 8,000 tokens/s in all with
p95 <= 0.35 s from arrival to finished 40-token reply; a follow-up's first token costs about the
prefill of its new tokens only; warm-up <= 60 s including compilation. `summary` puts each figure
beside its goal and plain generate()'s figure of the same run.

    python bench/generation_speed.py --shape rinna,llama3b --seconds 10 --out bench/results/generation_h200.json
    python bench/generation_speed.py --out ... --runs bf16-compiled,8bit,4bit        # other configurations
    python bench/generation_speed.py --shape tiny,llama-tiny --runs bf16 --seconds 3 --out /tmp/x.json   # CPU smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import itertools
import json
import logging
import random
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from rinna_shape import SHAPES, build_model, describe  # noqa: E402
from train_throughput import device_info  # noqa: E402

GOALS = {
    "single_stream_tokens_per_s": 400,
    "aggregate_tokens_per_s_32_chats": 8000,
    "p95_s_32_chats": 0.35,
    "followup_first_token": "about the prefill of the follow-up's new tokens only",
    "warmup_s": 60,
}
CONTEXT_TOKENS = 200
SINGLE_NEW_TOKENS = 128
CHAT_NEW_TOKENS = 40
THINK_S = 0.02  # a chat's next message comes 0-20 ms after its reply: 32 chats keep ~32 requests going
START_SPREAD_S = 1.0
FIRST_PROMPT_TOKENS = 400  # the time-to-first-token test's first message
TTFT_REPEATS = 5
PERSONA, FRIEND = "美咲", "健太"


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


def conversation(rng: random.Random, tokenizer, tokens: int):
    """A conversation of about `tokens` prompt tokens whose latest turn is the friend's (the message
    being answered)."""
    from finetune.prompt import ChatTurn
    from finetune.tiny_model import DEFAULT_CORPUS

    turns = context_turns(rng, tokenizer, tokens)
    if turns[-1].speaker == PERSONA:
        turns.append(ChatTurn(FRIEND, rng.choice(DEFAULT_CORPUS)))
    return turns


def next_message(rng: random.Random, turns, reply_text: str):
    """The chat's next message as the bot's memory builds it: the turns so far, the persona's reply,
    the friend's new turn."""
    from finetune.prompt import ChatTurn
    from finetune.tiny_model import DEFAULT_CORPUS

    return [*turns, ChatTurn(PERSONA, reply_text), ChatTurn(FRIEND, rng.choice(DEFAULT_CORPUS))]


def memory_window(turns: list, ids: list[int], limit: int) -> list:
    """What the bot's memory hands the worker from a chat's turns (`ids`: their database ids): the
    last `limit` turns, from a start that moves in jumps where bot/memory.py has window_start (with
    bot/router.py's WINDOW_SLACK). `limit` 0: every turn."""
    if limit <= 0 or len(turns) <= limit:
        return turns
    try:
        from bot.memory import window_start
        from bot.router import WINDOW_SLACK
    except ImportError:
        return turns[-limit:]
    slack = max(0, min(WINDOW_SLACK, limit - 1))
    recent = slice(-(limit + slack), None)
    return turns[recent][window_start(ids[recent], limit, slack):]


def _engine_of(stepper):
    return getattr(stepper, "engine", None)


def _reuse_counters(engine) -> tuple[int | None, int | None]:
    return getattr(engine, "prefilled_tokens", None), getattr(engine, "reused_tokens", None)


def _shared_prefix(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _spread(values: list[float], digits: int = 3) -> dict | None:
    if not values:
        return None
    return {"min": round(min(values), digits), "median": round(statistics.median(values), digits),
            "max": round(max(values), digits)}


async def chats_over_time(backend, chats: int, seconds: float, seed: int, memory_turns: int = 0) -> dict:
    """`chats` concurrent conversations that go on, through the real Worker for `seconds`; with
    `memory_turns`, each message carries only the window of turns the bot's memory would give."""
    from bot.metrics import BotMetrics
    from bot.worker import Worker

    worker = Worker(backend, BotMetrics(), max_queue=4 * chats, max_batch=chats, batch_wait_s=0.002)
    started = time.monotonic()
    await worker.start()
    worker_start_s = time.monotonic() - started
    engine = _engine_of(worker.stepper)
    prefilled_before, reused_before = _reuse_counters(engine)
    timing_before = dict(getattr(engine, "timing", None) or {})
    rng = random.Random(seed)
    conversations = [conversation(rng, backend.loaded.tokenizer, CONTEXT_TOKENS) for _ in range(chats)]
    submitted: list[tuple[int, list]] = []  # (chat, turns) of every message sent: prompts are measured after the run
    latencies: list[float] = []
    finished_at: list[tuple[float, int]] = []  # (seconds since start, tokens) of every reply in the run
    start = time.monotonic()
    end = start + seconds

    turn_ids = itertools.count()  # the memory database's row ids: one sequence for every chat

    async def chat(i: int) -> None:
        await asyncio.sleep(rng.uniform(0, START_SPREAD_S))
        turns = conversations[i]
        ids = [next(turn_ids) for _ in turns]
        while time.monotonic() < end:
            sent = time.monotonic()
            window = memory_window(turns, ids, memory_turns)
            submitted.append((i, window))
            reply = await worker.submit(window, deadline=sent + 120, received=sent)
            done = time.monotonic()
            if done <= end:
                latencies.append(done - sent)
                finished_at.append((done - start, reply.tokens))
            turns = next_message(rng, turns, reply.text)
            ids += [next(turn_ids), next(turn_ids)]
            await asyncio.sleep(rng.uniform(0, THINK_S))

    await asyncio.gather(*(chat(i) for i in range(chats)))
    wall = time.monotonic() - start
    prefilled_after, reused_after = _reuse_counters(engine)
    timing = {k: v - timing_before.get(k, 0) for k, v in (getattr(engine, "timing", None) or {}).items()}
    await worker.stop(30)

    # The prompts as the stepper built them (worker.submit -> backend.prompt_ids), measured now so
    # that tokenizing never competes with the run.
    prompts, previous, new_tokens, cut = [], {}, [], 0
    for i, turns in submitted:
        ids = backend.prompt_ids(turns)
        prompts.append(len(ids))
        if i in previous:
            shared = _shared_prefix(previous[i], ids)
            new_tokens.append(len(ids) - shared)
            cut += shared < len(previous[i]) // 2  # the oldest turns dropped: the prompt no longer extends the last
        previous[i] = ids
    tokens = sum(t for _, t in finished_at)
    # Tokens finished in each whole second after the start spread (the first second is ramp-up).
    windows = [0] * max(0, int(seconds))
    for at, t in finished_at:
        if int(at) < len(windows):
            windows[int(at)] += t
    steady = windows[int(START_SPREAD_S):] or windows
    latencies.sort()
    figures = {
        "chats": chats,
        "seconds": round(wall, 1),
        "worker_start_s": round(worker_start_s, 1),
        "replies": len(latencies),
        "tokens": tokens,
        "mean_tokens_per_reply": round(tokens / max(1, len(latencies)), 1),
        "aggregate_tokens_per_s": round(tokens / min(wall, seconds), 1),
        "per_second_tokens": windows,
        "per_second_tokens_after_start_spread": _spread([float(w) for w in steady], 0),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3) if latencies else None,
        "max_s": round(latencies[-1], 3) if latencies else None,
        "messages_sent": len(submitted),
        "memory_turns": memory_turns or None,
        "mean_prompt_tokens": round(statistics.mean(prompts), 1) if prompts else None,
        "max_prompt_tokens": max(prompts) if prompts else None,
        "prompt_budget_tokens": backend.max_prompt_tokens,
        # Beyond the chat's previous prompt: what a follow-up must prefill when the previous prompt is reused.
        "mean_new_prompt_tokens_per_followup": round(statistics.mean(new_tokens), 1) if new_tokens else None,
        "followups_with_oldest_turns_dropped": cut,
    }
    if timing:
        # Where the run's wall time went: the engine's prefill and decode steps (device work up to the tokens on
        # the host), its host work after each step (tokens, text, stops), and the rest (the worker between steps,
        # the event loop, idle moments with no chat waiting).
        busy = timing["prefill_s"] + timing["decode_s"] + timing.get("mixed_s", 0.0) + timing["host_s"]
        figures["breakdown"] = {
            "prefill_s": round(timing["prefill_s"], 2), "prefill_steps": timing["prefill_steps"],
            "prefill_ms_per_step": round(1000 * timing["prefill_s"] / max(1, timing["prefill_steps"]), 2),
            "decode_s": round(timing["decode_s"], 2), "decode_steps": timing["decode_steps"],
            "decode_ms_per_step": round(1000 * timing["decode_s"] / max(1, timing["decode_steps"]), 2),
            # Mixed steps: every decoding row's token and chunks of the prompts that arrived meanwhile.
            "mixed_s": round(timing.get("mixed_s", 0.0), 2), "mixed_steps": timing.get("mixed_steps", 0),
            "mixed_ms_per_step": round(1000 * timing.get("mixed_s", 0.0) / max(1, timing.get("mixed_steps", 0)), 2),
            "engine_host_s": round(timing["host_s"], 2),
            "outside_engine_s": round(wall - busy, 2),
            "wall_s": round(wall, 2),
        }
    if engine is not None and prefilled_after is not None:
        figures["engine_prefilled_prompt_tokens"] = prefilled_after - prefilled_before
    if engine is not None and reused_after is not None:
        figures["engine_reused_prompt_tokens"] = reused_after - reused_before
    return figures


def _has_first_token(engine, key) -> bool:
    """Whether the engine's row for `key` has chosen a token (without the engine's row table, the
    prefill step is taken to choose it)."""
    rows = getattr(engine, "_rows", None)
    if not isinstance(rows, dict):
        return True
    return any(getattr(getattr(r, "request", r), "key", None) == key and getattr(r, "tokens", None) for r in rows.values())


def _first_token_then_finish(engine, key, prompt: list[int], speakers) -> tuple[float, object, dict]:
    """Seconds from add() until the row has its first token (the engine otherwise idle), the finished
    reply, and the prompt tokens the engine prefilled / reused for it."""
    before = _reuse_counters(engine)
    _sync()
    started = time.perf_counter()
    engine.add(key, prompt, speakers)
    first = None
    finished = None
    while engine.busy:
        done = engine.step()
        if first is None and (any(f.key == key for f in done) or _has_first_token(engine, key)):
            _sync()
            first = time.perf_counter() - started
        finished = next((f for f in done if f.key == key), finished)
    after = _reuse_counters(engine)
    counts = {name: b - a for name, a, b in zip(("prefilled", "reused"), before, after, strict=True) if a is not None}
    return first, finished, counts


def followup_first_token(engine, backend, tokenizer) -> tuple[dict, list[tuple[list[int], list[int]]]]:
    """Time to first token of a ~400-token first message and of its follow-up (the first message's
    turns + its 40-token reply + a new friend turn), TTFT_REPEATS conversations after one untimed."""
    saved = engine.settings
    engine.settings = dataclasses.replace(saved, max_new_tokens=CHAT_NEW_TOKENS)
    rows, pairs = [], []
    try:
        for i in range(TTFT_REPEATS + 1):
            rng = random.Random(1000 + i)
            turns = conversation(rng, tokenizer, FIRST_PROMPT_TOKENS)
            first = backend.prompt_ids(turns)
            first_s, reply, first_counts = _first_token_then_finish(engine, f"ttft{i}", first, backend.speakers_in(turns))
            follow_turns = next_message(rng, turns, reply.text if reply is not None else "")
            follow = backend.prompt_ids(follow_turns)
            follow_s, _, follow_counts = _first_token_then_finish(engine, f"ttft{i}-followup", follow,
                                                                  backend.speakers_in(follow_turns))
            if i == 0:
                continue  # warm-up
            pairs.append((first, follow))
            rows.append({"first_prompt_tokens": len(first), "first_s": round(first_s, 4),
                         "followup_prompt_tokens": len(follow), "followup_s": round(follow_s, 4),
                         "new_tokens_beyond_first_prompt": len(follow) - len(first),
                         "shared_prefix_with_first_prompt": _shared_prefix(first, follow),
                         "reply_tokens": reply.tokens if reply is not None else None,
                         "engine_first": first_counts, "engine_followup": follow_counts})
    finally:
        engine.settings = saved
    return _first_token_figures(rows), pairs


def _first_token_figures(rows: list[dict]) -> dict:
    first, follow = [r["first_s"] for r in rows], [r["followup_s"] for r in rows]
    return {
        "conversations": len(rows),
        "first_s": _spread(first, 4),
        "followup_s": _spread(follow, 4),
        "followup_over_first": round(statistics.median(follow) / statistics.median(first), 3) if rows else None,
        "first_prompt_tokens": _spread([r["first_prompt_tokens"] for r in rows], 0),
        "followup_prompt_tokens": _spread([r["followup_prompt_tokens"] for r in rows], 0),
        "new_tokens_beyond_first_prompt": _spread([r["new_tokens_beyond_first_prompt"] for r in rows], 0),
        "per_conversation": rows,
    }


def plain_first_token(model, tokenizer, pairs: list[tuple[list[int], list[int]]]) -> dict:
    """plain generate()'s time to first token (one new token: the prompt's prefill) for the same prompts."""
    import torch

    device = next(model.parameters()).device
    kwargs = dict(max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id)

    def timed(prompt: list[int]) -> float:
        ids = torch.tensor([prompt], device=device)
        _sync()
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, **kwargs)
        _sync()
        return time.perf_counter() - started

    if pairs:
        timed(pairs[0][0])  # warm-up
    rows = [{"first_prompt_tokens": len(a), "first_s": round(timed(a), 4), "followup_prompt_tokens": len(b),
             "followup_s": round(timed(b), 4), "new_tokens_beyond_first_prompt": len(b) - len(a)} for a, b in pairs]
    return _first_token_figures(rows)


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
    """One way of loading the model: its single-stream, first-token and concurrent-chat figures."""
    from finetune.model_backend import ModelBackend
    from finetune.model_loading import load_persona_model
    from finetune.prompt import encode_prompt

    quantize = {"bf16": "none", "bf16-compiled": "none", "bf16-separate": "none", "bf16-mixed": "none", "8bit": "8bit",
                "4bit": "4bit"}[name]
    compiled = name.endswith("-compiled")
    # -separate: prompts that arrive while replies decode get prefill steps of their own (no mixed steps); -mixed: the
    # engine as bf16 runs it, without bf16's plain generate() figures (the two side by side in less device time)
    mixed = not name.endswith("-separate")
    result: dict = {"quantize": quantize, "compile": compiled, "mixed_steps": mixed}
    _free()
    rng = random.Random(0)
    if name == "bf16":
        unmerged = load_persona_model(adapter, quantize="none")
        prompt = encode_prompt(unmerged.tokenizer, context_turns(rng, unmerged.tokenizer, CONTEXT_TOKENS), PERSONA, "transcript")
        result["prompt_tokens"] = len(prompt)
        result["plain_generate_unmerged"] = plain_single_stream(unmerged.model, unmerged.tokenizer, prompt)
        del unmerged
        _free()
    loaded = load_persona_model(adapter, quantize=quantize, merge=quantize == "none")
    result["adapter_merged"] = quantize == "none"
    result["weights_gb"] = round(sum(p.numel() * p.element_size() for p in loaded.model.parameters()) / 1e9, 2)

    prompt = encode_prompt(loaded.tokenizer, context_turns(random.Random(0), loaded.tokenizer, CONTEXT_TOKENS), PERSONA, "transcript")
    result["plain_generate"] = plain_single_stream(loaded.model, loaded.tokenizer, prompt)
    result["plain_generate"]["peak_gpu_gb"] = _peak_gb()

    chat_overrides = {"max_new_tokens": CHAT_NEW_TOKENS, "temperature": 0.0, "repetition_penalty": 1.0}
    # No EOS in the timed runs: every reply is exactly as long as asked (a random model may say EOS).
    no_eos = dataclasses.replace(loaded, tokenizer=_WithoutEos(loaded.tokenizer))
    if name == "bf16":
        # Plain generate() first, on a model the slot engine has not touched yet.
        for chats in (8, 32):
            # (generate() needs a real EOS id; a random model says it about once in 32,000 tokens.)
            backend = ModelBackend.from_loaded(loaded, generation_overrides=chat_overrides, engine="plain")
            _free()
            figures = asyncio.run(chats_over_time(backend, chats, args.seconds, seed=chats, memory_turns=args.memory_turns))
            figures["peak_gpu_gb"] = _peak_gb()
            result[f"plain_generate_{chats}_chats"] = figures
            print(name, "plain", chats, figures, flush=True)

    overrides = {"max_new_tokens": SINGLE_NEW_TOKENS, "temperature": 0.0, "repetition_penalty": 1.0}
    backend = dataclasses.replace(ModelBackend.from_loaded(no_eos, generation_overrides=overrides, compile=compiled),
                                  mixed_steps=mixed)
    started = time.monotonic()
    stepper = backend.make_stepper(32)
    result["engine_warmup_s"] = round(time.monotonic() - started, 1)
    engine = _engine_of(stepper)
    if engine is None:
        result["engine"] = "fell back to plain generate(): see the log"
        return result
    from engine_driver import OneSetting

    engine = OneSetting(engine, backend.settings)
    result["engine"] = {"slots": engine.slots, "cache_tokens": engine.length, "cache_gb": round(engine.cache.nbytes / 1e9, 2),
                        "cuda_graphs": engine.graph_count}
    report = getattr(engine, "cache_report", None)
    if report is not None:
        result["engine"]["cache_report"] = report() if callable(report) else report
    result["engine_single_stream"] = engine_single_stream(engine, prompt)
    result["engine_first_token"], pairs = followup_first_token(engine, backend, loaded.tokenizer)
    print(name, "first token", {k: v for k, v in result["engine_first_token"].items() if k != "per_conversation"}, flush=True)
    if name == "bf16":
        prompts = [encode_prompt(loaded.tokenizer, context_turns(random.Random(s), loaded.tokenizer, CONTEXT_TOKENS),
                                 PERSONA, "transcript") for s in range(1, 5)]
        engine.codec.eos_id = loaded.tokenizer.eos_id  # EOS counts again: compared with generate()'s stop
        result["greedy_equality"] = greedy_agreement(loaded.model, loaded.tokenizer, engine, prompts, 64)
        engine.codec.eos_id = no_eos.tokenizer.eos_id
    # The slot attention without an active step is plain SDPA: generate() runs as it did before the engine.
    result["plain_generate_first_token"] = plain_first_token(loaded.model, loaded.tokenizer, pairs)
    del stepper, engine
    _free()

    for chats in (8, 32):
        backend = dataclasses.replace(ModelBackend.from_loaded(no_eos, generation_overrides=chat_overrides,
                                                               compile=compiled), mixed_steps=mixed)
        _free()
        figures = asyncio.run(chats_over_time(backend, chats, args.seconds, seed=chats, memory_turns=args.memory_turns))
        figures["peak_gpu_gb"] = _peak_gb()
        result[f"engine_{chats}_chats"] = figures
        print(name, "slots", chats, figures, flush=True)
    del loaded, no_eos, backend
    _free()
    return result


def summary(figures: dict) -> dict:
    """Each goal's figure beside the goal and plain generate()'s figure of the same run (None where
    this configuration did not measure it)."""

    def get(*path):
        value = figures
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    return {
        "single_stream_tokens_per_s": {"goal": GOALS["single_stream_tokens_per_s"],
                                       "engine": get("engine_single_stream", "tokens_per_s"),
                                       "plain_generate": get("plain_generate", "tokens_per_s")},
        "aggregate_tokens_per_s_32_chats": {"goal": GOALS["aggregate_tokens_per_s_32_chats"],
                                            "engine": get("engine_32_chats", "aggregate_tokens_per_s"),
                                            "engine_per_second_min": get("engine_32_chats", "per_second_tokens_after_start_spread", "min"),
                                            "plain_generate": get("plain_generate_32_chats", "aggregate_tokens_per_s")},
        "p95_s_32_chats": {"goal": GOALS["p95_s_32_chats"], "engine": get("engine_32_chats", "p95_s"),
                           "plain_generate": get("plain_generate_32_chats", "p95_s")},
        "followup_first_token_s": {"goal": GOALS["followup_first_token"],
                                   "engine_first_median": get("engine_first_token", "first_s", "median"),
                                   "engine_followup_median": get("engine_first_token", "followup_s", "median"),
                                   "engine_followup_over_first": get("engine_first_token", "followup_over_first"),
                                   "new_over_followup_prompt_tokens": _ratio(
                                       get("engine_first_token", "new_tokens_beyond_first_prompt", "median"),
                                       get("engine_first_token", "followup_prompt_tokens", "median")),
                                   "plain_generate_first_median": get("plain_generate_first_token", "first_s", "median"),
                                   "plain_generate_followup_median": get("plain_generate_first_token", "followup_s", "median")},
        "warmup_s": {"goal": GOALS["warmup_s"], "engine": figures.get("engine_warmup_s"), "plain_generate": 0},
    }


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a is not None and b else None


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
    p.add_argument("--runs", default="bf16", help="comma-separated: bf16, bf16-compiled, bf16-separate (no mixed steps), "
                   "bf16-mixed (bf16's engine figures alone), 8bit, 4bit")
    p.add_argument("--shape", default="rinna", help=f"comma-separated: {', '.join(SHAPES)}")
    p.add_argument("--seconds", type=float, default=15.0, help="length of each concurrent-chat run")
    p.add_argument("--memory-turns", type=int, default=0,
                   help="send each chat's turns through the bot's memory window of this many turns ([memory] max_turns, "
                        "20 in the bot); 0 (default): the whole conversation, cut only by the prompt budget")
    p.add_argument("--work", default=None, help="folder for the models and adapters (kept: a second call reuses them)")
    p.add_argument("--no-cudnn-attention", action="store_true",
                   help="turn off PyTorch's cuDNN SDPA backend (it plans anew for every new sequence length)")
    args = p.parse_args()
    shapes = [s.strip() for s in args.shape.split(",") if s.strip()]
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [s for s in shapes if s not in SHAPES] + [r for r in runs if r not in ("bf16", "bf16-compiled", "bf16-separate", "bf16-mixed", "8bit", "4bit")]
    if unknown or not shapes or not runs:
        p.error(f"unknown or missing shape/run: {', '.join(unknown) or '(none given)'}")
    if args.no_cudnn_attention:
        import torch

        torch.backends.cuda.enable_cudnn_sdp(False)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    work = Path(args.work or tempfile.mkdtemp(prefix="bunshin-gen-"))
    bandwidth = copy_bandwidth_gbs()
    result = {
        "benchmark": "generation_speed",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(),
        "goals": GOALS,
        "chat_load": {"context_tokens_at_start": CONTEXT_TOKENS, "reply_tokens": CHAT_NEW_TOKENS,
                      "next_message": "previous turns + the persona's reply + a new friend turn",
                      "pause_after_reply_s": [0, THINK_S], "start_spread_s": START_SPREAD_S, "seconds": args.seconds,
                      "memory_turns": args.memory_turns or None},
        "first_token_test": {"first_prompt_tokens": FIRST_PROMPT_TOKENS, "reply_tokens": CHAT_NEW_TOKENS,
                             "conversations": TTFT_REPEATS},
        "measured_copy_bandwidth_gb_s": bandwidth,
        "shapes": {},
    }
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        started = time.monotonic()
        base = work / shape_name / "base"
        if not (base / "config.json").exists():
            build_model(base, shape)
        adapter = work / shape_name / "adapter"
        if not (adapter / "bunshin.json").exists():
            make_adapter(base, adapter, max_length=512)
        print(f"{shape_name}: model and adapter ready in {time.monotonic() - started:.0f}s", flush=True)
        entry = {"model": describe(shape) + "; random weights, LoRA r=16 adapter", "configurations": {}, "summary": {}}
        result["shapes"][shape_name] = entry
        for name in runs:
            started = time.monotonic()
            try:
                figures = run_configuration(name, adapter, args)
            except Exception as exc:  # one failed configuration still leaves the others' figures
                traceback.print_exc()
                figures = {"error": f"{type(exc).__name__}: {exc}"}
                _free()
            figures["wall_s"] = round(time.monotonic() - started, 1)
            if bandwidth and "weights_gb" in figures:
                # One stream must read every weight once per token: the ceiling for single-stream decoding.
                figures["bandwidth_limit_tokens_per_s"] = round(bandwidth / figures["weights_gb"], 1)
            entry["configurations"][name] = figures
            entry["summary"][name] = summary(figures)
            Path(args.out).write_text(json.dumps(result, ensure_ascii=False, indent=2, default=str) + "\n", encoding="utf-8")
            print(json.dumps({shape_name: {name: entry["summary"][name]}}, ensure_ascii=False, indent=1), flush=True)


if __name__ == "__main__":
    main()
