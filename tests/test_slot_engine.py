"""The slot engine (continuous batching over a static KV cache) against plain `generate()`.

Greedy decoding must give the same tokens as `model.generate()` on the same prompt, however the
prompts share the engine: more prompts than slots, admitted while others are mid-reply, with
and without repetition penalty, on each model family `tiny-model` builds: the rinna-shaped GPT-NeoX,
a Llama and a Qwen2 with grouped-query attention (other rotary layouts, other cache shapes), their
prompts starting with BOS where the family's tokenizer puts one, and on tiny Gemma 3 and Mistral
models whose sliding windows are shorter than the prompts. All on the CPU in fp32; CUDA graphs
are the same forward pass captured, and the GPU benchmark checks them.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from conftest import FAMILIES

from bot.metrics import BotMetrics
from bot.worker import Worker
from engine.detokenizer import Detokenizer
from engine.slot_engine import SlotEngine
from finetune.generation import GenerationSettings, ReplyCodec, generate_replies, persona_request
from finetune.model_backend import ModelBackend
from finetune.model_loading import LoadedModel, load_base_model, load_persona_model
from finetune.prompt import ChatTurn, prefix_ids, turn_end
from finetune.steppers import BatchStepper, EngineStepper
from finetune.tiny_model import build_tiny_model
from tests.support.turn_taking_model import EXCHANGES, FRIEND, PERSONA, build_turn_taking_model, prompt_ids

PROMPTS = ["こんにちは、元気?", "明日は雨らしいよ。どうする", "うん", "ねえねえ、昨日のテレビ見た?めっちゃ面白かった",
           "写真送るね", "今夜予約しておくね、7時でいい?"]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_base_model(str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")), device="cpu")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tiny_base):
    """Each model family's tiny base (tests/conftest.py), loaded."""
    return load_base_model(str(tiny_base(request.param)), device="cpu")


def served_ids(tokenizer, text: str) -> list[int]:
    """`text` as a prompt's ids: BOS first where the family's tokenizer puts one (prompt.encode_prompt does the same)."""
    return prefix_ids(tokenizer) + tokenizer.encode(tokenizer.to_model_text(text))


def plain_greedy(model, tokenizer, prompt: list[int], settings: GenerationSettings) -> list[int]:
    """What generate() makes of one prompt alone (no padding), EOS removed."""
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=settings.max_new_tokens, do_sample=False,
                         repetition_penalty=settings.repetition_penalty, eos_token_id=tokenizer.eos_id,
                         pad_token_id=tokenizer.pad_id)
    row = out[0, len(prompt):].tolist()
    return row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row


class OneSetting:
    """The slot engine as these tests drive it: every request with the same settings (`add(key, prompt, speakers)`),
    `step()` giving the finished outputs only."""

    def __init__(self, model, tokenizer, settings: GenerationSettings, **options) -> None:
        self.engine = SlotEngine(model, ReplyCodec(tokenizer), **options)
        self.settings = settings

    def add(self, key, prompt: list[int], speakers=()) -> None:
        self.engine.add(persona_request(key, prompt, self.settings.sampling(), speakers))

    def step(self):
        return [output for output in self.engine.step() if output.finished]

    def __getattr__(self, name):
        return getattr(self.engine, name)


def slot_engine(model, tokenizer, settings: GenerationSettings, **options) -> OneSetting:
    return OneSetting(model, tokenizer, settings, **options)


def run_staggered(engine: OneSetting, prompts: list[list[int]], join_every: int = 3) -> dict[int, list[int]]:
    """Feed prompts one every `join_every` steps (so each joins a batch already decoding) and
    return every row's generated tokens (the reply text is cut at a turn; the raw tokens are not)."""
    tokens: dict[int, list[int]] = {}
    waiting = list(enumerate(prompts))
    steps = 0
    while waiting or engine.busy:
        if waiting and engine.free and steps % join_every == 0:
            key, prompt = waiting.pop(0)
            engine.add(key, prompt)
        for finished in engine.step():
            tokens[finished.key] = finished.token_ids
        steps += 1
        assert steps < 10_000
    return tokens


