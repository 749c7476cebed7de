"""Load on the LINE webhook, shared by the fast test (tests/test_line_load.py) and the full benchmark
(bench/line_load.py): a plan of signed events, an open-loop sender with bounded concurrency, and the
exactly-once count of what reached the fake LINE API.

Every event has its own identity at the fake. A reply is its event's by the reply token. A push is an
event's by its X-Line-Retry-Key when that is `push_retry_key(webhookEventId)` (a key derived from the
event, as a daemon that may push an event's answer late, after a restart even, would use), else by its
chat when that chat sent only that one event in the run (every stale event comes from such a one-shot
user). A push neither rule places is counted as unattributed: with any of those, exactly-once is not
shown. An event answered twice or never shows up as a duplicate or as lost.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from adapters.line import PUSH_KEYS
from bot.router import BUSY_REPLY, RATE_LIMIT_REPLY
from finetune.prompt import ChatTurn

from .fake_line_api import PUSH, REPLY, Delivery, Fault, sign, text_event, webhook_bytes


class FixedLatencyBackend:
    """Stands in for the model behind the worker: every batch takes `latency_s`, whatever its size."""

    def __init__(self, persona: str, latency_s: float):
        self.persona = persona
        self.latency_s = latency_s
        self.batches: list[int] = []

    def generate(self, conversations: list[list[ChatTurn]]) -> list[tuple[str, int]]:
        time.sleep(self.latency_s)  # in the worker's thread, as a real generation is
        self.batches.append(len(conversations))
        return [(f"うんうん、{turns[-1].text[:20]}", 4) for turns in conversations]


@dataclass(frozen=True)
class PlannedEvent:
    at_s: float  # when to send it, from the start of the run
    kind: str  # "reply" (an ordinary 1:1 user), "chatty" (a user over the rate limit), "stale" (answered by push)
    user: str
    token: str
    text: str
    event_id: str = ""  # its webhookEventId ("": a fresh random one at each sending)

    def signed_body(self, secret: str) -> tuple[bytes, str]:
        """The webhook body, stamped now (55 s ago for a stale event: its reply token is too old to use), and
        its X-Line-Signature. Made at sending time, as LINE does: a body made before a long run would go stale."""
        stamp = int((time.time() - (55 if self.kind == "stale" else 0)) * 1000)
        body = webhook_bytes(text_event(self.text, user=self.user, token=self.token, timestamp_ms=stamp,
                                        event_id=self.event_id or None))
        return body, sign(body, secret)


def push_retry_key(event_id: str) -> str:
    """The X-Line-Retry-Key that marks a push as the answer to webhook event `event_id`: a UUID (as LINE
    requires) derived from the event, so every try, in this process or after a restart, carries the same
    one: uuid5(PUSH_KEYS, "line:" + webhookEventId), as the adapter makes it. A push with this key is
    counted as that event's answer, whoever else its chat sent."""
    return str(uuid.uuid5(PUSH_KEYS, f"line:{event_id}"))


def plan_events(rate: float, duration_s: float, *, chatty_users: int = 2, chatty_rate: float = 2.0,
                stale_fraction: float = 0.0, user_period_s: float = 10.0, seed: int = 0) -> list[PlannedEvent]:
    """`rate` events a second for `duration_s`. Ordinary users each send one message every `user_period_s`
    (under the default limit of 10 a minute, burst 5); `chatty_users` send `chatty_rate` a second each, far
    over it; a `stale_fraction` of events carry a timestamp 55 s old, so they go out by push."""
    rng = random.Random(seed)
    total = int(rate * duration_s)
    ordinary = max(1, int(rate * user_period_s))
    chatty_every = max(1, round(rate / (chatty_rate * chatty_users))) if chatty_users else 0
    events = []
    for i in range(total):
        if chatty_every and i % chatty_every == 0:
            kind, user = "chatty", f"Uchatty{(i // chatty_every) % chatty_users:025d}"
        elif stale_fraction and rng.random() < stale_fraction:
            kind, user = "stale", f"Ustale{i:026d}"
        else:
            kind, user = "reply", f"Uuser{i % ordinary:027d}"
        token, event_id = f"{rng.getrandbits(128):032x}", f"{rng.getrandbits(130):033X}"[:26]
        events.append(PlannedEvent(i / rate, kind, user, token, f"メッセージ{i}", event_id))
    return events


