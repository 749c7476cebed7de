"""The engine package's parts: each request's own sampling, seeds, stops, streamed text and finish reasons.

The detokenizer is driven with a text function of its own (one character a token), so what is held back and
when is visible character by character; the slot engine and the sampler run the tiny random model on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from engine.detokenizer import Detokenizer
from engine.request import EngineRequest, SamplingParams
from engine.sampler import BatchParams, choose
from engine.slot_engine import SlotEngine
from finetune.generation import GenerationSettings, ReplyCodec, generate_outputs, persona_request, turn_rule
from finetune.model_loading import load_base_model
from finetune.tiny_model import build_tiny_model

ALPHABET = "おはよう\n健太: 美咲今日ひまだよ!。"


def chars(text: str) -> list[int]:
    return [ALPHABET.index(c) for c in text]


def as_text(ids: list[int]) -> str:
    return "".join(ALPHABET[i] for i in ids)


def feed(request: EngineRequest, text: str) -> tuple[list[str], bool, str]:
    """The pieces a request's detokenizer gives out for `text`, whether it stopped, and the whole reply at the end."""
    detokenizer = Detokenizer(request, as_text)
    pieces, stopped, seen_colon = [], False, False
    for token in chars(text):
        colon = ALPHABET[token] == ":"
        piece, stopped = detokenizer.add(token, colon or seen_colon)
        seen_colon = colon
        pieces.append(piece)
        if stopped:
            break
    rest, whole = detokenizer.finish()
    pieces.append(rest)
    return [p for p in pieces if p], stopped, whole


def streamed(stop=(), rule=None) -> EngineRequest:
    return EngineRequest("k", [0], SamplingParams(stop=tuple(stop)), stream=True, stop_rule=rule)


def test_a_stop_string_ends_the_text_and_no_part_of_it_is_ever_sent():
    pieces, stopped, whole = feed(streamed(["\n健太:"]), "おはよう\n健太: ひま")
    assert stopped and whole == "おはよう" and "".join(pieces) == "おはよう"
    assert all("\n" not in p for p in pieces)  # the newline was held while it could start the stop string


def test_text_held_for_a_stop_that_did_not_come_is_sent_when_it_cannot_be_one():
    pieces, stopped, whole = feed(streamed(["\n健太:"]), "おは\n健よう")
    assert not stopped and whole == "おは\n健よう" == "".join(pieces)
    assert pieces[:2] == ["お", "は"] and "\n健よ" in pieces  # held as `\n健`, sent with the `よ` that ruled it out


def test_the_earliest_of_several_stop_strings_wins():
    _, stopped, whole = feed(streamed(["。", "ひま"]), "今日ひまだよ。")
    assert stopped and whole == "今日"


def test_the_stop_rule_cuts_a_turn_in_an_invented_name_and_holds_a_line_that_may_become_one():
    pieces, stopped, whole = feed(streamed(rule=turn_rule(["健太"])), "ひまだよ\n美咲: おはよう")
    assert stopped and whole == "ひまだよ" == "".join(pieces)
    # A line that turns out to be text, not a turn, is sent once it cannot be a name any more.
    pieces, stopped, whole = feed(streamed(rule=turn_rule(["健太"])), "ひま\n" + "よ" * 45)
    assert not stopped and "".join(pieces) == whole == "ひま\n" + "よ" * 45


def test_without_streaming_nothing_is_sent_before_the_end_and_the_rule_is_checked_at_colons_only():
    request = EngineRequest("k", [0], SamplingParams(), stream=False, stop_rule=turn_rule(["健太"]))
    pieces, stopped, whole = feed(request, "ひまだよ\n健太: おはよう")
    assert stopped and pieces == ["ひまだよ"] and whole == "ひまだよ"  # one piece, at the end: cut before the turn


def test_sampling_params_refuse_values_the_engine_cannot_use():
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(stop=("",)),
                dict(repetition_penalty=0), dict(temperature=float("nan"))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(seed=-1).seed_for_torch() == 2**64 - 1


def test_each_row_of_a_batch_is_chosen_with_its_own_parameters():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    seen = torch.zeros(4, 50, dtype=torch.bool)
    rows = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=1),
            SamplingParams(temperature=1.0, top_p=1e-9), SamplingParams(temperature=0, repetition_penalty=1e6)]
    seen[3, logits[3].argmax()] = True  # a penalty that large takes the row's best token out of the running
    chosen = choose(logits, seen, BatchParams.of(rows, "cpu"), torch.Generator().manual_seed(1))
    best = logits.argmax(-1)
    assert chosen[:3].tolist() == best[:3].tolist()  # greedy, top-k 1 and a tiny top-p all pick the argmax
    assert chosen[3] != best[3] and chosen[3] == logits[3].topk(2).indices[1]