# How a prompt that arrives while others decode is computed: in a separate prefill step, in one mixed step with
# the decoding rows' tokens, or in chunks of 3 tokens over several mixed steps.
STEP_KINDS = {"separate": {"mixed": False}, "mixed": {}, "chunks-of-3": {"chunk_tokens": 3}}


@pytest.mark.parametrize("steps", sorted(STEP_KINDS))
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_tokens_equal_plain_generate_with_prompts_joining_mid_batch(family, penalty, steps):
    tokenizer, model = family.tokenizer, family.model
    settings = GenerationSettings(max_new_tokens=24, temperature=0.0, repetition_penalty=penalty)
    prompts = [served_ids(tokenizer, p) for p in PROMPTS]
    expected = [plain_greedy(model, tokenizer, p, settings) for p in prompts]
    engine = slot_engine(model, tokenizer, settings, slots=4, length=96, **STEP_KINDS[steps])
    # The cache holds the model's key/value heads (2 for the 4 query heads of the GQA families), not its query heads.
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    assert engine.cache.keys[0].shape[1] == kv_heads
    assert (kv_heads < config.num_attention_heads) == (config.model_type != "gpt_neox")
    got = run_staggered(engine, prompts)
    assert [got[i] for i in range(len(prompts))] == expected
    assert sum(map(len, expected)) > 4 * len(prompts)  # replies long enough to overlap in the batch
    mixed = engine.timing["mixed_steps"]
    if steps == "separate":
        assert mixed == 0 and engine.timing["prefill_steps"] >= 2
    else:  # every prompt after the first joined running rows: computed in mixed steps, the first one alone
        assert engine.timing["prefill_steps"] == 1
        assert mixed >= (sum(map(len, prompts[1:])) / 3 if steps == "chunks-of-3" else len(prompts) - 1)


@pytest.fixture(scope="module")
def turn_taker(tmp_path_factory):
    """A tiny model trained to write 美咲's line and then 翔太's next turn (tests/support/turn_taking_model.py)."""
    return build_turn_taking_model(tmp_path_factory.mktemp("turn-taker"))


def test_reply_text_equals_generate_replies_when_a_reply_ends_at_another_speakers_turn(turn_taker):
    tokenizer, model = turn_taker.tokenizer, turn_taker.model
    settings = GenerationSettings(max_new_tokens=40, temperature=0.0, repetition_penalty=1.0)
    prompts = [prompt_ids(tokenizer, message) for message, _ in EXCHANGES]
    speakers = (FRIEND, PERSONA)
    expected = [generate_replies(model, tokenizer, [p], settings, speakers)[0] for p in prompts]
    engine = slot_engine(model, tokenizer, settings, slots=3, length=128)
    waiting = list(enumerate(prompts))
    finished = {}
    while waiting or engine.busy:
        while waiting and engine.free:
            key, prompt = waiting.pop(0)
            engine.add(key, prompt, speakers)
        for f in engine.step():
            finished[f.key] = f
    for i, (_, reply) in enumerate(EXCHANGES):
        ids = finished[i].token_ids  # what the row generated, uncut
        raw = tokenizer.from_model_text(tokenizer.decode(ids))
        cut = turn_end(raw, speakers)
        # The model wrote its line and began 翔太's turn...
        assert cut is not None and raw[:cut] == reply and raw[cut:].startswith(f"\n{FRIEND}: "), raw
        # ...and the row ended at the token that completed `\n翔太: ` (` ` alone, or a piece like ` おはよう`),
        # not at max_new_tokens.
        assert turn_end(tokenizer.from_model_text(tokenizer.decode(ids[:-1])), speakers) is None, raw
        assert len(ids) < settings.max_new_tokens
        # The text sent is cut before the turn, and is what plain generation gives, which stops at the same token.
        assert finished[i].full_text.strip() == reply
        assert expected[i] == (reply, len(ids))


