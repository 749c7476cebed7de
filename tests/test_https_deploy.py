"""deploy/: the HTTPS path for real, and a lint of what cannot run here.

Real: Caddy (the Debian binary) serving deploy/Caddyfile itself, imported under test-only global options (its
internal CA instead of Let's Encrypt, free loopback ports, no admin endpoint), in front of the real daemon
(`python -m bot`, the tiny model) whose replies go to the fake LINE API. A signed webhook sent over HTTPS through
Caddy is answered 200 and its reply reaches LINE, a forged one gets 401, /healthz answers and /metrics stays
private. The client trusts Caddy's internal root and nothing else, so TLS is checked, not skipped.

Linted: the Caddyfile (`caddy validate`), deploy/config.toml (the bot's own loader), compose.yaml (parsed, the
keys that matter and their agreement with the config), the systemd unit (`systemd-analyze verify` where there is
one, and its structure), the Dockerfile and .dockerignore (their structure: no docker daemon builds here).

Without caddy the Caddy tests are skipped on a laptop but fail under CI=true: CI installs it (.ci/run), so a
skip there would only hide a broken deployment.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import REPO, write_toml

from finetune.config import BotConfig, load_config
from finetune.tiny_model import build_tiny_model
from tests.support.fake_line_api import REPLY, serving_fake_line, sign, text_event, webhook_bytes

DEPLOY = REPO / "deploy"
PERSONA = "美咲"
SECRET, TOKEN = "https-channel-secret-7a7a", "https-access-token-8b8b"
SECRET_ENV, TOKEN_ENV = "BUNSHIN_TEST_LINE_SECRET", "BUNSHIN_TEST_LINE_TOKEN"
_DEFAULTS = BotConfig.default()
# The variables the *_env keys name by default: what deploy/.env can hold for the daemon.
SECRET_ENVS = (_DEFAULTS.line.channel_secret_env, _DEFAULTS.line.access_token_env, _DEFAULTS.discord.token_env,
               _DEFAULTS.api.key_env)


def _caddy_or_skip() -> str:
    """The caddy binary; without it skip here, but fail under CI."""
    if caddy := shutil.which("caddy"):
        return caddy
    missing = "caddy is not on PATH (Debian: apt-get install caddy)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{missing}; CI must run the HTTPS test")
    pytest.skip(missing)


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_caddy_fails_under_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(outcome, match="caddy"):
        _caddy_or_skip()


def caddy_env(home: Path, **extra: str) -> dict:
    """Caddy's data (its CA, certificates) and config under `home`: nothing outside the test is touched."""
    return {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / "data"),
            "XDG_CONFIG_HOME": str(home / "config"), **extra}


