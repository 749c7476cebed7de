"""No secret reaches a log: the daemon runs in-process with LINE and Discord enabled (each against its
loopback fake), every logger at DEBUG into a real handler, through the paths most likely to print a
credential (signed and forged webhooks, API errors with bodies, retries, a Discord login, message and
reply), and the whole output, stderr included, is searched for the configured values and any 12
characters of them."""

from __future__ import annotations

import asyncio
import io
import logging
import re

from adapters.line import LineAdapter, RetryPolicy
from bot.daemon import run_daemon
from finetune.config import BotConfig
from tests.support.fake_discord import DM_ID, TOKEN_ENV, message_payload
from tests.support.fake_line_api import PUSH, REPLY, Fault, serving_fake_line, sign, text_event, webhook_bytes
from tests.support.webhook_load import FixedLatencyBackend

LINE_SECRET = "S3cr3t-line-channel-4f9a2b7c1d8e"
LINE_TOKEN = "T0ken-line-access-Zq8Wm3Xv5Kp2Rn7Ld4"
DISCORD_TOKEN = "MTEwMDAwMDAwMDAwMDAwMDAx.Gx7f3a.discord-secret-value-9QwErTy"
SECRET_ENV, LINE_TOKEN_ENV = "BUNSHIN_TEST_LINE_SECRET", "BUNSHIN_TEST_LINE_TOKEN"
USER = "U" + "3" * 32


def leaks(text: str) -> list[str]:
    """Any secret, or any 12-character piece of one, found in `text`."""
    found = []
    for secret in (LINE_SECRET, LINE_TOKEN, DISCORD_TOKEN):
        pieces = {secret[i:i + 12] for i in range(len(secret) - 11)}
        found += [p for p in pieces if p in text]
    return found


async def test_no_secret_in_the_whole_debug_log(tmp_path, monkeypatch, fake_discord, capfd):
    monkeypatch.setenv(SECRET_ENV, LINE_SECRET)
    monkeypatch.setenv(LINE_TOKEN_ENV, LINE_TOKEN)
    monkeypatch.setenv(TOKEN_ENV, DISCORD_TOKEN)
    monkeypatch.setattr(LineAdapter, "retry", RetryPolicy(attempts=3, base_s=0.01))
    fake_discord.gateway_mode = "serve"
    fake_discord.events = [message_payload("元気？", channel_id=DM_ID, guild_id=None)]

    output = io.StringIO()
    handler = logging.StreamHandler(output)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    # setLevel, not the attribute: it also clears each logger's cache of enabled levels, which an earlier test
    # filled while the root was at WARNING (a run of a subset in another order, as mutmut's, then missed INFO lines)
    level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        async with serving_fake_line(LINE_TOKEN) as fake:
            config = BotConfig.from_dict({
                "persona": {"name": "美咲"}, "memory": {"path": str(tmp_path / "memory.sqlite3")},
                "server": {"port": 0}, "logging": {"level": "DEBUG"},
                "discord": {"enabled": True, "token_env": TOKEN_ENV},
                "line": {"enabled": True, "channel_secret_env": SECRET_ENV, "access_token_env": LINE_TOKEN_ENV,
                         "api_host": fake.url, "push_fallback": True, "api_timeout_s": 0.3},
            }, source="test")
            stop = asyncio.Event()
            daemon = asyncio.create_task(run_daemon(config, stop=stop, backend=FixedLatencyBackend("美咲", 0.0)))
            port = await _logged(output, r"127\.0\.0\.1:(\d+)/healthz")
            await _logged(output, "serving as")
            url = f"http://127.0.0.1:{port}/callback"

            import aiohttp

            async with aiohttp.ClientSession() as session:
                async def post(raw: bytes, signature: str | None) -> int:
                    headers = {"X-Line-Signature": signature} if signature else {}
                    async with session.post(url, data=raw, headers=headers) as r:
                        return r.status

                fake.script[REPLY] = [Fault(500, deliver=True)]  # a retry, a 400 with a body
                fake.script[PUSH] = [Fault(429, retry_after="0"), Fault(500, deliver=True)]  # retries, then 409
                good = webhook_bytes(text_event("こんにちは", user=USER))
                stale = webhook_bytes(text_event("遅れて", user="U" + "6" * 32, timestamp_ms=1))
                assert await post(good, sign(good, LINE_SECRET)) == 200
                assert await post(stale, sign(stale, LINE_SECRET)) == 200
                assert await post(good, sign(good, "wrong")) == 401
                assert await post(b"{", None) == 400
                await _logged(output, "may have been delivered")
                await _logged(output, "pushed to line:")
            await _logged(output, "connected to Discord as")
            while not fake_discord.posts("messages"):
                await asyncio.sleep(0.02)
            stop.set()
            assert await asyncio.wait_for(daemon, 30) == 0
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    log = output.getvalue()
    captured = capfd.readouterr()
    # The run did go through the paths worth checking, at DEBUG.
    for expected in ("DEBUG", "HTTP 500", "HTTP 409", "HTTP 400", "invalid X-Line-Signature", "discord"):
        assert expected in log, expected
    assert leaks(log + captured.out + captured.err) == []


async def _logged(output: io.StringIO, pattern: str, timeout: float = 20) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if m := re.search(pattern, output.getvalue()):
            return m.group(1) if m.groups() else m.group(0)
        await asyncio.sleep(0.02)
    raise AssertionError(f"nothing logged matching {pattern!r}")
