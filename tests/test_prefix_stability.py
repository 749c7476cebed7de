"""What keeps a chat's prompt start stable from one message to the next, so the slot engine can reuse it.

The engine computes only the tokens past what a chat's slot already holds (test_slot_engine.py). That pays
only if the next prompt starts as the last one did: the remembered window of turns and the dropping of
turns that no longer fit must not move the start with every message.
"""

from __future__ import annotations

from bot.memory import ConversationMemory, window_start
from engine.slot_reuse import MIN_REUSE, common_prefix, place
from finetune.generation import fit_context
from finetune.prompt import ChatTurn
from finetune.records import TEXT


def test_the_window_start_stays_put_for_several_messages_and_the_window_keeps_its_bounds():
    limit, slack = 20, 8
    ids = list(range(1000, 1400, 3))  # a chat's turn ids: increasing, with gaps (other chats in between)
    starts, moves = [], 0
    for seen in range(limit + slack, len(ids), 2):  # each message adds the friend's turn and the reply
        latest = ids[max(0, seen - limit - slack):seen]
        start = latest[window_start(latest, limit, slack)]
        window = len(latest) - latest.index(start)
        assert limit - slack < window <= limit
        moves += bool(starts) and start != starts[-1]
        starts.append(start)
    assert moves <= len(starts) / 2  # a sliding "last 20 turns" would move on every message
    assert len(set(starts)) < len(starts)


def test_short_chats_keep_every_turn(tmp_path):
    with ConversationMemory(tmp_path / "m.sqlite3") as memory:
        for i in range(5):
            memory.append("line:C1", "健太", f"msg {i}", kind=TEXT)
        assert [r.text for r in memory.recent("line:C1", 20, slack=8)] == [f"msg {i}" for i in range(5)]
        for i in range(5, 40):
            memory.append("line:C1", "健太", f"msg {i}", kind=TEXT)
        window = memory.recent("line:C1", 20, slack=8)
        assert 12 < len(window) <= 20 and window[-1].text == "msg 39"
        again = memory.recent("line:C1", 20, slack=8)
        assert [r.text for r in again] == [r.text for r in window]  # the same turns give the same start


class _CharTokenizer:
    """One token per character: enough to count what fits."""

    bos_id = None
    add_bos = False

    def encode(self, text):
        return [ord(c) for c in text]

    def to_model_text(self, text):
        return text


def test_turns_that_no_longer_fit_go_in_blocks_so_the_start_holds():
    tokenizer = _CharTokenizer()
    turns: list[ChatTurn] = []
    starts = []
    for i in range(40):
        turns.append(ChatTurn("健太" if i % 2 else "美咲", f"message number {i:02d}"))
        ids = fit_context(tokenizer, turns, "美咲", "transcript", budget=200, block=4)
        assert len(ids) <= 200
        starts.append(ids[:30])
    changes = sum(a != b for a, b in zip(starts, starts[1:], strict=False))
    one_at_a_time = [fit_context(tokenizer, turns[: n + 1], "美咲", "transcript", budget=200)[:30] for n in range(40)]
    one_by_one = sum(a != b for a, b in zip(one_at_a_time, one_at_a_time[1:], strict=False))
    assert changes * 2 <= one_by_one


def test_a_prompt_goes_to_the_free_slot_that_holds_its_start():
    cached = [list(range(100)), [], list(range(50)) + [7] * 30, list(range(5000, 5040))]
    follow_up = list(range(120))
    fresh = [9] * 40
    placements = place([fresh, follow_up], free=[0, 1, 2], cached=cached)
    assert placements[1].slot == 0 and placements[1].reused == 100
    assert placements[0].slot == 1 and placements[0].reused == 0  # the lowest free slot left
    # A busy slot is never taken, a short common start is not worth an extension, one token is always left.
    assert place([list(range(40))], free=[1, 2], cached=cached)[0].slot == 2
    assert place([list(range(MIN_REUSE - 1)) + [1]], free=[0], cached=cached)[0].reused == 0
    assert place([list(range(100))], free=[0], cached=cached)[0].reused == 99
    assert place([follow_up], free=[0], cached=cached, max_new=10)[0].reused == 0  # too much new: fresh


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix(list(range(1000)), list(range(1000))) == 1000
    assert common_prefix(list(range(1000)), list(range(777)) + [0]) == 777
    assert common_prefix([], [1]) == 0
