"""Training samples as token ids and labels: the prompt unscored, the reply plus EOS the only labelled part.

Training (train.py) and the eval's reply loss (eval_models.py) encode samples alike through `encode_all`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .prompt import as_turns, encode_sample


def encode_all(tokenizer, samples: list[dict], template: str, max_length: int,
               memory: Callable[[dict], list] | None = None, profile: Sequence[str] = ()) -> tuple[list, int]:
    """(input ids, labels) of every sample that fits, and how many did not. `memory`: the notes a sample's
    prompt carries (person_memory.sample_notes), as the bot's prompt carries them when serving."""
    encoded, skipped = [], 0
    for s in samples:
        notes = memory(s) if memory else ()
        pair = encode_sample(tokenizer, as_turns(s["context"]), s["persona"], s["target"], template, max_length,
                             memory=notes, profile=profile)
        if pair is None:
            skipped += 1
        else:
            encoded.append(pair)
    return encoded, skipped
