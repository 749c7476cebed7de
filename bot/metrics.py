"""Prometheus metrics for the bot: queue, batches, latency, tokens, outcomes and errors.

Each BotMetrics holds its own registry rather than prometheus_client's global one, so tests and
several workers in one process never collide on metric names.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .messages import Delivery

# What became of an incoming message: the router records these (it sees every message; the worker
# only those that reach it). The worker records errors by kind, batches, tokens and latency.
OUTCOMES = ("replied", "busy", "error", "expired", "ignored", "rate_limited", "refused")
# How the answering of an accepted message ended (the dispatcher records these): the reply was delivered,
# there was nothing to say, it may have been delivered before a crash (not sent again), it could not be
# delivered (a stale LINE token without push, too old, the platform gone), or a delivery or a bug failed it.
# unknown_pushed / unknown_dropped: LINE could no longer tell whether an earlier try got through, and
# [line] unknown_outcome pushed it (perhaps a second time) or did not (perhaps never delivered).
DELIVERY_OUTCOMES = tuple(d.value for d in Delivery)
# Error kinds known up front (so their series show 0 before the first error); others may be added.
# engine: [model] engine = "openai" failed a request; recall: recalling a reply's notes failed (it went without them)
ERROR_KINDS = ("oom", "generation", "deadline", "engine", "recall")

# A 3.6B model answers in seconds on a GPU and in tens of seconds on a CPU; a queued reply waits longer.
_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)


class BotMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("bunshin_queue_depth", "Requests waiting for the model worker", registry=r)
        self.batch_size = Histogram(
            "bunshin_batch_size", "Requests being generated together, per step", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.reply_latency_seconds = Histogram(
            "bunshin_reply_latency_seconds", "From message received to reply ready", buckets=_SECONDS_BUCKETS, registry=r
        )
        self.generation_seconds = Histogram(
            "bunshin_generation_seconds", "Time of one generation step: one token for every chat (slot engine), or a whole batch (plain generate)", buckets=_SECONDS_BUCKETS, registry=r
        )
        self.generated_tokens = Counter("bunshin_generated_tokens", "Tokens generated in replies", registry=r)
        self.messages = Counter("bunshin_messages", "Incoming messages by outcome", ["outcome"], registry=r)
        self.errors = Counter("bunshin_errors", "Errors by kind", ["kind"], registry=r)
        self.deliveries = Counter("bunshin_deliveries", "Accepted messages finished, by how", ["outcome"], registry=r)
        self.recovered = Counter("bunshin_inbox_recovered", "Messages left unanswered by an earlier run, taken up at start",
                                 registry=r)
        self.inbox_waiting = Gauge("bunshin_inbox_waiting", "Accepted messages not finished yet", registry=r)
        # The OpenAI-compatible API (bot/api.py): every answer by status, refusals (401, 400, 413) included; the
        # requests that reach the model are counted in bunshin_messages as well, with the platforms' outcomes.
        self.api_responses = Counter("bunshin_api_responses", "OpenAI-compatible API answers by HTTP status", ["status"],
                                     registry=r)
        # Bytes that are not valid HTTP, answered 400 by aiohttp's parser before any route (bot/server.py).
        self.http_rejected = Counter("bunshin_http_rejected", "Requests refused as not valid HTTP, before any route",
                                     registry=r)
        # Recalling a reply's notes ([memory] person and chat_recall, bot/reply_memory.py), off the event loop.
        self.recall_seconds = Histogram(
            "bunshin_recall_seconds", "Recalling the memory notes of one reply",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1), registry=r)
        for outcome in OUTCOMES:
            self.messages.labels(outcome)
        for outcome in DELIVERY_OUTCOMES:
            self.deliveries.labels(outcome)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)

    def render(self) -> bytes:
        """The registry in Prometheus' text format, for a /metrics endpoint."""
        return generate_latest(self.registry)
