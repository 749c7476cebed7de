"""A reply whose fate the daemon never learned, and a signal while the model loads: the real daemon (`python -m
bot`, the tiny model) serving LINE against the fake LINE API (tests/support/fake_line_api.py), which keeps LINE's
rules (a reply token is spent by the first reply it takes; a spent one answers 400) and counts what reached
each user.

Killed (SIGKILL) with two replies recorded in the inbox as attempted and neither answered:
- one LINE took, its answer held back (killed while in flight);
- one that never reached LINE (killed before the request left: the fake swallows it unrecorded).
Then restarted on the same files. Within the token's life the reply is tried again with its own token: exactly
one delivery each. Past it ([line] reply_token_margin_s set to 0 for the restart, rather than waiting a minute),
[line] unknown_outcome decides: "push" delivers both (the one LINE took, a second time), "drop" neither again;
either way a warning names the event and its inbox entry, and the inbox keeps the outcome, not the text.

Stopped by SIGTERM or SIGINT while the model loads, with events the webhook took meanwhile: it exits 0 at once,
and the restart answers them. In process: a push tried before a restart goes again with its retry key while
LINE honours it (a day), then as [line] unknown_outcome says.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import ScriptedRouter

from adapters.line import LineAdapter
from bot.dispatcher import Dispatcher
from bot.inbox import Inbox
from bot.messages import IncomingMessage
from bot.metrics import BotMetrics
from finetune.config import BotConfig
from finetune.tiny_model import build_tiny_model
from tests.support.fake_line_api import REPLY, Fault, serving_fake_line, text_event
from tests.support.line_daemon import (
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
    return build_tiny_model(tmp_path_factory.mktemp("restarts") / "tiny")


def inbox_row(folder: Path, event: dict) -> tuple:
    """(inbox entry id, outcome, text, attempts) of an event, read as the operator would."""
    with sqlite3.connect(folder / "memory.inbox.sqlite3") as db:
        return db.execute("SELECT id, outcome, text, attempts FROM entries WHERE event_id = ?",
                          (event["webhookEventId"],)).fetchone()


# For each restart: its [line] settings; then, for the reply LINE took and for the one that never reached it,
# what its user has received in the end, the outcome the inbox keeps, and the restart's log line about it.
RESTARTS = {
    "within-the-tokens-life": (
        {"reply_token_margin_s": 60},
        (["reply"], "maybe_delivered", "reply to {which} may have been delivered: not pushed"),
        (["reply"], "replied", "replied to {which}")),
    "past-it-push": (
        {"reply_token_margin_s": 0, "unknown_outcome": "push"},
        (["reply", "push"], "unknown_pushed", 'reply to {which}: outcome unknown .*: pushed .*unknown_outcome = "push"'),
        (["push"], "unknown_pushed", 'reply to {which}: outcome unknown .*: pushed .*unknown_outcome = "push"')),
    "past-it-drop": (
        {"reply_token_margin_s": 0, "unknown_outcome": "drop"},
        (["reply"], "unknown_dropped", 'reply to {which}: outcome unknown .*: not sent again .*unknown_outcome = "drop"'),
        ([], "unknown_dropped", 'reply to {which}: outcome unknown .*: not sent again .*unknown_outcome = "drop"')),
}


@pytest.mark.parametrize("restart", list(RESTARTS))
async def test_a_reply_killed_in_flight_or_before_it_left_is_delivered_once_in_the_tokens_life_then_per_policy(
        tmp_path, tiny, restart):
    settings, *expected = RESTARTS[restart]

    def fault_for(path, identity, tries):
        if path == REPLY and tries == 0 and identity == held["replyToken"]:
            return Fault(200, deliver=True, hold=True)
        if path == REPLY and tries == 0 and identity == lost["replyToken"]:
            return Fault(lost=True, hold=True)
        return None

    async with serving_fake_line(TOKEN) as fake:
        first = second = None
        try:
            fake.fault_for = fault_for
            first = await Daemon(write_config(tmp_path, tiny, fake.url, line={"reply_token_margin_s": 60}),
                                 tmp_path / "first.log").start()
            # The restart, its libraries imported before the events come, so that it serves within the tokens' life.
            second = await Daemon(write_config(tmp_path, tiny, fake.url, name="restart.toml", line=settings),
                                  tmp_path / "second.log").warm()
            url = await first.url()
            await first.logged("serving as")
            # Made now: a token's age counts from the event's timestamp.
            held = text_event("届いたかな", user="Uheld".ljust(33, "0"))  # LINE takes the reply; its answer never comes
            lost = text_event("まだ届いてない", user="Ulost".ljust(33, "0"))  # the reply never reaches LINE
            assert await post_events(url, [held, lost]) == [200, 200]
            await wait_for(lambda: answers(fake, held) and (REPLY, lost["replyToken"]) in fake.lost,
                           "both replies on their way")
            assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
            fake.release()
            for event in (held, lost):  # each attempt was recorded before its request went: the restart knows of it
                _, outcome, text, attempts = inbox_row(tmp_path, event)
                assert (outcome, text, [m for m, _ in json.loads(attempts)]) == (None, event["message"]["text"], ["reply"])

            await second.go()
            for event, (_, outcome, _) in zip((held, lost), expected, strict=True):
                await wait_for(lambda event=event: inbox_row(tmp_path, event)[1] is not None, "the event finished")
                assert "token is now" not in second.log() or settings["reply_token_margin_s"] == 0, (
                    "the restart took longer than a reply token lives (60 s): this machine is too slow to test the "
                    "token's life\n" + second.log())
                assert inbox_row(tmp_path, event)[1] == outcome, second.log()
            assert await second.stop() == 0, second.log()
        finally:
            for daemon in (first, second):
                if daemon is not None:
                    await daemon.kill()

    log = second.log()
    for event, (gets, _, words) in zip((held, lost), expected, strict=True):
        assert [kind for kind, _ in answers(fake, event)] == gets, (restart, event["message"]["text"])
        entry_id, _, text, _ = inbox_row(tmp_path, event)
        assert text == ""  # the inbox keeps the outcome, never the text
        which = rf"line:{event['source']['userId']} \(event {event['webhookEventId']}, inbox entry {entry_id}\)"
        assert re.search(words.format(which=which), log), log
        assert event["message"]["text"] not in first.log() + log
        assert remembered(tmp_path, event["source"]["userId"]).count(event["message"]["text"]) == 1
    if restart == "within-the-tokens-life":  # the restart tried the held token again and met it spent (400)
        assert [c["status"] for c in fake.to(REPLY) if c["json"]["replyToken"] == held["replyToken"]] == [200, 400]
    else:  # past its life no token is tried again
        assert [c["json"]["replyToken"] for c in fake.to(REPLY)] == [held["replyToken"]]
    if restart == "past-it-push":  # the push carries the words the reply LINE took had, not new ones
        (_, replied), (_, pushed) = answers(fake, held)
        assert pushed == replied


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_while_the_model_loads_exits_0_and_what_arrived_is_answered_after_the_restart(
        tmp_path, tiny, sig):
    async with serving_fake_line(TOKEN) as fake:
        first = second = None
        try:
            # With push_fallback, an event is answered after the restart however long the load takes (by push once its
            # reply token is stale): this is about what is kept, not about the token.
            config = write_config(tmp_path, tiny, fake.url, line={"push_fallback": True})
            first = await Daemon(config, tmp_path / "first.log").start()
            url = await first.url()  # the webhook takes events from here on, before the model is loaded
            events = one_to_one(3, "loading")
            assert await post_events(url, events) == [200] * 3
            assert await first.stop(sig, timeout=60) == 0, first.log()
            assert "serving as" not in first.log(), "the signal came after the load: this tests nothing"
            assert re.search(r"stopped while (loading the model|warming up): 3 accepted message\(s\) kept in the inbox",
                             first.log()), first.log()
            assert fake.deliveries == [] and "Traceback" not in first.log()

            second = await Daemon(config, tmp_path / "second.log").start()
            await second.logged("3 message\\(s\\) left unanswered by the last run")
            await wait_for(lambda: all(answers(fake, e) for e in events), "the events answered")
            assert await second.stop() == 0, second.log()
        finally:
            for daemon in (first, second):
                if daemon is not None:
                    await daemon.kill()
    assert [len(answers(fake, e)) for e in events] == [1] * 3


# --- in process: a push recorded before a restart ------------------------------------------------------


@pytest.mark.parametrize("pushed_hours_ago, policy, outcome, pushes", [
    (1, "drop", "replied", 1),  # LINE still honours the retry key: pushed again with it, sent at most once
    (25, "drop", "unknown_dropped", 0),  # it no longer does: pushing again may send it twice
    (25, "push", "unknown_pushed", 1),
])
async def test_a_push_tried_before_a_restart_is_retried_with_its_key_for_a_day_then_as_the_policy_says(
        tmp_path, monkeypatch, caplog, pushed_hours_ago, policy, outcome, pushes):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    caplog.set_level("INFO")
    inbox_file = tmp_path / "memory.inbox.sqlite3"
    user = "U" + "7" * 32
    inbox = Inbox(inbox_file)
    (entry,) = await inbox.accept([IncomingMessage("line", user, user, "LINE user", "前に送ったはず", True,
                                                   event_id="EVPUSHED", delivery={"kind": "user", "reply_token": "t"})])
    await inbox.attempt(entry, "push", "前の返事")
    inbox.close()
    with sqlite3.connect(inbox_file) as db:  # the push was tried that long ago
        db.execute("UPDATE entries SET attempts = ?", (json.dumps([["push", time.time() - pushed_hours_ago * 3600]]),))

    async with serving_fake_line(TOKEN) as fake:
        config = BotConfig.from_dict({
            "memory": {"path": str(tmp_path / "memory.sqlite3")},
            "line": {"enabled": True, "channel_secret_env": SECRET_ENV, "access_token_env": TOKEN_ENV,
                     "api_host": fake.url, "unknown_outcome": policy}}, source="test")
        adapter = LineAdapter(config, BotMetrics(), "美咲")
        inbox = Inbox(inbox_file)
        dispatcher = Dispatcher(inbox, {"line": adapter}, BotMetrics())
        stopping = asyncio.Event()
        running = asyncio.create_task(adapter.run(dispatcher.accept, stopping))
        dispatcher.recover(inbox.recovered)
        dispatcher.start(ScriptedRouter(lambda message: "新しい返事"))  # not asked: the recorded reply is sent
        await dispatcher.drain(10)
        stopping.set()
        await running
        await adapter.close()
        counts = await inbox.counts()
        inbox.close()
    assert counts == {outcome: 1}
    assert [d.texts for d in fake.pushes_to(user)] == [["前の返事"]] * pushes
    if outcome.startswith("unknown_"):
        assert re.search(rf"reply to line:{user} \(event EVPUSHED, inbox entry {entry.id}\): outcome unknown \(its push "
                         r"was tried over a day ago", caplog.text), caplog.text
