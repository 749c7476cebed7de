"""How a persona's model is prompted: the persona, template, generation settings, context budget, and the stepper.

The bot's worker (bot/worker.py) owns the queue and the thread, `finetune eval` and `finetune chat` their loops;
this owns what a conversation becomes for the model: its turns fitted into the prompt budget (generation.fit_context,
the renderer training used), an `EngineRequest` with the adapter's settings and the request's own values, and the
stepper that generates (the slot engine, warmed up and checked against plain generation at start, or plain batched
`generate()` where the engine cannot serve the model).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from engine.request import EngineOutput, EngineRequest, SamplingParams

from .generation import (
    GenerationSettings,
    ReplyCodec,
    fit_context,
    generate_outputs,
    generate_replies,
    persona_request,
    prompt_budget,
)
from .model_loading import LoadedModel
from .prompt import TEMPLATES, ChatTurn, MemoryNote, prefix_ids

log = logging.getLogger(__name__)


# Old turns that no longer fit the prompt go 4 at a time, so its start (and the engine's reuse of the
# chat's cached prompt) holds for several messages.
DROP_BLOCK = 4



@dataclass
class ModelBackend:
    """A loaded model and how to prompt it. `generate` blocks: the worker calls it in a thread."""

    loaded: LoadedModel
    persona: str
    template: str
    settings: GenerationSettings
    speakers: tuple[str, ...]  # names seen in training: a line starting with one ends the reply
    max_prompt_tokens: int  # the oldest turns are dropped to fit; room is left for the reply
    engine: str = "slots"  # "slots": continuous batching (slot_engine.py); "plain": batched generate()
    cuda_graphs: bool = True
    compile: bool = False  # torch.compile the decode step (GPU): faster steps after a longer warm-up
    profile: tuple[str, ...] = ()  # the persona's profile lines, at the top of every prompt ([memory] profile)
    # Prompts that arrive while replies decode are computed in the same forward passes (engine/scheduler.py);
    # off: in separate prefill steps, as before mixed steps (benchmarks compare the two).
    mixed_steps: bool = True

    @classmethod
    def from_loaded(
        cls,
        loaded: LoadedModel,
        persona: str | None = None,
        template: str | None = None,
        generation_overrides: dict | None = None,
        engine: str = "slots",
        cuda_graphs: bool = True,
        compile: bool = False,
        profile: Sequence[str] = (),
        mixed_steps: bool = True,
    ) -> ModelBackend:
        """An adapter (or merged model) brings persona, template and generation defaults in its manifest;
        a bare base model needs them given (persona at least)."""
        manifest = loaded.manifest
        overrides = dict(generation_overrides or {})
        unknown = set(overrides) - set(GenerationSettings.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown generation settings: {', '.join(sorted(unknown))}")
        if manifest is not None:
            # The adapter learned one voice in one layout: another persona or template would be
            # a prompt it never saw, so a conflicting argument is an error rather than ignored.
            for name, given, learned in (("persona", persona, manifest.persona), ("template", template, manifest.template)):
                if given is not None and given != learned:
                    raise ValueError(f"the adapter was trained with {name} {learned!r}, not {given!r}")
            persona, template = manifest.persona, manifest.template
            settings = GenerationSettings.from_manifest(manifest.generation, **overrides)
            speakers = tuple(manifest.speakers)
            # The whole context the model has (2048 for rinna), not only the length of the training samples:
            # a long chat keeps more of itself in the prompt. The cache is sized for it from free GPU memory.
            trained_length = manifest.max_length
        else:
            if not persona:
                raise ValueError("a base model without an adapter needs a persona name")
            template = template or "transcript"
            settings = GenerationSettings.from_manifest({}, **overrides)
            speakers = ()
            trained_length = None  # no adapter: the model's config must say its context
        if template not in TEMPLATES:
            raise ValueError(f"unknown prompt template {template!r}; known: {', '.join(TEMPLATES)}")
        budget = prompt_budget(loaded.model, settings.max_new_tokens, trained_length)
        if engine not in ("slots", "plain"):
            raise ValueError(f"unknown engine {engine!r}; choose slots or plain")
        return cls(loaded, persona, template, settings, speakers, budget, engine, cuda_graphs, compile, tuple(profile),
                   mixed_steps)

    def make_stepper(self, capacity: int, seed: int | None = None, length: int | None = None):
        """The slot engine with `capacity` slots, warmed up (CUDA graphs captured) and checked against
        plain generation; plain batched generate() when the engine is off or cannot serve this model.
        `seed` fixes the sampling (`finetune eval` compares systems on the same draws); `length` caps the
        cache rows where every prompt is known to be shorter (the eval's), for fewer graphs to capture."""
        from engine.slot_attention import UnsupportedModel
        from engine.slot_engine import SlotEngine

        from .steppers import BatchStepper, EngineStepper

        if self.engine == "plain":
            return BatchStepper(self, capacity, seed)

        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        started = time.monotonic()
        engine = None
        try:
            engine = SlotEngine(model, ReplyCodec(tokenizer), slots=capacity,
                                length=length or self.max_prompt_tokens + self.settings.max_new_tokens,
                                cuda_graphs=self.cuda_graphs,
                                compile=self.compile, seed=seed, mixed=self.mixed_steps)
            # Shaped like a served prompt: the BOS a Llama-style model always sees first, then text.
            probe = (prefix_ids(tokenizer) + tokenizer.encode(tokenizer.to_model_text("おはよう。今日は何する?\n")))[:32]
            difference = engine.self_check(probe)
            # fp32 agrees to rounding; bf16/fp16 (and k-bit bases computing in them) much less closely.
            tolerance = 1e-3 if engine.cache.keys[0].element_size() >= 4 else 5e-2
            if difference > tolerance:
                raise UnsupportedModel(f"its logits differ from plain generation by {difference:.2g} (allowed {tolerance:g})")
        except UnsupportedModel as exc:
            if engine is not None:
                engine.detach()
            log.warning("worker: the slot engine cannot serve this model (%s); using plain batched generate()", exc)
            return BatchStepper(self, capacity, seed)
        log.info("worker: slot engine ready in %.1fs: %s, %d CUDA graphs", time.monotonic() - started,
                 engine.describe_cache(), engine.graph_count)
        return EngineStepper(self, engine)

    def generate(self, conversations: list[list[ChatTurn]],
                 memories: Sequence[Sequence[MemoryNote]] | None = None) -> list[tuple[str, int]]:
        """(reply text, tokens generated) for each conversation, generated as one batch; `memories`: each
        conversation's recalled notes."""
        if not conversations:
            return []
        memories = memories or [()] * len(conversations)
        prompts = [self.prompt_ids(turns, memory) for turns, memory in zip(conversations, memories, strict=True)]
        speakers = self.speakers_in([t for turns in conversations for t in turns])
        return generate_replies(self.loaded.model, self.loaded.tokenizer, prompts, self.settings, speakers)

    def request(self, key, turns: Sequence[ChatTurn], memory: Sequence[MemoryNote] = (),
                sampling: Mapping[str, object] | None = None, stream: bool = False) -> EngineRequest:
        """The engine request for a reply to `turns`: the fitted prompt, the adapter's settings with the request's own
        values (`sampling`, as GenerationSettings.sampling takes them), ending where another speaker's turn begins.
        A reply may not run past the context: max_tokens above the settings' max_new_tokens is cut to it (the prompt
        budget leaves room for that many)."""
        return persona_request(key, self.prompt_ids(turns, memory), self.sampling(sampling), self.speakers_in(turns),
                               stream)

    def sampling(self, overrides: Mapping[str, object] | None = None) -> SamplingParams:
        """The adapter's settings with a request's own values; max_tokens no more than the settings' max_new_tokens
        (the prompt budget leaves room for that many, and no more)."""
        overrides = dict(overrides or {})
        if overrides.get("max_tokens") is not None:
            overrides["max_tokens"] = min(int(overrides["max_tokens"]), self.settings.max_new_tokens)
        return self.settings.sampling(**overrides)

    def generate_requests(self, requests: Sequence[EngineRequest]) -> list[EngineOutput]:
        """Each request's finished output, by plain batched `generate()` (texts not yet stripped)."""
        return generate_outputs(self.loaded.model, self.loaded.tokenizer, requests)

    def prompt_ids(self, turns: Sequence[ChatTurn], memory: Sequence[MemoryNote] = ()) -> list[int]:
        """The prompt for a conversation: the profile, its latest turns that leave room for the reply, and the
        recalled notes right before the reply (the start stays put, for the engine's reuse of it)."""
        return fit_context(self.loaded.tokenizer, turns, self.persona, self.template, self.max_prompt_tokens,
                           block=DROP_BLOCK, memory=memory, profile=self.profile)

    def speakers_in(self, turns: Sequence[ChatTurn]) -> list[str]:
        """Names whose `name: ` line ends a reply: the training's, and the people in these turns
        (the model may start a turn in their name)."""
        return sorted({*self.speakers, *(t.speaker for t in turns)})