@dataclass
class SendResult:
    statuses: Counter = field(default_factory=Counter)  # HTTP status, or an exception's name
    latencies_s: list[float] = field(default_factory=list)  # of every webhook answered
    max_lag_s: float = 0.0  # how far the sender fell behind its schedule
    accepted: list[PlannedEvent] = field(default_factory=list)  # answered 200
    wall_s: float = 0.0
    lags_s: list[float] = field(default_factory=list)  # each event's lag behind its schedule when it went out
    started_at: float = 0.0  # time.monotonic() (the same clock in every process) when the schedule began

    def to_json(self, events: list[PlannedEvent]) -> dict:
        """As JSON, accepted events by their index in `events` (the sender's own process writes it)."""
        index = {id(e): i for i, e in enumerate(events)}
        return {"statuses": {str(k): v for k, v in self.statuses.items()}, "latencies_s": self.latencies_s,
                "max_lag_s": self.max_lag_s, "accepted": [index[id(e)] for e in self.accepted],
                "wall_s": self.wall_s, "lags_s": self.lags_s, "started_at": self.started_at}

    @classmethod
    def from_json(cls, data: dict, events: list[PlannedEvent]) -> SendResult:
        statuses = Counter({int(k) if k.isdigit() else k: v for k, v in data["statuses"].items()})
        return cls(statuses, data["latencies_s"], data["max_lag_s"], [events[i] for i in data["accepted"]],
                   data["wall_s"], data["lags_s"], data["started_at"])


async def send_at_rate(url: str, events: list[PlannedEvent], secret: str, *, max_in_flight: int = 256,
                       timeout_s: float = 5.0) -> SendResult:
    """POSTs each event at its `at_s` (open loop: a slow server does not slow the schedule), at most
    `max_in_flight` at once; a webhook's latency runs from its request going out to its answer."""
    result = SendResult()
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(max_in_flight)
    connector = aiohttp.TCPConnector(limit=max_in_flight)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:

        async def post(event: PlannedEvent) -> None:
            body, signature = event.signed_body(secret)
            try:
                started = time.perf_counter()
                async with session.post(url, data=body, headers={
                        "Content-Type": "application/json", "X-Line-Signature": signature}) as response:
                    await response.read()
                    result.latencies_s.append(time.perf_counter() - started)
                    result.statuses[response.status] += 1
                    if response.status == 200:
                        result.accepted.append(event)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                result.statuses[type(exc).__name__] += 1
            finally:
                slots.release()

        tasks = set()
        start = loop.time()
        result.started_at = time.monotonic()
        for event in events:
            delay = start + event.at_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            lag = loop.time() - start - event.at_s
            result.lags_s.append(lag)
            result.max_lag_s = max(result.max_lag_s, lag)
            task = asyncio.create_task(post(event))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)
        result.wall_s = loop.time() - start
    return result


def _push_owners(planned: list[PlannedEvent]) -> tuple[dict[str, str], dict[str, str]]:
    """Whose answer a push can be, as event tokens: by the `push_retry_key` it carries, and by its chat where
    that chat sent only one of `planned`."""
    per_chat = Counter(e.user for e in planned)
    by_key = {push_retry_key(e.event_id): e.token for e in planned if e.event_id}
    by_lone_chat = {e.user: e.token for e in planned if per_chat[e.user] == 1}
    return by_key, by_lone_chat


def deliveries_per_event(events: list[PlannedEvent], fake, planned: list[PlannedEvent] | None = None, *,
                         owners: tuple[dict[str, str], dict[str, str]] | None = None
                         ) -> tuple[list[list[Delivery]], int]:
    """For each of `events`, the deliveries the fake made for it, and how many pushes no event could be named
    for. A reply is its token's event; a push is the event whose `push_retry_key` it carries, else the one
    event its chat sent among `planned` (all the events of the run; `events` when None). `owners`:
    `_push_owners(planned)`, for a caller that counts again and again."""
    by_key, by_lone_chat = owners or _push_owners(events if planned is None else planned)
    by_token: dict[str, list[Delivery]] = {}
    unattributed = 0
    for d in fake.deliveries:
        if d.path == REPLY:
            token = d.to
        else:
            token = by_key.get(d.retry_key) or by_lone_chat.get(d.to)
            if token is None:
                unattributed += 1
                continue
        by_token.setdefault(token, []).append(d)
    return [by_token.get(e.token, []) for e in events], unattributed


def push_attribution(fake, planned: list[PlannedEvent]) -> dict:
    """How the pushes at the fake were named to events: by their derived retry key, by a one-event chat, or not."""
    by_key, by_lone_chat = _push_owners(planned)
    out = Counter()
    for d in fake.deliveries:
        if d.path != REPLY:
            out["by_key" if d.retry_key in by_key else "by_lone_chat" if d.to in by_lone_chat else "unattributed"] += 1
    return {k: out[k] for k in ("by_key", "by_lone_chat", "unattributed")}


def attribute_answers(events: list[PlannedEvent], fake, planned: list[PlannedEvent] | None = None
                      ) -> tuple[list[list[list[str]]], int]:
    """For each of `events`, the message lists delivered for it, and the count of unattributed pushes
    (see `deliveries_per_event`)."""
    per_event, unattributed = deliveries_per_event(events, fake, planned)
    return [[d.texts for d in ds] for ds in per_event], unattributed


