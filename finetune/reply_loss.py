"""The loss of a model on the replies of packed rows, weighted per reply token.

Training's before/after eval loss (train.py) and the eval's perplexity (eval_models.py) both measure it here.
"""

from __future__ import annotations

from .packing import USEFUL_TOKENS, PackedCollator, PackedRow


def token_weighted_loss(model, rows: list[PackedRow], pad_id: int, rows_per_batch: int) -> float | None:
    """Mean loss per reply token over `rows` (the Trainer's eval averages per batch instead)."""
    import torch

    if not rows:
        return None
    collate = PackedCollator(pad_id)
    device = next(p for p in model.parameters()).device
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), rows_per_batch):
            batch = {k: v.to(device) for k, v in collate(rows[i : i + rows_per_batch]).items() if k != USEFUL_TOKENS}
            # use_cache=False: with a KV cache transformers ignores the restarting position ids and
            # lets packed samples attend to each other (the config's default is use_cache=True).
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits.float()
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1][mask], labels[mask], reduction="sum"
            )
            total += loss.item()
            tokens += int(mask.sum())
    model.train(was_training)
    return total / tokens if tokens else None
