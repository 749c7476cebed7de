"""Continuous batching: every reply has a row ("slot") in a static KV cache and joins at the next step.

Plain `generate()` runs a batch until its longest reply is done, so a message that arrives meanwhile waits for the
whole batch, and each decoded token pays Python and kernel-launch overhead that leaves the GPU mostly idle. This
engine instead takes `EngineRequest`s at any time and, each `step()`:

1. lets the scheduler (scheduler.py) choose: prefill waiting prompts into free slots, or decode one token for every
   running reply;
2. has the model runner (model_runner.py) run that forward pass: through CUDA graphs, reusing the cached prefix a
   slot kept from the chat's previous message (slot_reuse.py);
3. chooses each row's token with its own sampling parameters in one batched pass (sampler.py);
4. turns each row's tokens into text as they come, ending the reply at an end token, a stop token, a stop string
   or the caller's stop rule, without a partial stop ever reaching the text (detokenizer.py);

and returns `EngineOutput`s: the new text of streamed requests, and every finished reply with its finish reason
and token counts. `step()` is synchronous and single-threaded: the bot's worker calls it in a loop in its own thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .detokenizer import Detokenizer
from .model_runner import ModelRunner
from .request import EngineOutput, EngineRequest, FinishReason
from .sampler import BatchParams, choose, row_generator
from .scheduler import CHUNK_TOKENS, Scheduler
from .slot_reuse import place


class TextCodec(Protocol):
    """What the engine needs of a tokenizer: the padding and end ids, and a reply's text from its ids."""

    pad_id: int
    eos_id: int | None

    def text(self, ids: list[int]) -> str: ...


@dataclass(eq=False)
class _Row:
    request: EngineRequest
    detokenizer: Detokenizer
    max_tokens: int  # the request's, or fewer where the cache row has less room
    generator: object = None  # the row's own, when its request has a seed
    tokens: list[int] = field(default_factory=list)  # generated, an end or stop token excluded
    generated: int = 0  # tokens of the reply (an end or stop token is not counted: bunshin's usage and metrics)
    reported: int = 0  # of `tokens`, how many an output carried already
    position: int = 0  # cache position the next fed token is written to
    trigger_seen: bool = False  # the latest token's text held a stop-rule trigger (':'): check the rule
    # A prompt computed in chunks by mixed steps: its slot from its first chunk on, and how many of its tokens the
    # slot's cache holds (a reused prefix counts).
    slot: int | None = None
    filled: int = 0

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_ids