def test_sampling_with_top_k_1_or_a_tiny_top_p_is_greedy(loaded):
    tokenizer, model = loaded.tokenizer, loaded.model
    prompts = [tokenizer.encode(tokenizer.to_model_text(p)) for p in PROMPTS[:3]]
    greedy = GenerationSettings(max_new_tokens=16, temperature=0.0, repetition_penalty=1.1)
    expected = [plain_greedy(model, tokenizer, p, greedy) for p in prompts]
    for sampled in (GenerationSettings(max_new_tokens=16, temperature=1.5, top_k=1, top_p=1.0, repetition_penalty=1.1),
                    GenerationSettings(max_new_tokens=16, temperature=0.7, top_k=0, top_p=1e-6, repetition_penalty=1.1)):
        engine = slot_engine(model, tokenizer, sampled, slots=2, length=64, seed=1)
        got = run_staggered(engine, prompts, join_every=2)
        assert [got[i] for i in range(len(prompts))] == expected


def test_sampled_replies_differ_by_seed_and_repeat_with_the_same_seed(loaded):
    tokenizer, model = loaded.tokenizer, loaded.model
    settings = GenerationSettings(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.0)
    prompts = [tokenizer.encode(tokenizer.to_model_text(p)) for p in PROMPTS[:3]]

    def sample(seed):
        return run_staggered(slot_engine(model, tokenizer, settings, slots=3, length=64, seed=seed), prompts, join_every=1)

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_an_architecture_outside_the_families_gives_the_same_greedy_tokens(loaded):
    """Phi-3 (one fused qkv projection, grouped-query attention), with the gpt_neox tokenizer as a stand-in: the
    engine reads each layer's key shape from the model, not from a list of architectures."""
    from transformers import Phi3Config, Phi3ForCausalLM

    tokenizer = loaded.tokenizer
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(vocab_size=loaded.model.config.vocab_size, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=256, bos_token_id=tokenizer.bos_id,
                                       eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                                       attn_implementation="sdpa")).eval()
    settings = GenerationSettings(max_new_tokens=20, temperature=0.0, repetition_penalty=1.0)
    prompts = [tokenizer.encode(tokenizer.to_model_text(p)) for p in PROMPTS[:4]]
    expected = [plain_greedy(model, tokenizer, p, settings) for p in prompts]
    engine = slot_engine(model, tokenizer, settings, slots=2, length=64)
    assert engine.cache.keys[0].shape[1] == 2  # the cache holds the 2 key/value heads, not 4
    got = run_staggered(engine, prompts)
    assert [got[i] for i in range(len(prompts))] == expected


