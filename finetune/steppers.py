"""What the worker's thread drives: a stepper takes admitted requests and reports their outputs.

- `EngineStepper`: the slot engine (engine/slot_engine.py). Each step decodes one token for every admitted reply
  (or prefills the newly admitted); a request can be admitted whenever a slot is free, and a streamed one reports
  its new text every step.
- `BatchStepper`: any backend with `generate(conversations)`: one step generates everything admitted as one batch
  (plain `generate()`, or a test's or benchmark's stand-in); each reply comes whole, as one output.
- `RemoteStepper` (bot/remote_engine.py): each admitted request is an HTTP request to an engine elsewhere; a step
  returns the replies that came back.

`admit` takes a request's own sampling values (`sampling`: max_tokens, temperature, top_p, seed, stop, ... as
`GenerationSettings.sampling` takes them; the rest come from the adapter's settings) and whether it streams. `step`
returns `engine.request.EngineOutput`s whose `key` is what was admitted; the last of each has `finished` set, its
`full_text` the reply as a chat partner sees it (stripped) and its finish reason. Keys are the worker's request
objects; a stepper never looks inside them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from engine.request import EngineOutput

from .prompt import ChatTurn, MemoryNote


class Stepper(Protocol):
    capacity: int  # requests it can hold at once

    @property
    def busy(self) -> int: ...  # requests admitted and not yet finished

    # `memory`: notes recalled for this reply (the persona's memory, older turns of the chat), shown before it.
    def admit(self, key, turns: list[ChatTurn], memory: Sequence[MemoryNote] = (),
              sampling: Mapping[str, object] | None = None, stream: bool = False) -> None: ...

    def step(self) -> list[EngineOutput]: ...

    def cancel(self, key) -> None: ...  # its client went away: stop working on it (no output comes for it)

    # After a failed step: forget the requests it failed and return their keys: every admitted one (local steppers);
    # RemoteStepper's requests fail one at a time (a step raises GenerationFailed for one), the rest go on.
    def abort(self) -> list: ...

    def release(self) -> None: ...  # done with it: the model goes back to how it was before


def finished_output(key, text: str, tokens: int, prompt_tokens: int = 0, reason: str = "stop") -> EngineOutput:
    """A whole reply as one last output."""
    return EngineOutput(key, [], text, True, reason, prompt_tokens, tokens, text)


class BatchStepper:
    def __init__(self, backend, capacity: int, seed: int | None = None) -> None:
        self.backend = backend
        self.capacity = capacity
        self._admitted: list[tuple[object, list[ChatTurn], Sequence[MemoryNote], Mapping | None]] = []
        if seed is not None:  # generate() draws from torch's global generator
            import torch

            torch.manual_seed(seed)

    @property
    def busy(self) -> int:
        return len(self._admitted)

    def admit(self, key, turns: list[ChatTurn], memory: Sequence[MemoryNote] = (),
              sampling: Mapping[str, object] | None = None, stream: bool = False) -> None:
        self._admitted.append((key, turns, memory, sampling))

    def step(self) -> list[EngineOutput]:
        if not self._admitted:
            return []
        admitted = self._admitted  # kept until the batch is done: after a failure abort() hands their keys back
        make_request = getattr(self.backend, "request", None)
        if make_request is not None:  # a ModelBackend: each request with its own sampling, stops and counts
            requests = [make_request(key, turns, memory, sampling) for key, turns, memory, sampling in admitted]
            outputs = self.backend.generate_requests(requests)
            for output in outputs:
                output.full_text = output.text = (output.full_text or "").strip()
            self._admitted = []
            return outputs
        # A stand-in backend of a test or benchmark: conversations in, (text, tokens) out; it may know nothing of
        # memory, and is only asked about it when there is some.
        conversations = [turns for _, turns, _, _ in admitted]
        memories = [memory for _, _, memory, _ in admitted]
        results = (self.backend.generate(conversations, memories) if any(memories)
                   else self.backend.generate(conversations))
        self._admitted = []
        return [finished_output(key, text, tokens) for (key, *_), (text, tokens) in zip(admitted, results, strict=True)]

    def cancel(self, key) -> None:
        self._admitted = [a for a in self._admitted if a[0] is not key]

    def abort(self) -> list:
        keys = [key for key, *_ in self._admitted]
        self._admitted = []
        return keys

    def release(self) -> None:
        self._admitted = []


class EngineStepper:
    """A ModelBackend's prompt building in front of a SlotEngine."""

    def __init__(self, backend, engine) -> None:
        self.backend = backend
        self.engine = engine
        self.capacity = engine.slots

    @property
    def busy(self) -> int:
        return self.engine.busy

    def admit(self, key, turns: list[ChatTurn], memory: Sequence[MemoryNote] = (),
              sampling: Mapping[str, object] | None = None, stream: bool = False) -> None:
        self.engine.add(self.backend.request(key, turns, memory, sampling, stream))

    def step(self) -> list[EngineOutput]:
        outputs = self.engine.step()
        for output in outputs:
            if output.finished:
                output.full_text = (output.full_text or "").strip()
        return outputs

    def cancel(self, key) -> None:
        self.engine.cancel(key)

    def abort(self) -> list:
        return self.engine.abort()

    def release(self) -> None:
        self.engine.detach()
