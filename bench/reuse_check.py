"""On a GPU: follow-up messages served through the captured extension graphs give generate()'s greedy tokens.

tests/test_slot_engine.py checks prefix reuse on the CPU, where the engine captures no CUDA graphs. This
runs the same check with graphs, in float32 (so no bf16 near-tie can flip a token), on the tiny model:
three chats, then each chat's follow-up (its prompt + the reply + a new turn) while the others decode.

    python bench/reuse_check.py     # prints the comparison as JSON; exit 1 if a follow-up differs
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from engine_driver import slot_engine  # noqa: E402

from finetune.generation import GenerationSettings  # noqa: E402
from finetune.model_loading import load_base_model  # noqa: E402
from finetune.tiny_model import build_tiny_model  # noqa: E402

LINES = ["こんにちは、元気?", "明日は雨らしいよ。どうする", "うん", "ねえねえ、昨日のテレビ見た?", "写真送るね", "7時でいい?"]


def main() -> int:
    folder = Path(tempfile.mkdtemp(prefix="bunshin-reuse-"))
    loaded = load_base_model(str(build_tiny_model(folder / "tiny")), device="cuda", dtype="fp32")
    tokenizer, model = loaded.tokenizer, loaded.model
    settings = GenerationSettings(max_new_tokens=16, temperature=0.0, repetition_penalty=1.3)
    engine = slot_engine(model, tokenizer, settings, slots=4, length=384)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(tokenizer.to_model_text(text))

    def run(prompts: list[list[int]]) -> dict[int, list[int]]:
        got, waiting, steps = {}, list(enumerate(prompts)), 0
        while waiting or engine.busy:
            if waiting and engine.free and steps % 2 == 0:
                engine.add(*waiting.pop(0))
            for finished in engine.step():
                got[finished.key] = finished.ids
            steps += 1
        return got

    def plain(prompt: list[int]) -> list[int]:
        out = model.generate(input_ids=torch.tensor([prompt], device="cuda"), max_new_tokens=16, do_sample=False,
                             repetition_penalty=1.3, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        row = out[0, len(prompt):].tolist()
        return row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row

    firsts = [encode(f"翔太: {line}\n美咲: ") for line in LINES[:3]]
    replies = run(firsts)
    follow_ups = [firsts[i] + replies[i] + encode(f"\n翔太: {LINES[3 + i]}\n美咲: ") for i in range(3)]
    got = run(follow_ups)
    same = [got[i] == plain(p) for i, p in enumerate(follow_ups)]
    print(json.dumps({"graphs": engine.graph_count, "extension_graphs": len(engine._extend_graphs),
                      "follow_ups_identical": sum(same), "follow_ups": len(same),
                      "reused_tokens": engine.reused_tokens, "prefilled_tokens": engine.prefilled_tokens}))
    return 0 if all(same) and engine.reused_tokens > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