def tiny_gemma3(vocab: int, tokenizer, window: int = 8):
    """Gemma 3's attention in miniature: sliding-window layers around a global one, one key/value head, queries
    scaled by query_pre_attn_scalar (not head_dim), q/k norms, tied embeddings, soft-capped final logits."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=24,
                              sliding_window=window, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                              max_position_embeddings=256, final_logit_softcapping=30.0, attn_implementation="sdpa",
                              bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return Gemma3ForCausalLM(config).eval()


def tiny_mistral(vocab: int, window: int = 8):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=window, attn_implementation="sdpa")
    return MistralForCausalLM(config).eval()


@pytest.mark.parametrize("steps", sorted(STEP_KINDS))
@pytest.mark.parametrize("make_model", [tiny_gemma3, tiny_mistral], ids=["gemma3", "mistral"])
def test_sliding_window_models_give_generates_tokens_past_the_window(loaded, make_model, steps):
    """Every prompt is longer than the 8-token window and every reply goes on past it: prefill, decode, mixed steps
    (a chunk's queries each with its own window) and a follow-up's extension all attend to the window only, as
    generate() does."""
    tokenizer = loaded.tokenizer
    model = make_model(loaded.model.config.vocab_size, tokenizer) if make_model is tiny_gemma3 else make_model(
        loaded.model.config.vocab_size)
    settings = GenerationSettings(max_new_tokens=20, temperature=0.0, repetition_penalty=1.0)
    encode = lambda text: tokenizer.encode(tokenizer.to_model_text(text))  # noqa: E731
    firsts = [encode(f"翔太: {p}\n美咲: ") for p in PROMPTS[:4]]
    assert min(map(len, firsts)) > 8
    engine = slot_engine(model, tokenizer, settings, slots=2, length=128, **STEP_KINDS[steps])
    replies = run_staggered(engine, firsts)
    assert [replies[i] for i in range(4)] == [plain_greedy(model, tokenizer, p, settings) for p in firsts]
    # The two chats whose caches the two slots still hold come back with another message.
    follow_ups = [firsts[i] + replies[i] + encode(f"\n翔太: {PROMPTS[2 + i]}\n美咲: ") for i in (2, 3)]
    got = run_staggered(engine, follow_ups, join_every=1)
    assert [got[i] for i in range(2)] == [plain_greedy(model, tokenizer, p, settings) for p in follow_ups]
    assert engine.reused_tokens > 0  # the follow-ups went through the extension path
    assert (engine.timing["mixed_steps"] > 0) == (steps != "separate")
    # Without the window the logits differ: the test would see a slot engine that ignored it.
    prompt = firsts[0] + replies[0]
    with torch.no_grad():
        windowed = model(input_ids=torch.tensor([prompt])).logits[0, -1]
        model.config.sliding_window = 10_000
        unwindowed = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    assert not torch.allclose(windowed, unwindowed, atol=1e-4)


def test_a_model_the_engine_cannot_serve_falls_back_to_plain_generate(loaded, caplog):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    # Gemma 2 soft-caps its attention scores (tanh), which SDPA cannot do.
    config = Gemma2Config(vocab_size=loaded.model.config.vocab_size, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          attn_logit_softcapping=50.0, attn_implementation="eager")
    gemma2 = LoadedModel(Gemma2ForCausalLM(config).eval(), loaded.tokenizer, "tiny-gemma2", None, "cpu", torch.float32)
    backend = ModelBackend.from_loaded(gemma2, persona="美咲", generation_overrides={"max_new_tokens": 8})
    stepper = backend.make_stepper(4)
    assert isinstance(stepper, BatchStepper)
    assert "soft-caps" in caplog.text and "plain batched generate()" in caplog.text
    assert gemma2.model.config._attn_implementation == "eager"  # the model is given back as it was
    [(text, tokens)] = stepper.backend.generate([[ChatTurn("翔太", "おはよう")]])
    assert 0 < tokens <= 8


def test_self_check_of_the_served_model_is_within_float32_rounding(loaded):
    settings = GenerationSettings(max_new_tokens=8, temperature=0.0)
    engine = slot_engine(loaded.model, loaded.tokenizer, settings, slots=2, length=64)
    assert engine.self_check(loaded.tokenizer.encode("おはよう")) < 1e-4
    assert engine.busy == 0  # the check leaves the engine idle


def test_a_merged_adapter_gives_the_unmerged_adapters_greedy_tokens(tmp_path):
    from peft import LoraConfig, get_peft_model

    from finetune.manifest import AdapterManifest
    from finetune.model_loading import lora_target_modules

    base_dir = build_tiny_model(tmp_path / "tiny")
    base = load_base_model(str(base_dir), device="cpu")
    torch.manual_seed(3)
    # init_lora_weights=False: random B matrices, so the adapter really changes the model.
    peft_model = get_peft_model(load_base_model(str(base_dir), device="cpu").model,
                                LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_modules(base.model),
                                           init_lora_weights=False))
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    AdapterManifest(base_model=str(base_dir), base_revision=None, base_shape={},
                    tokenizer_fingerprint=base.tokenizer.fingerprint, tokenizer_backend="sentencepiece",
                    newline="<NL>", template="transcript", persona="美咲", max_length=128,
                    speakers=["美咲", "翔太"]).write(adapter_dir / "bunshin.json")
    unmerged = load_persona_model(adapter_dir, device="cpu")
    merged = load_persona_model(adapter_dir, device="cpu", merge=True)
    assert not hasattr(merged.model, "peft_config")  # a plain transformers model now: no LoRA per token
    prompt = base.tokenizer.encode(base.tokenizer.to_model_text("翔太: 明日ひま?\n美咲: "))
    with torch.no_grad():
        logits = [m(input_ids=torch.tensor([prompt])).logits for m in (base.model, unmerged.model, merged.model)]
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)  # the adapter matters...
    torch.testing.assert_close(logits[2], logits[1], atol=1e-4, rtol=1e-4)  # ...and merging keeps it
    settings = GenerationSettings(max_new_tokens=16, temperature=0.0, repetition_penalty=1.0)
    expected = plain_greedy(unmerged.model, unmerged.tokenizer, prompt, settings)
    engine = slot_engine(merged.model, merged.tokenizer, settings, slots=1, length=64)
    assert run_staggered(engine, [prompt])[0] == expected


async def test_the_worker_serves_through_the_engine_and_answers_like_plain_generation(loaded):
    backend = ModelBackend.from_loaded(loaded, persona="美咲", template="transcript",
                                       generation_overrides={"max_new_tokens": 12, "temperature": 0.0})
    chats = [[ChatTurn("翔太", p)] for p in PROMPTS]
    expected = backend.generate(chats[:1]) + backend.generate(chats[1:3]) + backend.generate(chats[3:])
    worker = Worker(backend, BotMetrics(), max_queue=16, max_batch=3)
    await worker.start()
    assert isinstance(worker.stepper, EngineStepper)
    futures = []
    for turns in chats:  # arriving over time, not all at once
        futures.append(worker.submit(turns, deadline=time.monotonic() + 60, received=time.monotonic()))
        await asyncio.sleep(0.01)
    replies = await asyncio.gather(*futures)
    await worker.stop(5)
    assert [(r.text, r.tokens) for r in replies] == [tuple(e) for e in expected]


def test_a_row_ends_as_soon_as_the_model_starts_another_speakers_turn(loaded):
    """The random tiny model never writes a turn, so the turn's tokens are fed to the row as if chosen."""
    tokenizer = loaded.tokenizer
    settings = GenerationSettings(max_new_tokens=64, temperature=0.0)
    engine = SlotEngine(loaded.model, ReplyCodec(tokenizer), slots=1, length=128)
    engine.add(persona_request("chat", tokenizer.encode(tokenizer.to_model_text("翔太: 明日ひま?\n美咲: ")),
                               settings.sampling(), ("翔太", "美咲")))
    engine.step()  # prefill: the row now holds its first token
    [(slot, row)] = engine._rows.items()
    row.tokens.clear()
    row.detokenizer = Detokenizer(row.request, engine.codec.text)
    reply = tokenizer.encode(tokenizer.to_model_text("ひまだよ!\n翔太: じゃあ"))
    for ended_at, token in enumerate(reply):  # noqa: B007 - read after the loop: where the reply stopped
        output = engine._take(slot, row, token)
        if output is not None:
            break
    text = tokenizer.from_model_text(tokenizer.decode(reply[: ended_at + 1]))
    assert text.endswith(": ") or text.endswith(":")  # it stops at the turn's colon, not later
    assert output.finished and output.finish_reason == "stop"
    assert output.full_text.strip() == "ひまだよ!"


def test_a_follow_up_message_reuses_its_chats_cache_and_still_gives_generates_tokens(family):
    """A chat's next prompt is its last prompt + the reply + a new turn: only the new part is computed,
    while other chats come and go in the other slots, and the tokens are still generate()'s."""
    tokenizer, model = family.tokenizer, family.model
    settings = GenerationSettings(max_new_tokens=12, temperature=0.0, repetition_penalty=1.3)
    engine = slot_engine(model, tokenizer, settings, slots=3, length=192)
    encode = lambda text: tokenizer.encode(tokenizer.to_model_text(text))  # noqa: E731
    firsts = [served_ids(tokenizer, f"翔太: {p}\n美咲: ") for p in PROMPTS[:3]]
    replies = run_staggered(engine, firsts, join_every=2)
    follow_ups = [firsts[i] + replies[i] + encode(f"\n翔太: {PROMPTS[3 + i]}\n美咲: ") for i in range(3)]
    prefilled_before = engine.prefilled_tokens
    got = run_staggered(engine, follow_ups, join_every=2)
    assert [got[i] for i in range(3)] == [plain_greedy(model, tokenizer, p, settings) for p in follow_ups]
    new_tokens = sum(len(f) - len(firsts[i]) - len(replies[i]) for i, f in enumerate(follow_ups))
    # Each follow-up computed its new turn and the one reply token that was never fed back, nothing more.
    assert engine.prefilled_tokens - prefilled_before <= new_tokens + 3
    assert engine.reused_tokens >= sum(len(f) for f in firsts)
    assert engine.timing["mixed_steps"] > 0  # follow-ups joined running rows: their reuse went through mixed steps


def test_a_prompt_that_changed_at_the_start_is_computed_whole(loaded):
    tokenizer, model = loaded.tokenizer, loaded.model
    settings = GenerationSettings(max_new_tokens=8, temperature=0.0, repetition_penalty=1.0)
    engine = slot_engine(model, tokenizer, settings, slots=2, length=160)
    first = tokenizer.encode(tokenizer.to_model_text("翔太: " + PROMPTS[3] + "\n美咲: "))
    run_staggered(engine, [first])
    changed = [first[1]] + first  # memory dropped or added something before: no common prefix
    got = run_staggered(engine, [changed])
    assert got[0] == plain_greedy(model, tokenizer, changed, settings)
    assert engine.reused_tokens == 0


async def test_a_failed_step_of_the_real_engine_fails_its_requests_and_the_next_is_answered(loaded):
    """The production stepper (the slot engine, not a stand-in with `generate`) meets an injected failure:
    `abort()` must hand back every request in flight, or they would wait forever."""
    backend = ModelBackend.from_loaded(loaded, persona="美咲", generation_overrides={"max_new_tokens": 4})
    worker = Worker(backend, BotMetrics(), max_queue=8, max_batch=4)
    await worker.start()
    assert worker.stepper.__class__.__name__ == "EngineStepper"
    armed = {"calls": 1}

    def fail_once(module, args, kwargs):
        if armed["calls"]:
            armed["calls"] -= 1
            raise RuntimeError("injected failure")

    hook = loaded.model.register_forward_pre_hook(fail_once, with_kwargs=True)
    try:
        now = time.monotonic()
        futures = [worker.submit([ChatTurn("翔太", f"メッセージ{i}")], deadline=now + 30, received=now) for i in range(2)]
        results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
        assert all(type(r).__name__ == "GenerationFailed" for r in results), results
        reply = await asyncio.wait_for(worker.submit([ChatTurn("翔太", "もう一度")], deadline=time.monotonic() + 30,
                                                      received=time.monotonic()), 10)
        assert reply.tokens > 0
    finally:
        hook.remove()
        await worker.stop(5)


@pytest.mark.parametrize("mixed", [True, False])
def test_the_configs_mixed_steps_reach_the_engines_scheduler(tmp_path, mixed):
    """`[model] mixed_steps` (config.toml) is how a deployment turns mixed steps off; the daemon builds the engine."""
    from bot.daemon import load_backend
    from finetune.config import BotConfig

    base = build_tiny_model(tmp_path / "model")
    config = BotConfig.from_dict({"model": {"base": str(base), "device": "cpu", "mixed_steps": mixed},
                                  "persona": {"name": "美咲"}}, source="test.toml")
    stepper = load_backend(config).make_stepper(2, length=64)
    assert isinstance(stepper, EngineStepper) and stepper.engine.scheduler.mixed is mixed
    stepper.release()
