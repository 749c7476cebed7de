"""Nothing lost, nothing doubled: the real daemon (`python -m bot`, the tiny model) serving LINE, stopped with
SIGTERM while replies are in flight, killed with SIGKILL while they are being made and at the worst moments of
delivery, then started again on the same files. The fake LINE API (tests/support/fake_line_api.py) keeps LINE's rules
(a spent reply token answers 400, an accepted X-Line-Retry-Key 409) and counts what would reach a user.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
import uuid
from pathlib import Path

import pytest

from adapters.line import PUSH_KEYS
from finetune.tiny_model import build_tiny_model
from tests.support.fake_line_api import PUSH, Fault, serving_fake_line, text_event
from tests.support.line_daemon import (
    PERSONA,
    SECRET,
    SECRET_ENV,
    TOKEN,
    TOKEN_ENV,
    Daemon,
    answers,
    one_to_one,
    post_events,
    remembered,
    wait_for,
    write_config,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("durable") / "tiny")


async def test_sigterm_with_60_replies_in_flight_delivers_all_60_within_the_drain_timeout(tmp_path, tiny):
    """Long replies (400 tokens) to 60 chats, SIGTERM 0.3 s after the webhooks were acknowledged: every reply is
    made and delivered before the daemon exits, within [queue] drain_timeout_s."""
    drain_timeout = 90
    async with serving_fake_line(TOKEN) as fake:
        config = write_config(tmp_path, tiny, fake.url, queue={"drain_timeout_s": drain_timeout, "max_batch": 16},
                              generation={"max_new_tokens": 400, "temperature": 0.0, "repetition_penalty": 1.0})
        daemon = await Daemon(config, tmp_path / "daemon.log").start()
        url = await daemon.url()
        await daemon.logged("serving as")
        events = one_to_one(60, "term")
        assert await post_events(url, events) == [200] * 60
        await asyncio.sleep(0.3)
        stopped = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        in_flight = sum(1 for e in events if not answers(fake, e))
        assert await asyncio.wait_for(daemon.proc.wait(), drain_timeout + 30) == 0, daemon.log()
        took = time.monotonic() - stopped
    assert in_flight > 30, f"only {in_flight} replies were still to be made at SIGTERM: nothing was drained"
    assert sum(1 for e in events if len(answers(fake, e)) == 1) == 60, daemon.log()[-3000:]
    assert all(kind == "reply" for e in events for kind, _ in answers(fake, e))
    assert took < drain_timeout
    assert "not answered within" not in daemon.log() and "stopped" in daemon.log()


async def test_sigkill_mid_work_then_a_restart_answers_every_event_exactly_once(tmp_path, tiny):
    """Killed while replies are being generated, while a reply LINE has already accepted waits for its answer,
    and while an accepted push waits for its answer. The restart answers every event once: reply or push, never
    both, never twice; a message is remembered once."""
    def fault_for(path, identity, tries):
        if tries == 0 and identity in (replied["replyToken"], push_key):
            return Fault(200, deliver=True, hang_s=5)  # delivered, then no answer before the kill
        return None

    async with serving_fake_line(TOKEN) as fake:
        fake.fault_for = fault_for
        config = write_config(tmp_path, tiny, fake.url, line={"push_fallback": True},
                              queue={"max_batch": 4}, generation={"max_new_tokens": 60, "temperature": 0.0})
        first = await Daemon(config, tmp_path / "first.log").start()
        url = await first.url()
        await first.logged("serving as")
        # Made now, once the model is loaded: a reply token's age counts from the event's timestamp.
        generating = one_to_one(16, "gen")
        replied = text_event("返事はもう届いた？", user="Ureplied".ljust(33, "0"))  # LINE takes its reply, the answer hangs
        pushed = text_event("遅れて届くやつ", user="Upushed".ljust(33, "0"),  # token stale on arrival: pushed
                            timestamp_ms=int((time.time() - 55) * 1000))
        push_key = str(uuid.uuid5(PUSH_KEYS, f"line:{pushed['webhookEventId']}"))
        assert await post_events(url, [replied, pushed]) == [200, 200]
        assert await post_events(url, generating) == [200] * 16
        await wait_for(lambda: answers(fake, replied) and answers(fake, pushed), "the hanging reply and push")
        assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
        answered_before = sum(1 for e in generating if answers(fake, e))
        assert answered_before < len(generating), "the kill came after every reply: nothing left to recover"

        second = await Daemon(config, tmp_path / "second.log").start()
        await second.logged("serving as")
        everything = [replied, pushed, *generating]
        await wait_for(lambda: all(answers(fake, e) for e in everything), "every event answered")
        await second.logged(r"left unanswered by the last run")
        await asyncio.sleep(1.0)  # anything that would double an answer has had its chance
        assert await second.stop() == 0, second.log()

    for event in everything:
        assert len(answers(fake, event)) == 1, (event["message"]["text"], answers(fake, event))
        assert remembered(tmp_path, event["source"]["userId"]).count(event["message"]["text"]) == 1
    assert answers(fake, replied)[0][0] == "reply" and answers(fake, pushed)[0][0] == "push"
    # The restart tried the spent token again (400), or found it past its life ([line] unknown_outcome's default
    # "drop"), and did not push; the push went again with its key (409).
    assert re.search(r"may have been delivered: not pushed|outcome unknown .* not sent again", second.log())
    assert [c["status"] for c in fake.to(PUSH) if c["headers"].get("X-Line-Retry-Key") == push_key] == [200, 409]


async def test_events_sent_while_the_model_loads_are_answered_once_serving_starts(tmp_path, tiny):
    """The webhook answers 200 from the moment the server is up, and stores what it takes; a redelivery during the
    load is taken once."""
    async with serving_fake_line(TOKEN) as fake:
        config = write_config(tmp_path, tiny, fake.url)
        daemon = await Daemon(config, tmp_path / "daemon.log").start()
        url = await daemon.url()
        early = one_to_one(5, "load")
        statuses = await post_events(url, early + early[:2])  # two of them delivered twice
        assert "serving as" not in daemon.log(), "the model was loaded before the events came: nothing was shown"
        assert statuses == [200] * 7
        await daemon.logged("serving as")
        await wait_for(lambda: all(answers(fake, e) for e in early), "the early events answered")
        await asyncio.sleep(0.5)
        assert await daemon.stop() == 0
    assert [len(answers(fake, e)) for e in early] == [1] * 5


class SlowModel:
    """Stands in for the model behind the worker (in-process daemon): each batch takes `seconds`."""

    def __init__(self, seconds: float):
        self.persona = PERSONA
        self.seconds = seconds

    def generate(self, conversations):
        time.sleep(self.seconds)  # in the worker's thread, as a real generation is
        return [(f"うん、{turns[-1].text}", 3) for turns in conversations]


async def test_a_drain_cut_short_keeps_the_rest_for_the_next_start_and_says_how_many(tmp_path, caplog, monkeypatch):
    from bot.daemon import run_daemon
    from finetune.config import BotConfig

    caplog.set_level("INFO")
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    async with serving_fake_line(TOKEN) as fake:

        def config(drain_s: float):
            return BotConfig.from_dict({
                "persona": {"name": PERSONA}, "memory": {"path": str(tmp_path / "memory.sqlite3")},
                "server": {"port": 0}, "queue": {"max_batch": 1, "drain_timeout_s": drain_s},
                "line": {"enabled": True, "channel_secret_env": SECRET_ENV, "access_token_env": TOKEN_ENV,
                         "api_host": fake.url}}, source="test")

        async def serving(stop, backend):
            since = len(caplog.records)
            daemon = asyncio.create_task(run_daemon(config(0.5), stop=stop, backend=backend))
            await wait_for(lambda: any("serving as" in r.getMessage() for r in caplog.records[since:]), "serving")
            port = next(re.search(r"127\.0\.0\.1:(\d+)/healthz", r.getMessage())[1] for r in caplog.records[since:]
                        if "/healthz" in r.getMessage())
            return daemon, f"http://127.0.0.1:{port}"

        stop = asyncio.Event()
        daemon, url = await serving(stop, SlowModel(1.0))
        events = one_to_one(4, "drain")
        assert await post_events(url, events) == [200] * 4
        stop.set()
        late = one_to_one(1, "late")
        assert await post_events(url, late) == [200]  # during the drain: stored for the next start
        assert await asyncio.wait_for(daemon, 30) == 0
        first_run = sum(1 for e in events if answers(fake, e))
        assert first_run < 4
        assert re.search(rf"{4 - first_run} accepted message\(s\) not answered within 0.5s: kept in the inbox", caplog.text)
        assert "1 message(s) accepted during shutdown: kept in the inbox" in caplog.text

        stop = asyncio.Event()
        daemon, url = await serving(stop, SlowModel(0.0))
        await wait_for(lambda: all(answers(fake, e) for e in events + late), "the rest answered after the restart")
        stop.set()
        assert await asyncio.wait_for(daemon, 30) == 0
    assert [len(answers(fake, e)) for e in events + late] == [1] * 5
