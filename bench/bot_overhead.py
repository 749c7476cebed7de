"""Benchmark: the bot daemon's own cost per message, and whether the worker batches.

N chats send a message at the same moment, for several rounds, through the real router, SQLite
memory and worker, with the offline tiny model generating. The daemon's overhead per message is
the CPU time of the event-loop thread (adapters' handler, router, limits, memory, queueing,
metrics) divided by the messages; generation (prompt tokenization included) runs in the worker's
thread and is left out. Goal (issue 4): under 5 ms per message at 100 concurrent chats, and a mean
batch size above 1.

    python bench/bot_overhead.py            # writes bench/results/bot_overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GOAL_MS = 5.0


async def run(chats: int, rounds: int, max_batch: int, work: Path) -> dict:
    from bot.backend import ModelBackend
    from bot.config import BotConfig
    from bot.memory import ConversationMemory
    from bot.messages import IncomingMessage
    from bot.metrics import BotMetrics
    from bot.router import BUSY_REPLY, ERROR_REPLY, TIMEOUT_REPLY, Router
    from bot.worker import Worker
    from finetune.model_loading import load_base_model
    from finetune.tiny_model import build_tiny_model

    model_dir = build_tiny_model(work / "tiny")
    config = BotConfig.from_dict({
        "model": {"base": str(model_dir), "device": "cpu"},
        "persona": {"name": "美咲"},
        "generation": {"max_new_tokens": 8},
        "memory": {"path": str(work / "memory.sqlite3")},
        "queue": {"max_size": chats + 16, "max_batch": max_batch, "deadline_s": 600},
        "limits": {"messages_per_minute": 1000, "burst": rounds + 1},
    }, source="bench")
    loaded = load_base_model(str(model_dir), device="cpu")
    metrics = BotMetrics()
    backend = ModelBackend.from_loaded(loaded, persona="美咲", generation_overrides=config.generation.overrides())
    worker = Worker(backend, metrics, max_queue=config.queue.max_size, max_batch=max_batch,
                    batch_wait_s=config.queue.batch_wait_ms / 1000)
    await worker.start()
    memory = ConversationMemory(config.memory.path, keep=4 * config.memory.max_turns)
    router = Router(config, memory, worker, metrics, "美咲")

    # Warm-up round (first generation pays for lazy set-up), not counted.
    await asyncio.gather(*(router.handle(IncomingMessage("bench", f"w{i}", f"w{i}", "健太", "おはよう", True)) for i in range(8)))

    generation_before = metrics.generation_seconds._sum.get()
    batches_before = (metrics.batch_size._sum.get(), sum(b.get() for b in metrics.batch_size._buckets))
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    replies = 0
    for r in range(rounds):
        messages = [IncomingMessage("bench", f"c{i}", f"u{i}", f"user{i}", f"メッセージ {r} です", True) for i in range(chats)]
        results = await asyncio.gather(*(router.handle(m) for m in messages))
        replies += sum(1 for x in results if isinstance(x, str) and x not in (BUSY_REPLY, ERROR_REPLY, TIMEOUT_REPLY))
    cpu1, wall1 = time.thread_time(), time.perf_counter()
    messages_total = chats * rounds
    batch_sum = metrics.batch_size._sum.get() - batches_before[0]
    batch_count = sum(b.get() for b in metrics.batch_size._buckets) - batches_before[1]
    await worker.stop(30)
    memory.close()
    return {
        "chats": chats,
        "rounds": rounds,
        "messages": messages_total,
        "replies": replies,
        "max_batch": max_batch,
        "mean_batch_size": round(batch_sum / batch_count, 2) if batch_count else None,
        "overhead_ms_per_message": round((cpu1 - cpu0) * 1000 / messages_total, 3),
        "wall_s": round(wall1 - wall0, 2),
        "generation_s": round(metrics.generation_seconds._sum.get() - generation_before, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chats", type=int, nargs="+", default=[1, 20, 100])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "bot_overhead.json")
    a = ap.parse_args()
    from finetune.model_loading import quiet_libraries

    quiet_libraries()
    results = []
    for chats in a.chats:
        with tempfile.TemporaryDirectory() as tmp:
            r = asyncio.run(run(chats, a.rounds, a.max_batch, Path(tmp)))
        print(json.dumps(r), flush=True)
        results.append(r)
    at_100 = next((r for r in results if r["chats"] == 100), None)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    report = {
        "benchmark": "bot daemon overhead per message (event-loop CPU time) and batching, tiny model on CPU",
        "produced_by": "python bench/bot_overhead.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "device": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
        "results": results,
        "goal": {"overhead_ms_per_message_at_100_chats": GOAL_MS, "mean_batch_size_above": 1},
        "meets_goal": bool(at_100 and at_100["overhead_ms_per_message"] < GOAL_MS and (at_100["mean_batch_size"] or 0) > 1),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"meets_goal": report["meets_goal"]}))


if __name__ == "__main__":
    main()
