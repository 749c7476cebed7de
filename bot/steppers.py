"""What the worker's thread drives: a stepper takes admitted requests and reports finished replies.

- `EngineStepper`: the slot engine. Each step decodes one token for every admitted chat (or
  prefills the newly admitted); a request can be admitted whenever a slot is free.
- `BatchStepper`: any backend with `generate(conversations)`: one step generates everything
  admitted as one batch (plain `generate()`, or a test's or benchmark's stand-in).
- `RemoteStepper` (remote_engine.py): each admitted request is an HTTP request to an engine
  elsewhere; a step returns the replies that came back.

Keys are the worker's request objects; a stepper never looks inside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from finetune.prompt import ChatTurn, MemoryNote


class Stepper(Protocol):
    capacity: int  # requests it can hold at once

    @property
    def busy(self) -> int: ...  # requests admitted and not yet finished

    # `memory`: notes recalled for this reply (the persona's memory, older turns of the chat), shown before it.
    def admit(self, key, turns: list[ChatTurn], memory: Sequence[MemoryNote] = ()) -> None: ...

    def step(self) -> list[tuple[object, str, int]]:  # (key, reply text, tokens generated) that finished
        ...

    # After a failed step: forget the requests it failed and return their keys: every admitted one (local steppers);
    # RemoteStepper's requests fail one at a time (a step raises GenerationFailed for one), the rest go on.
    def abort(self) -> list: ...

    def release(self) -> None: ...  # done with it: the model goes back to how it was before


class BatchStepper:
    def __init__(self, backend, capacity: int, seed: int | None = None) -> None:
        self.backend = backend
        self.capacity = capacity
        self._admitted: list[tuple[object, list[ChatTurn], Sequence[MemoryNote]]] = []
        if seed is not None:  # generate() draws from torch's global generator
            import torch

            torch.manual_seed(seed)

    @property
    def busy(self) -> int:
        return len(self._admitted)

    def admit(self, key, turns: list[ChatTurn], memory: Sequence[MemoryNote] = ()) -> None:
        self._admitted.append((key, turns, memory))

    def step(self) -> list[tuple[object, str, int]]:
        if not self._admitted:
            return []
        conversations = [turns for _, turns, _ in self._admitted]
        memories = [memory for _, _, memory in self._admitted]
        # A stand-in backend of a test or benchmark may know nothing of memory; it is only asked when there is some.
        results = (self.backend.generate(conversations, memories) if any(memories)
                   else self.backend.generate(conversations))
        finished = [(key, text, tokens) for (key, _, _), (text, tokens) in zip(self._admitted, results, strict=True)]
        self._admitted = []
        return finished

    def abort(self) -> list:
        keys = [key for key, _, _ in self._admitted]
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

    def admit(self, key, turns: list[ChatTurn], memory: Sequence[MemoryNote] = ()) -> None:
        self.engine.add(key, self.backend.prompt_ids(turns, memory), self.backend.speakers_in(turns))

    def step(self) -> list[tuple[object, str, int]]:
        return [(f.key, f.text, f.tokens) for f in self.engine.step()]

    def abort(self) -> list:
        return self.engine.abort()

    def release(self) -> None:
        self.engine.detach()