def test_a_seeded_row_draws_the_same_whatever_shares_its_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 200)
    seen = torch.zeros(3, 200, dtype=torch.bool)
    seeded = SamplingParams(temperature=1.5, seed=11)

    def draw(row: int, others: SamplingParams, engine_seed: int) -> int:
        params = [others] * 3
        params[row] = seeded
        generator = torch.Generator().manual_seed(seeded.seed_for_torch())
        chosen = choose(logits[[0] * 3], seen, BatchParams.of(params, "cpu", {row: generator}),
                        torch.Generator().manual_seed(engine_seed))
        return int(chosen[row])

    draws = {draw(row, others, engine_seed) for row in range(3) for engine_seed in (1, 2)
             for others in (SamplingParams(), SamplingParams(temperature=1.0))}
    assert len(draws) == 1
    # ...and the seed matters: other seeds draw other tokens from this flat a distribution.
    other = {int(choose(logits[:1], seen[:1], BatchParams.of([SamplingParams(temperature=1.5, seed=s)], "cpu",
                                                              {0: torch.Generator().manual_seed(s)}))[0])
             for s in range(12, 20)}
    assert len(other) > 1


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_base_model(str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")), device="cpu")


def run(engine: SlotEngine, requests: list[EngineRequest]) -> dict:
    """Every request added at once and stepped to the end: key -> its outputs in order."""
    outputs: dict = {r.key: [] for r in requests}
    for request in requests:
        engine.add(request)
    steps = 0
    while engine.busy:
        for output in engine.step():
            outputs.setdefault(output.key, []).append(output)  # a row added before may finish meanwhile
        steps += 1
        assert steps < 1000
    return outputs


def prompt(loaded, text: str) -> list[int]:
    return loaded.tokenizer.encode(loaded.tokenizer.to_model_text(f"健太: {text}\n美咲: "))


def test_a_seeded_sampled_reply_repeats_alone_or_beside_other_replies(loaded):
    engine = SlotEngine(loaded.model, ReplyCodec(loaded.tokenizer), slots=4, length=96)
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=5)
    alone = run(engine, [EngineRequest("a", prompt(loaded, "おはよう"), seeded)])["a"][-1]
    others = [EngineRequest(i, prompt(loaded, f"今日ひま{i}"), SamplingParams(max_tokens=16, temperature=1.0))
              for i in range(3)]
    beside = run(engine, [*others, EngineRequest("a", prompt(loaded, "おはよう"), seeded)])["a"][-1]
    assert beside.token_ids == alone.token_ids and len(alone.token_ids) == 16
    reseeded = run(engine, [EngineRequest("b", prompt(loaded, "おはよう"), SamplingParams(
        max_tokens=16, temperature=1.0, top_p=0.95, seed=6))])["b"][-1]
    assert reseeded.token_ids != alone.token_ids


def test_finish_reasons_counts_and_stop_strings_in_the_engine(loaded):
    codec = ReplyCodec(loaded.tokenizer)
    engine = SlotEngine(loaded.model, codec, slots=2, length=96)
    ids = prompt(loaded, "おはよう")
    [long] = run(engine, [EngineRequest("x", ids, SamplingParams(max_tokens=20))])["x"]
    assert (long.finish_reason, long.completion_tokens, long.prompt_tokens) == ("length", 20, len(ids))
    assert long.full_text == codec.text(long.token_ids)
    # A stop string from the middle of that reply ends the same greedy reply there, without it.
    text = long.full_text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip() and text.find(text[i:i + 2]) == i)
    outputs = run(engine, [EngineRequest("y", ids, SamplingParams(max_tokens=20, stop=(stop,)), stream=True)])["y"]
    last = outputs[-1]
    assert last.finish_reason == "stop" and last.full_text == text[: text.index(stop)]
    assert "".join(o.text for o in outputs) == last.full_text
    assert len([o for o in outputs if o.text]) > 1  # streamed: the text came over several steps
    # max_tokens of 3: the first three tokens of the same reply.
    [short] = run(engine, [EngineRequest("z", ids, SamplingParams(max_tokens=3))])["z"]
    assert short.token_ids == long.token_ids[:3] and short.finish_reason == "length"
    # A stop token id: the reply ends before it.
    [cut] = run(engine, [EngineRequest("w", ids, SamplingParams(max_tokens=20, stop_token_ids=(long.token_ids[4],)))])["w"]
    assert cut.token_ids == long.token_ids[: long.token_ids.index(long.token_ids[4])] and cut.finish_reason == "stop"


def test_plain_generate_gives_the_engines_outputs_for_the_same_requests(loaded):
    """The fallback path (transformers' generate()) honours the same request fields: max_tokens, stops, greedy."""
    codec = ReplyCodec(loaded.tokenizer)
    engine = SlotEngine(loaded.model, codec, slots=3, length=96)
    ids = prompt(loaded, "今日ひま?")
    [whole] = run(engine, [EngineRequest("x", ids, SamplingParams(max_tokens=16))])["x"]
    stop = whole.full_text[5:7]
    requests = [EngineRequest("x", ids, SamplingParams(max_tokens=16)),
                EngineRequest("s", ids, SamplingParams(max_tokens=16, stop=(stop,))),
                EngineRequest("m", ids, SamplingParams(max_tokens=4))]
    from_engine = {k: v[-1] for k, v in run(engine, requests).items()}
    plain = {o.key: o for o in generate_outputs(loaded.model, loaded.tokenizer, requests)}
    for key in ("x", "s", "m"):
        assert (plain[key].full_text, plain[key].finish_reason) == (from_engine[key].full_text,
                                                                    from_engine[key].finish_reason), key
    assert plain["x"].token_ids == from_engine["x"].token_ids and plain["m"].token_ids == from_engine["m"].token_ids