class SlotEngine:
    def __init__(self, model, codec: TextCodec, *, slots: int, length: int, cuda_graphs: bool = True,
                 compile: bool = False, seed: int | None = None, clock: Callable[[], float] = time.monotonic,
                 mixed: bool = True, chunk_tokens: int = CHUNK_TOKENS) -> None:
        import torch

        self._torch = torch
        self.codec = codec
        self.runner = ModelRunner(model, codec.pad_id, slots=slots, length=length, cuda_graphs=cuda_graphs,
                                  compile=compile)
        self.scheduler = Scheduler(self.runner.prefill_buckets[-1], mixed=mixed, chunk_tokens=chunk_tokens)
        self.clock = clock
        self.device = self.runner.device
        slots = self.runner.slots
        self._seen = torch.zeros((slots, self.runner.vocab), dtype=torch.bool, device=self.device)
        # Per slot, the tokens whose keys and values its cache row holds from position 0 (what a finished
        # reply leaves behind for the chat's next message), and how much prompt work reuse has saved.
        self._cached: list[list[int]] = [[] for _ in range(slots)]
        self.prefilled_tokens = 0
        self.reused_tokens = 0
        self._generator = torch.Generator(device=self.device)  # the draws of rows without a seed of their own
        if seed is not None:
            self._generator.manual_seed(seed)
        else:
            self._generator.seed()
        self._triggers: dict[str, list[bool]] = {}
        self._triggers_for(":")  # the bot's stop rule's, built now rather than at the first request
        self._rows: dict[int, _Row] = {}  # slot -> row being decoded
        self._pending: list[_Row] = []  # admitted, prefilled at a coming step
        self._decode_params: BatchParams | None = None  # the decode batch's parameters while its rows stay the same
        # Where a step's time goes, for benchmarks (bench/generation_speed.py): seconds and steps of prefill and decode
        # (the forward pass and the choice of tokens, up to the point the tokens reach the host), and the host work
        # after it (each row's tokens, text and stops). The caller's time between steps is the rest of its wall time.
        self.timing = {"prefill_s": 0.0, "prefill_steps": 0, "decode_s": 0.0, "decode_steps": 0, "mixed_s": 0.0,
                       "mixed_steps": 0, "host_s": 0.0}

    # -- what the worker uses ---------------------------------------------------------------

    @property
    def slots(self) -> int:
        return self.runner.slots

    @property
    def length(self) -> int:
        return self.runner.length

    @property
    def cache(self):
        return self.runner.cache

    @property
    def graph_count(self) -> int:
        return self.runner.graph_count

    def describe_cache(self) -> str:
        return self.runner.describe_cache()

    @property
    def busy(self) -> int:
        return len(self._rows) + len(self._pending)

    @property
    def free(self) -> int:
        return self.slots - self.busy

    def add(self, request: EngineRequest) -> None:
        """Admit a request; it is prefilled at a coming step. Its prompt must leave room for one token."""
        if self.free < 1:
            raise RuntimeError("no free slot: check `free` before adding")
        prompt = request.prompt_ids
        if not prompt or len(prompt) >= self.length:
            raise ValueError(f"a prompt of {len(prompt)} tokens does not fit a cache of {self.length}")
        if request.adapter is not None:
            raise ValueError(f"this engine holds one adapter; request for {request.adapter!r} refused")
        room = self.length - len(prompt)
        self._triggers_for(request.stop_rule_triggers if request.stop_rule else "")
        self._pending.append(_Row(request, Detokenizer(request, self.codec.text), min(request.sampling.max_tokens, room),
                                  row_generator(request.sampling, self.device)))

    def step(self) -> list[EngineOutput]:
        """Prefill what was added, or decode one token for every running reply (the scheduler chooses); the outputs
        of this step: new text of streamed requests, finished replies, and requests aborted past their deadline."""
        outputs = self._expire()
        with self._torch.inference_mode():
            decision = self.scheduler.next_step([len(r.prompt) - r.filled for r in self._pending], len(self._rows),
                                                self.free, sum(r.slot is not None for r in self._pending))
            if decision.chunks:
                outputs += self._mixed(decision.chunks)
            elif decision.prefill:
                outputs += self._prefill(decision.prefill)
            elif self._rows:
                outputs += self._decode()
        return outputs

    def cancel(self, key) -> bool:
        """Stop a request (its client went away): its slot is free at once. False if it is not here."""
        for row in self._pending:
            if row.request.key is key:
                self._drop_pending(row)
                return True
        for slot, row in self._rows.items():
            if row.request.key is key:
                self._finish(slot, "abort")
                return True
        return False

    def detach(self) -> None:
        """Give the model back its own attention (when plain generate() takes over from this engine)."""
        self.abort()
        self.runner.detach()

    def abort(self) -> list:
        """Drop every row (after a failed step: the cache rows may be half-written); returns their keys."""
        keys = list({id(r): r.request.key for r in (*self._pending, *self._rows.values())}.values())  # each row once
        self._pending.clear()
        self._rows.clear()
        self._decode_params = None
        self._cached = [[] for _ in self._cached]  # nothing half-written may be reused
        return keys

    def self_check(self, prompt: list[int], steps: int = 3) -> float:
        """Largest relative logit difference between this engine's forward passes and plain ones (model_runner)."""
        if self.busy:
            raise RuntimeError("self_check needs an idle engine")
        try:
            return self.runner.self_check(prompt, steps)
        finally:
            self._cached[0] = []

    # -- prefill and decode -----------------------------------------------------------------

    def _expire(self) -> list[EngineOutput]:
        """Requests whose reply had not started by their deadline: aborted, never prefilled."""
        now = None
        expired = []
        for row in self._pending:
            if row.request.deadline is not None:
                now = self.clock() if now is None else now
                if row.request.deadline <= now:
                    expired.append(row)
        for row in expired:
            self._drop_pending(row)
        return [EngineOutput(r.request.key, finished=True, finish_reason="abort", prompt_tokens=r.request.prompt_tokens,
                             full_text="", error="the reply was not started before its deadline") for r in expired]

    def _prefill(self, count: int) -> list[EngineOutput]:
        rows, self._pending = self._pending[:count], self._pending[count:]
        try:
            return self._prefill_rows(rows)
        except BaseException:
            # Back where abort() finds them: the worker fails exactly the requests it gets from abort(),
            # and rows that were in neither list would wait for a reply forever.
            self._pending = rows + self._pending
            raise

    def _drop_pending(self, row: _Row) -> None:
        self._pending.remove(row)
        if row.slot is not None:  # begun in chunks: its slot holds the prompt's first tokens, and is free again
            self._cached[row.slot] = row.prompt[: row.filled]

    def _free_slots(self) -> list[int]:
        taken = set(self._rows) | {r.slot for r in self._pending if r.slot is not None}
        return [s for s in range(self.slots) if s not in taken]

    def _prefill_rows(self, rows: list[_Row]) -> list[EngineOutput]:
        started = time.perf_counter()
        torch = self._torch
        runner = self.runner
        placements = place([r.prompt for r in rows], self._free_slots(), self._cached, max_new=runner.max_extension)
        slots = [p.slot for p in placements]
        fresh = [i for i, p in enumerate(placements) if p.reused == 0]
        extended = [i for i, p in enumerate(placements) if p.reused > 0]
        parts, order = [], []
        if fresh:
            parts.append(runner.prefill([rows[i].prompt for i in fresh], [slots[i] for i in fresh]))
            order += fresh
        if extended:
            parts.append(runner.extend([rows[i].prompt for i in extended], [placements[i] for i in extended]))
            order += extended
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        if order != list(range(len(rows))):
            logits = logits[torch.tensor([order.index(i) for i in range(len(rows))], device=logits.device)]
        for row, placement in zip(rows, placements, strict=True):
            self.reused_tokens += placement.reused
            self.prefilled_tokens += len(row.prompt) - placement.reused
        chosen = self._choose_first(rows, slots, logits)
        tokens = chosen.tolist()  # waits for the GPU: the step's device work ends here
        self._timed("prefill", started)
        return self._started(rows, slots, tokens)

    def _choose_first(self, rows: list[_Row], slots: list[int], logits):
        """The first reply token of each prompt just computed (on the device); its slot's seen tokens set."""
        torch = self._torch
        dev = self.device
        # Every prompt token counts as seen (repetition penalty); padding repeats the first token.
        longest = max(len(r.prompt) for r in rows)
        ids = torch.tensor([r.prompt + [r.prompt[0]] * (longest - len(r.prompt)) for r in rows], device=dev)
        seen = torch.zeros((len(rows), self.runner.vocab), dtype=torch.bool, device=dev).scatter_(1, ids, True)
        params = BatchParams.of([r.request.sampling for r in rows], dev,
                                {i: r.generator for i, r in enumerate(rows) if r.generator is not None})
        chosen = choose(logits, seen, params, self._generator)
        seen[self.runner.row_index[: len(rows), 0], chosen] = True
        self._seen[torch.tensor(slots, device=dev)] = seen
        self._decode_params = None
        return chosen

    def _started(self, rows: list[_Row], slots: list[int], tokens: list[int]) -> list[EngineOutput]:
        """Rows whose prompt is computed join the decoding rows with their first token."""
        host_started = time.perf_counter()
        outputs = []
        for slot, row, token in zip(slots, rows, tokens, strict=True):
            row.position = len(row.prompt)
            row.slot = None  # a running row's slot is its key in _rows
            self._rows[slot] = row
            output = self._take(slot, row, token)
            if output is not None:
                outputs.append(output)
        self.timing["host_s"] += time.perf_counter() - host_started
        return outputs

    def _timed(self, kind: str, started: float) -> None:
        self.timing[f"{kind}_s"] += time.perf_counter() - started
        self.timing[f"{kind}_steps"] += 1

    def _feed(self) -> dict[int, tuple[int, int]]:
        return {slot: (row.tokens[-1], row.position) for slot, row in self._rows.items()}

    def _decode(self) -> list[EngineOutput]:
        started = time.perf_counter()
        batch, logits = self.runner.decode(self._feed())
        tokens = self._choose_next(batch, logits).tolist()  # waits for the GPU: the step's device work ends here
        self._timed("decode", started)
        return self._decoded(batch, tokens)

    def _choose_next(self, batch: int, logits):
        """Each decoding row's next token (on the device), from the logits of batch rows 0..batch-1."""
        rows = self._rows
        params = self._decode_params
        if params is None or params.temperature.shape[0] != batch:
            params = self._decode_params = BatchParams.of(
                [rows[s].request.sampling if s in rows else None for s in range(batch)], self.device,
                {s: rows[s].generator for s in range(batch) if s in rows and rows[s].generator is not None})
        seen = self._seen[:batch]
        chosen = choose(logits, seen, params, self._generator)
        seen[self.runner.row_index[:batch, 0], chosen] = True
        return chosen

    def _decoded(self, batch: int, tokens: list[int]) -> list[EngineOutput]:
        host_started = time.perf_counter()
        rows = self._rows
        outputs = []
        for slot, token in zip(range(batch), tokens, strict=True):
            row = rows.get(slot)
            if row is None:
                continue
            row.position += 1
            output = self._take(slot, row, token)
            if output is not None:
                outputs.append(output)
        self.timing["host_s"] += time.perf_counter() - host_started
        return outputs

    def _mixed(self, takes: list[int]) -> list[EngineOutput]:
        """One token for every decoding row and the next chunk of each of the first len(takes) waiting prompts, in
        one forward pass; prompts whose last chunk this was start their replies."""
        started = time.perf_counter()
        rows = self._pending[: len(takes)]
        beginning = [r for r in rows if r.slot is None]
        if beginning:
            for row, placement in zip(beginning, place([r.prompt for r in beginning], self._free_slots(), self._cached),
                                      strict=True):
                row.slot, row.filled = placement.slot, placement.reused
                self.reused_tokens += placement.reused
                self._cached[placement.slot] = []  # being overwritten: nothing there may be reused until it is done
        chunks = []
        for row, take in zip(rows, takes, strict=True):
            take = min(take, len(row.prompt) - row.filled)
            chunks.append((row.slot, row.prompt[row.filled: row.filled + take], row.filled))
        batch, decode_logits, chunk_logits = self.runner.mixed(self._feed(), chunks)
        for row, (_, ids, _) in zip(rows, chunks, strict=True):
            row.filled += len(ids)
            self.prefilled_tokens += len(ids)
        done = [i for i, row in enumerate(rows) if row.filled == len(row.prompt)]
        decoded = self._choose_next(batch, decode_logits) if batch and self._rows else None
        done_rows, done_slots = [rows[i] for i in done], [rows[i].slot for i in done]
        first = self._choose_first(done_rows, done_slots, chunk_logits[done]) if done else None
        # Both reads wait for the GPU: the step's device work ends with the first.
        tokens = decoded.tolist() if decoded is not None else []
        first_tokens = first.tolist() if first is not None else []
        self._timed("mixed", started)
        outputs = self._decoded(batch, tokens) if decoded is not None else []
        for row in done_rows:
            self._pending.remove(row)
        return outputs + self._started(done_rows, done_slots, first_tokens)

    def _take(self, slot: int, row: _Row, token: int) -> EngineOutput | None:
        """Add a chosen token to its row: an output when the row finished, or has new text to stream."""
        sampling = row.request.sampling
        if token == self.codec.eos_id or token in sampling.stop_token_ids:
            return self._finish(slot, "stop")
        row.generated += 1
        row.tokens.append(token)
        triggers = self._triggers.get(row.request.stop_rule_triggers if row.request.stop_rule else "")
        trigger = bool(triggers and triggers[token])
        # A turn is `\nname: `: the rule can only end the reply at a trigger (':') or the token after one.
        check, row.trigger_seen = row.trigger_seen or trigger, trigger
        text, stopped = row.detokenizer.add(token, check)
        if stopped:
            return self._finish(slot, "stop", text)
        if len(row.tokens) >= row.max_tokens:
            return self._finish(slot, "length", text)
        if text:
            new, row.reported = row.tokens[row.reported:], len(row.tokens)
            return EngineOutput(row.request.key, new, text, prompt_tokens=len(row.prompt),
                                completion_tokens=row.generated)
        return None

    def _finish(self, slot: int, reason: FinishReason, text: str = "") -> EngineOutput:
        row = self._rows.pop(slot)
        self._decode_params = None
        # What the row's cache holds now: the prompt and every generated token fed back so far (the last
        # token chosen was never fed). The chat's next message starts with most of it.
        self._cached[slot] = (row.prompt + row.tokens[: row.position - len(row.prompt)])[: self.length - 1]
        rest, whole = row.detokenizer.finish()
        # A request that did not stream gets every token here; a streamed one those since its last output.
        return EngineOutput(row.request.key, row.tokens[row.reported:], text + rest, True, reason, len(row.prompt),
                            row.generated, whole)

    def _triggers_for(self, characters: str) -> list[bool] | None:
        """For each token id, whether its text holds one of `characters` (built once per set of characters)."""
        if not characters:
            return None
        table = self._triggers.get(characters)
        if table is None:
            table = self._triggers[characters] = _token_flags(self.codec, self.runner.vocab, characters)
        return table


def _token_flags(codec: TextCodec, vocab: int, characters: str) -> list[bool]:
    flags = []
    for token in range(vocab):
        try:
            piece = codec.text([token])
        except Exception:  # ids past the tokenizer's vocabulary (padded embedding rows)
            piece = ""
        flags.append(any(c in piece for c in characters))
    return flags