async def wait_until_answered(events: list[PlannedEvent], fake, *, quiet_s: float = 5.0,
                              limit_s: float = 120.0, refresh=None, poll_s: float = 0.1,
                              planned: list[PlannedEvent] | None = None) -> float:
    """Waits until every event has an answer at the fake, or nothing new arrived for `quiet_s` (some are lost);
    returns the seconds waited. `refresh` (a coroutine function) brings a FakeLineMirror up to date first."""
    owners = _push_owners(events if planned is None else planned)  # once: a uuid5 per event, ~30 ms for 12,000
    started = last_change = time.monotonic()
    seen = -1
    while time.monotonic() - started < limit_s:
        if refresh is not None:
            await refresh()
        answered = sum(1 for ds in deliveries_per_event(events, fake, owners=owners)[0] if ds)
        if answered == len(events) and fake.in_flight == 0:
            break
        count = len(fake.calls)
        if count != seen:
            seen, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > quiet_s:
            break
        await asyncio.sleep(poll_s)
    return time.monotonic() - started


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summarize(sent: SendResult, events: list[PlannedEvent], fake, *, burst: int,
              per_minute: float) -> dict:
    """The run in numbers: exactly-once at the fake, busy and rate-limited answers, webhook latency, and
    whether every chatty user stayed within `burst` + `per_minute` over its sending span."""
    answers, unattributed = attribute_answers(sent.accepted, fake, events)
    first_texts = [a[0][0] if a and a[0] else None for a in answers]
    chatty: dict[str, list[int]] = {}
    for event, text in zip(sent.accepted, first_texts, strict=True):
        if event.kind == "chatty" and text is not None:
            chatty.setdefault(event.user, []).append(text != RATE_LIMIT_REPLY)
    span_s = max((e.at_s for e in events), default=0) - min((e.at_s for e in events), default=0)
    allowed_bound = burst + per_minute / 60 * span_s + 1
    ms = [x * 1000 for x in sent.latencies_s]
    pushes_by_key = Counter(d.retry_key for d in fake.delivered(PUSH) if d.retry_key)
    return {
        "events_sent": len(events),
        "webhook_statuses": {str(k): v for k, v in sorted(sent.statuses.items(), key=str)},
        "events_accepted": len(sent.accepted),
        "answered": sum(1 for a in answers if a),
        "answered_exactly_once": sum(1 for a in answers if len(a) == 1),
        "duplicates": sum(len(a) - 1 for a in answers if len(a) > 1),
        "lost": sum(1 for a in answers if not a),
        "push_retry_keys_delivered_twice": sum(1 for n in pushes_by_key.values() if n > 1),
        "pushes_unattributed": unattributed,
        "pushes_named_by": push_attribution(fake, events),
        "answers_by_kind": {
            "reply": sum(1 for t in first_texts if t is not None and t not in (BUSY_REPLY, RATE_LIMIT_REPLY)),
            "busy": sum(1 for t in first_texts if t == BUSY_REPLY),
            "rate_limited": sum(1 for t in first_texts if t == RATE_LIMIT_REPLY),
        },
        "by_reply": len(fake.delivered(REPLY)),
        "by_push": len(fake.delivered(PUSH)),
        "api_calls_by_status": dict(Counter(str(c.get("status", "no answer")) for c in fake.calls)),
        "rate_limit": {
            "chatty_users": len(chatty),
            "allowed_per_user": {u[-4:]: sum(v) for u, v in sorted(chatty.items())},
            "refused_per_user": {u[-4:]: len(v) - sum(v) for u, v in sorted(chatty.items())},
            "allowed_bound": round(allowed_bound, 1),
            "holds": all(sum(v) <= allowed_bound for v in chatty.values()),
        },
        "webhook_latency_ms": {
            "p50": round(percentile(ms, 50), 2), "p95": round(percentile(ms, 95), 2),
            "p99": round(percentile(ms, 99), 2), "max": round(max(ms, default=float("nan")), 2),
            "mean": round(statistics.fmean(ms), 2) if ms else None,
        },
        "sender_max_lag_ms": round(sent.max_lag_s * 1000, 1),
        "sender_lag_p99_ms": round(percentile(sent.lags_s, 99) * 1000, 1) if sent.lags_s else None,
        "send_wall_s": round(sent.wall_s, 2),
    }


def transient_faults(rng: random.Random, *, api_timeout_s: float, first_try_share: float = 0.2):
    """fault_for for the fake: `first_try_share` of first tries fail, in five ways (a 500 before and one after
    delivering, a 429 with Retry-After: 1, a hang past the client's timeout before and one after delivering),
    half as many second tries, no later ones: transient trouble that bounded retries must ride out without
    losing or doubling a message."""
    hang = api_timeout_s * 1.5
    kinds = [Fault(500), Fault(500, deliver=True), Fault(429, retry_after="1"),
             Fault(200, deliver=True, hang_s=hang), Fault(500, hang_s=hang)]

    def fault_for(path: str, identity: str, tries: int) -> Fault | None:
        share = first_try_share * (1.0, 0.5, 0.0)[min(tries, 2)]
        roll = rng.random()
        return kinds[int(roll / share * len(kinds))] if roll < share else None

    return fault_for