def test_a_request_cancelled_or_past_its_deadline_frees_its_slot(loaded):
    now = [100.0]
    engine = SlotEngine(loaded.model, ReplyCodec(loaded.tokenizer), slots=2, length=96, clock=lambda: now[0])
    ids = prompt(loaded, "おはよう")
    engine.add(EngineRequest("late", ids, SamplingParams(max_tokens=8), deadline=99.0))
    engine.add(EngineRequest("gone", ids, SamplingParams(max_tokens=8)))
    [late] = [o for o in engine.step() if o.key == "late"]
    assert late.finish_reason == "abort" and late.finished and "deadline" in late.error
    assert engine.busy == 1 and engine.cancel("gone") and engine.busy == 0 and not engine.cancel("gone")


def test_a_persona_request_carries_the_settings_and_the_requests_own_values():
    settings = GenerationSettings(max_new_tokens=40, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.1)
    request = persona_request("k", [1, 2], settings.sampling(temperature=0.0, seed=3, stop=("。",)), ["健太"])
    assert request.sampling == SamplingParams(max_tokens=40, temperature=0.0, top_p=0.9, top_k=50,
                                              repetition_penalty=1.1, seed=3, stop=("。",))
    assert request.stop_rule("ひま\n健太: うん") == 2


def test_the_scheduler_mixes_prompt_chunks_into_decode_steps_within_its_token_budget():
    from engine.scheduler import Scheduler

    mixed = Scheduler(8, chunk_tokens=100)
    assert mixed.next_step([300], running=0, free=3).prefill == 1  # nobody decodes: whole prompts, graphed
    assert mixed.next_step([], running=2, free=3).chunks == [] and mixed.next_step([], running=2, free=3).prefill == 0
    assert mixed.next_step([30, 50, 40], running=2, free=1).chunks == [30, 50, 20]  # oldest first, 100 tokens in all
    assert mixed.next_step([250, 10], running=1, free=1).chunks == [100]  # a long prompt in chunks
    # A prompt begun in chunks goes on in chunks when the replies it rode with have all finished.
    assert mixed.next_step([150], running=0, free=1, begun=1).chunks == [100]
    separate = Scheduler(8, mixed=False)
    decision = separate.next_step([30], running=2, free=3)
    assert (decision.prefill, decision.chunks) == (0, [])  # waits a few steps for company
    with pytest.raises(ValueError):
        Scheduler(8, chunk_tokens=0)


def test_a_prompt_cancelled_or_expired_halfway_through_its_chunks_frees_its_slot_and_keeps_what_it_wrote(loaded):
    now = [100.0]
    codec = ReplyCodec(loaded.tokenizer)
    engine = SlotEngine(loaded.model, codec, slots=3, length=96, clock=lambda: now[0], chunk_tokens=9)
    running = EngineRequest("running", prompt(loaded, "おはよう"), SamplingParams(max_tokens=40))
    engine.add(running)
    engine.step()  # prefilled alone: it decodes from now on
    long_prompt = prompt(loaded, "ねえねえ、昨日のテレビ見た?めっちゃ面白かった")
    assert len(long_prompt) > 18
    engine.add(EngineRequest("cancelled", long_prompt, SamplingParams(max_tokens=8)))
    engine.add(EngineRequest("expiring", long_prompt[:-1], SamplingParams(max_tokens=8), deadline=101.0))
    engine.step()
    engine.step()  # two mixed steps: the oldest prompt's first 18 tokens (9 a step); the other has not begun
    assert engine.timing["mixed_steps"] == 2 and engine.busy == 3
    assert engine.cancel("cancelled") and engine.busy == 2
    now[0] = 102.0
    [expired] = [o for o in engine.step() if o.key == "expiring"]
    assert expired.finish_reason == "abort" and engine.busy == 1
    # Both slots are free again; the cancelled prompt's holds the 18 tokens its chunks wrote (MIN_REUSE is 16), which
    # a later prompt reuses.
    assert sorted(engine._cached[1:]) == [[], long_prompt[:18]]
    reused = engine.reused_tokens
    expected = {o.key: o for o in generate_outputs(loaded.model, loaded.tokenizer, [
        EngineRequest("again", long_prompt, SamplingParams(max_tokens=8))])}["again"]
    outputs = run(engine, [EngineRequest("again", long_prompt, SamplingParams(max_tokens=8))])["again"]
    assert outputs[-1].token_ids == expected.token_ids and engine.reused_tokens == reused + 18
