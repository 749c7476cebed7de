"""One prompt budget for the bot, `eval` and `chat` (finetune.generation.prompt_budget): the served context less the
reply's room, so that a reply in `chat` or in the report is prompted as the bot would prompt it."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune.generation import MAX_SERVED_CONTEXT, prompt_budget

REPO = Path(__file__).resolve().parents[1]


def model(context: int | None):
    return SimpleNamespace(config=SimpleNamespace(max_position_embeddings=context))


def test_the_budget_is_the_served_context_less_the_reply():
    assert prompt_budget(model(2048), 100, fallback=256) == 1948  # the model's whole context, not the training length
    assert prompt_budget(model(131_072), 100, fallback=256) == MAX_SERVED_CONTEXT - 100
    assert prompt_budget(model(None), 100, fallback=256) == 156  # the config is silent: the training length


def test_an_unknown_context_or_a_reply_that_leaves_no_room_is_refused():
    with pytest.raises(ValueError, match=r"the model's config does not say its context length"):
        prompt_budget(model(None), 100, fallback=None)
    with pytest.raises(ValueError, match=r"max_new_tokens 2040 leaves 8 of 2048 tokens for the prompt"):
        prompt_budget(model(2048), 2040, fallback=256)
    assert prompt_budget(model(2048), 2032, fallback=256) == 16


def test_the_rule_is_written_once():
    """bot/backend.py, finetune/eval_models.py and finetune/chat.py each wrote it once (chat's differently)."""
    writers = sorted(str(path.relative_to(REPO)) for folder in ("bot", "finetune") for path in (REPO / folder).rglob("*.py")
                     if re.search(r"tokens for the prompt|- settings\.max_new_tokens", path.read_text(encoding="utf-8")))
    assert writers == ["finetune/generation.py"]
