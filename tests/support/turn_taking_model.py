"""A tiny model that has learnt to take turns: after its persona's line it writes the other speaker's next turn.

The random tiny model (finetune.tiny_model) never writes `\\n翔太: `, so a test of where a reply is cut at
another speaker's turn would cut nothing. This one is the tiny GPT-NeoX (with a head of realistic scale,
`head_std=0.5`) fully fine-tuned on the CPU on a few two-line exchanges: greedy continuation of
`翔太: X\\n美咲: ` writes 美咲's line for X and then `\\n翔太: ` and 翔太's next message, as a base model
continuing a transcript does. Training is seeded and single-threaded: about a second.
"""

from __future__ import annotations

from pathlib import Path

from finetune.model_loading import LoadedModel, load_base_model
from finetune.prompt import ChatTurn, encode_prompt
from finetune.tiny_model import build_tiny_model

FRIEND, PERSONA = "翔太", "美咲"
# (翔太's message, 美咲's reply): each exchange is followed in training by 翔太's next message (the next row's).
EXCHANGES = (
    ("おはよう", "おはよう！"),
    ("今日ひま？", "ひまだよ"),
    ("ラーメン食べに行こうよ", "いいね！"),
    ("写真送るね", "かわいい！"),
    ("明日は雨らしいよ", "傘持っていくね"),
    ("おやすみ", "また明日"),
)


def prompt_ids(tokenizer, message: str) -> list[int]:
    """`翔太: message\\n美咲: ` as the bot renders it."""
    return encode_prompt(tokenizer, [ChatTurn(FRIEND, message)], PERSONA, "transcript")


def build_turn_taking_model(folder: Path, steps: int = 150, lr: float = 5e-3, seed: int = 0) -> LoadedModel:
    import torch

    transcripts = [f"{FRIEND}: {message}\n{PERSONA}: {reply}" for message, reply in EXCHANGES]
    loaded = load_base_model(str(build_tiny_model(folder / "model", transcripts, seed=seed, head_std=0.5)),
                             device="cpu")
    tokenizer, model = loaded.tokenizer, loaded.model
    rows = []
    for i, (message, reply) in enumerate(EXCHANGES):
        follow_up = EXCHANGES[(i + 1) % len(EXCHANGES)][0]
        prompt = prompt_ids(tokenizer, message)
        continuation = tokenizer.encode(tokenizer.to_model_text(f"{reply}\n{FRIEND}: {follow_up}"))
        rows.append((prompt, continuation))
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_id)
    labels = torch.full((len(rows), width), -100)  # the loss is on the continuation only, as in training
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, continuation) in enumerate(rows):
        row = prompt + continuation
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, len(prompt) : len(row)] = torch.tensor(continuation)
        attention[i, : len(row)] = 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: threads cost more than they save, and the result is repeatable
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
            for _ in range(steps):
                loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return loaded