def free_ports(n: int) -> list[int]:
    """n distinct ports free on loopback now (all held open until all are picked)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def deploy_config():
    return load_config(DEPLOY / "config.toml")


# --- the HTTPS path, for real ---


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("https") / "tiny")


async def wait_for(condition, what: str, log=lambda: "", timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := await condition():
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{log()}")


async def test_signed_webhook_over_https_through_caddy_is_answered_and_a_forged_one_refused(tmp_path, tiny):
    caddy = _caddy_or_skip()
    http_port, https_port = free_ports(2)
    async with serving_fake_line(TOKEN) as fake:
        config = write_toml(tmp_path / "bot.toml", {
            "model": {"base": str(tiny), "device": "cpu"},
            "persona": {"name": PERSONA},
            "generation": {"max_new_tokens": 12, "temperature": 0.0},
            "memory": {"path": str(tmp_path / "data" / "memory.sqlite3")},
            "server": {"host": "127.0.0.1", "port": 0},
            "line": {"enabled": True, "channel_secret_env": SECRET_ENV, "access_token_env": TOKEN_ENV,
                     "api_host": fake.url},
        })
        daemon_log, caddy_log = tmp_path / "daemon.log", tmp_path / "caddy.log"
        with open(daemon_log, "wb") as log:
            daemon = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bot", "--config", str(config), cwd=REPO, stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=log, env={**os.environ, SECRET_ENV: SECRET, TOKEN_ENV: TOKEN, "PYTHONUNBUFFERED": "1"})
        caddy_proc = None

        def logs() -> str:
            caddy_said = caddy_log.read_text(errors="replace")[-3000:] if caddy_log.exists() else ""
            return f"--- daemon:\n{daemon_log.read_text(errors='replace')[-3000:]}\n--- caddy:\n{caddy_said}"

        try:
            async def daemon_port():
                if daemon.returncode is not None:
                    raise AssertionError(f"the daemon exited ({daemon.returncode})\n{logs()}")
                found = re.search(r"health and metrics on http://127\.0\.0\.1:(\d+)/healthz", daemon_log.read_text())
                return found and int(found[1])

            upstream = await wait_for(daemon_port, "the daemon's port", logs)
            # The deployment's own Caddyfile, imported under what only the test changes: Caddy's internal CA
            # for every site instead of ACME (no network), not installed into the system's trust store,
            # loopback and free ports, no admin endpoint.
            caddyfile = tmp_path / "Caddyfile"
            caddyfile.write_text(
                "{\n\tadmin off\n\tlocal_certs\n\tskip_install_trust\n\tdefault_bind 127.0.0.1\n"
                f"\thttp_port {http_port}\n\thttps_port {https_port}\n}}\n"
                f"import {DEPLOY / 'Caddyfile'}\n", encoding="utf-8")
            with open(caddy_log, "wb") as log:
                caddy_proc = await asyncio.create_subprocess_exec(
                    caddy, "run", "--config", str(caddyfile), "--adapter", "caddyfile", stdin=asyncio.subprocess.DEVNULL,
                    stdout=log, stderr=log, env=caddy_env(tmp_path / "caddy", BUNSHIN_DOMAIN="localhost",
                                                          BUNSHIN_UPSTREAM=f"127.0.0.1:{upstream}"))
            root = tmp_path / "caddy" / "data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"

            async def root_written():
                if caddy_proc.returncode is not None:
                    raise AssertionError(f"caddy exited ({caddy_proc.returncode})\n{logs()}")
                return root.exists() and root.stat().st_size > 0

            await wait_for(root_written, "Caddy's internal root certificate", logs)
            # Caddy's root only: a certificate from anywhere else (or none) fails the handshake.
            trust = ssl.create_default_context(cafile=str(root))
            base = f"https://localhost:{https_port}"
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as session:
                async def healthz():
                    if caddy_proc.returncode is not None:
                        raise AssertionError(f"caddy exited ({caddy_proc.returncode})\n{logs()}")
                    try:
                        async with session.get(base + "/healthz") as r:
                            # 503, passed through, while the model loads
                            return r.status == 200 and await r.json()
                    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                        return None  # Caddy still starting, or its certificate not issued yet

                health = await wait_for(healthz, "/healthz through Caddy", logs)
                assert health["ok"] is True and health["phase"] == "serving"

                async def post(body: bytes, signature: str) -> int:
                    async with session.post(base + "/callback", data=body, headers={
                            "Content-Type": "application/json", "X-Line-Signature": signature}) as r:
                        return r.status

                # What the LINE console's Verify button sends: a signed webhook without events.
                verify = json.dumps({"destination": "U" + "f" * 32, "events": []}).encode()
                assert await post(verify, sign(verify, SECRET)) == 200

                event = text_event("こんにちは、HTTPSで届いた？", user="U" + "1" * 32)
                body = webhook_bytes(event)
                assert await post(body, sign(body, SECRET)) == 200

                async def replied():
                    return fake.replies_to(event["replyToken"])

                (reply,) = await wait_for(replied, "the reply at the fake LINE API", logs)
                assert reply.texts and all(reply.texts)

                forged = webhook_bytes(text_event("偽物", user="U" + "2" * 32))
                assert await post(forged, sign(forged, "not-the-channel-secret")) == 401
                # Private: /metrics is not passed on, though the daemon serves it.
                async with session.get(base + "/metrics") as r:
                    assert r.status == 404
                async with session.get(f"http://127.0.0.1:{upstream}/metrics") as r:
                    assert r.status == 200
                # Plain HTTP is only a redirect to HTTPS.
                async with session.get(f"http://localhost:{http_port}/callback", allow_redirects=False) as r:
                    assert r.status in (301, 308) and r.headers["Location"].startswith("https://localhost")
            await asyncio.sleep(0.5)
            assert len(fake.delivered(REPLY)) == 1, "the forged webhook was answered"
            daemon.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(daemon.wait(), 60) == 0, logs()
        finally:
            for proc in (caddy_proc, daemon):
                if proc is not None and proc.returncode is None:
                    proc.kill()
                    await proc.wait()


# --- lint: what runs here only as a check ---


def test_caddyfile_is_valid_for_a_public_domain(tmp_path):
    """deploy/Caddyfile as compose gives it to caddy:2 (ACME for a real name), checked by Caddy itself."""
    result = subprocess.run(
        [_caddy_or_skip(), "validate", "--adapter", "caddyfile", "--config", str(DEPLOY / "Caddyfile")],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env=caddy_env(tmp_path, BUNSHIN_DOMAIN="bot.example.com", BUNSHIN_UPSTREAM="bunshin:8080"))
    assert result.returncode == 0 and "Valid configuration" in result.stdout + result.stderr, result.stderr


CADDYFILE_DOMAIN_DEFAULT = re.search(r"(?m)^\{\$BUNSHIN_DOMAIN:(\S+)\} \{$", (DEPLOY / "Caddyfile").read_text())[1]


@pytest.mark.parametrize("domain", [None, CADDYFILE_DOMAIN_DEFAULT])  # unset (systemd), compose's default
def test_caddyfile_without_a_domain_is_refused_naming_the_variable(tmp_path, domain):
    """Not "unrecognized global option: @public", which is what an empty site address gave."""
    env = {k: v for k, v in caddy_env(tmp_path).items() if k != "BUNSHIN_DOMAIN"}
    if domain is not None:
        env["BUNSHIN_DOMAIN"] = domain
    result = subprocess.run(
        [_caddy_or_skip(), "validate", "--adapter", "caddyfile", "--config", str(DEPLOY / "Caddyfile")],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=env)
    assert result.returncode != 0, result.stdout
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert "BUNSHIN_DOMAIN" in error and "is-not-set" in error, error


def test_caddyfile_passes_on_the_configured_webhook_path(deploy_config):
    public = re.search(r"@public path (.+)", (DEPLOY / "Caddyfile").read_text())[1].split()
    assert deploy_config.line.webhook_path in public and "/metrics" not in public


def test_deploy_config_keeps_state_on_the_data_volume(deploy_config):
    assert Path(deploy_config.memory.path).parent == Path("/data")
    assert Path(deploy_config.model.adapter).parent == Path("/adapters")
    assert deploy_config.line.enabled and deploy_config.server.enabled


def compose_seconds(duration: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a compose duration: {duration}"
    return sum(float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u] for n, u in parts)


def test_compose_reserves_a_gpu_keeps_state_and_outwaits_the_drain(deploy_config):
    import yaml  # PyYAML: installed with transformers, accelerate and peft, so never a reason to skip
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    bot, caddy = compose["services"]["bunshin"], compose["services"]["caddy"]

    (gpu,) = bot["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert bot["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    mounts = {v.split(":")[1]: v for v in bot["volumes"]}
    assert str(Path(deploy_config.memory.path).parent) in mounts and "/cache" in mounts
    assert mounts[deploy_config.model.adapter].endswith(":ro") and mounts["/config/config.toml"].endswith(":ro")
    # The adapter comes from a persona home, never from the repository's adapters/ (the platform adapters' code).
    assert mounts[deploy_config.model.adapter].startswith("../personas/")
    assert all(name in compose["volumes"] for name in (mounts["/data"].split(":")[0], mounts["/cache"].split(":")[0]))
    # The secrets every platform's *_env names by default, from .env, each optional (the daemon checks the
    # enabled ones), and nothing baked in.
    assert set(bot["environment"]) == set(SECRET_ENVS)
    assert all(v == f"${{{k}:-}}" for k, v in bot["environment"].items()), bot["environment"]
    assert compose_seconds(bot["stop_grace_period"]) > deploy_config.queue.drain_timeout_s + 5
    assert bot["restart"] in ("unless-stopped", "always", "on-failure")
    assert f"127.0.0.1:{deploy_config.server.port}:{deploy_config.server.port}" in bot["ports"]

    assert caddy["image"].startswith("caddy:2")
    assert {"80:80", "443:443"} <= set(caddy["ports"])
    assert "./Caddyfile:/etc/caddy/Caddyfile:ro" in caddy["volumes"]
    assert caddy["environment"]["BUNSHIN_UPSTREAM"] == f"bunshin:{deploy_config.server.port}"
    # Unset or empty in .env: the Caddyfile's own default, so Caddy's error names the variable (see below).
    assert caddy["environment"]["BUNSHIN_DOMAIN"] == f"${{BUNSHIN_DOMAIN:-{CADDYFILE_DOMAIN_DEFAULT}}}"
    assert any(v.endswith(":/data") for v in caddy["volumes"]), "Caddy's certificates must outlive the container"


def compose_environment(service: dict, dotenv: dict[str, str]) -> dict[str, str]:
    """What compose hands the container: each `${VAR:-default}` (the only form compose.yaml uses) read from .env."""
    resolved = {}
    for key, value in service["environment"].items():
        m = re.fullmatch(r"\$\{(\w+):-(.*)\}", value)
        resolved[key] = (dotenv.get(m[1]) or m[2]) if m else value
    return resolved


def test_env_example_names_every_variable_compose_reads():
    example = (DEPLOY / ".env.example").read_text()
    names = set(re.findall(r"(?m)^([A-Z_]+)=", example))
    compose_text = (DEPLOY / "compose.yaml").read_text()
    assert names == set(re.findall(r"\$\{(\w+):-", compose_text)) == {*SECRET_ENVS, "BUNSHIN_DOMAIN"}


def test_a_discord_only_deployment_needs_no_line_secret_and_without_its_token_is_refused_by_name(tmp_path):
    import yaml

    # deploy/config.toml made Discord-only, as its user would: LINE off, Discord on.
    text = (DEPLOY / "config.toml").read_text()
    assert "[line]\nenabled = true\n" in text
    config = tmp_path / "config.toml"
    config.write_text(text.replace("[line]\nenabled = true\n", "[line]\nenabled = false\n\n[discord]\nenabled = true\n"),
                      encoding="utf-8")
    bot = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["bunshin"]
    outside = {k: v for k, v in os.environ.items() if k not in SECRET_ENVS}

    # .env copied from the example and nothing filled in: compose starts the daemon, which names what is missing.
    empty = compose_environment(bot, {})
    assert empty == dict.fromkeys(SECRET_ENVS, "")
    proc = subprocess.run([sys.executable, "-m", "bot", "--config", str(config)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, env={**outside, **empty})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: {config}: [discord] token_env: environment variable DISCORD_BOT_TOKEN is not set"

    # The token alone is enough: LINE's empty variables are not asked for.
    load_config(config).check_ready(compose_environment(bot, {"DISCORD_BOT_TOKEN": "discord-token-1c1c"}))


def unit_sections(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit_drains_on_stop_and_is_hardened_without_breaking_cuda(deploy_config):
    text = (DEPLOY / "bunshin.service").read_text()
    service = {k: v[-1] for k, v in unit_sections(text)["Service"].items()}
    assert service["User"] not in ("", "root") and service["WorkingDirectory"].startswith("/")
    assert service["EnvironmentFile"].startswith("/etc/")
    assert re.fullmatch(r"/\S+/python -m bot --config /\S+\.toml", service["ExecStart"])
    assert service["KillSignal"] == "SIGTERM" and service["Restart"] == "on-failure"
    assert float(service["TimeoutStopSec"]) > deploy_config.queue.drain_timeout_s + 5
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service.get("StateDirectory") or service.get("ReadWritePaths"), "the data dir must stay writable"
    # These would hide /dev/nvidia* or forbid the JIT that CUDA and triton need.
    assert not {"PrivateDevices", "DevicePolicy", "DeviceAllow", "MemoryDenyWriteExecute"} & set(service)
    assert "multi-user.target" in unit_sections(text)["Install"]["WantedBy"]


def test_systemd_analyze_verifies_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed (the structure is checked above)")
    # verify wants ExecStart's binary to exist: this checkout's Python stands in for /opt/bunshin/.venv's.
    text = (DEPLOY / "bunshin.service").read_text()
    unit = tmp_path / "bunshin.service"
    unit.write_text(re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={sys.executable}", text), encoding="utf-8")
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    # A bad value is only a warning (exit 0), so any output fails too.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"(?m)^(?!#)\s*([A-Za-z]+)\s+(.*)$", text)]


def test_dockerfile_runs_the_daemon_unprivileged_with_a_healthcheck_and_no_secrets(deploy_config):
    steps = dockerfile_instructions()
    once = dict(steps)  # the last of each: only FROM, CMD, HEALTHCHECK and VOLUME, which appear once
    base = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu\d+\.\d+", once["FROM"])
    assert base, once["FROM"]
    args = dict(v.split("=", 1) for k, v in steps if k == "ARG")
    assert args["TORCH_CUDA"] == f"cu{base[1]}{base[2]}", "the torch wheel's CUDA must be the base image's"
    makefile_torch = re.search(r"(?m)^TORCH \?= torch==(\S+)", (REPO / "Makefile").read_text())[1]
    assert args["TORCH_VERSION"] == makefile_torch, "the image runs the torch CI tests"
    users = [v for k, v in steps if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert json.loads(once["CMD"]) == ["python", "-m", "bot", "--config", "/config/config.toml"]
    assert f"127.0.0.1:{deploy_config.server.port}/healthz" in once["HEALTHCHECK"]
    assert "/data" in json.loads(once["VOLUME"])
    secret_names = {deploy_config.line.channel_secret_env, deploy_config.line.access_token_env,
                    deploy_config.discord.token_env}
    baked = " ".join(v for k, v in steps if k in ("ENV", "ARG"))
    assert not any(name in baked for name in secret_names) and not re.search(r"SECRET|TOKEN|PASSWORD", baked)


def test_dockerignore_sends_what_the_build_copies_and_nothing_secret():
    patterns = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*", "an allowlist: anything new stays out of the image unless named"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for kind, value in dockerfile_instructions():
        if kind == "COPY":
            for source in value.split()[:-1]:
                assert source in allowed or f"{source}/*.py" in allowed, f"COPY {source} is not in the build context"
    assert not any(p.startswith("!") and (".env" in p or ".venv" in p or "sqlite" in p) for p in patterns)
