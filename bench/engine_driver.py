"""The slot engine (engine/slot_engine.py) as the benchmarks drive it: one GenerationSettings for every request.

`OneSetting(engine, settings)` adds prompts as persona requests with `settings` (which a measurement may replace
for the requests it adds) and gives the finished replies of each step as `Finished` (key, text, ids, tokens).
"""

from __future__ import annotations


class Finished:
    def __init__(self, output) -> None:
        self.key, self.text, self.ids = output.key, (output.full_text or "").strip(), output.token_ids
        self.tokens = output.completion_tokens


class OneSetting:
    def __init__(self, engine, settings) -> None:
        self.engine = engine
        self.settings = settings

    def add(self, key, prompt: list[int], speakers=()) -> None:
        from finetune.generation import persona_request

        self.engine.add(persona_request(key, prompt, self.settings.sampling(), speakers))

    def step(self) -> list[Finished]:
        return [Finished(o) for o in self.engine.step() if o.finished]

    def __getattr__(self, name):
        return getattr(self.engine, name)


def slot_engine(model, tokenizer, settings, **options) -> OneSetting:
    """A SlotEngine for `model` (options: slots, length, cuda_graphs, compile, seed) driven with `settings`."""
    from engine.slot_engine import SlotEngine
    from finetune.generation import ReplyCodec

    return OneSetting(SlotEngine(model, ReplyCodec(tokenizer), **options), settings)
