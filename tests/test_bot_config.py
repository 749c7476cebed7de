"""The bot's config: the root config.toml is valid, and every mistake names the file, `[section] key` and why."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO

from finetune.config import BotConfig, ConfigError, load_config
from finetune.prepare_args import prepare_defaults_from_config

SECRET = "MTIzNDU2Nzg5.secret-token-value-xyz"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bot.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _located_problems(tmp_path: Path, text: str) -> list[tuple[int | None, str]]:
    """(line or None, problem) for each problem of the file: `FILE:LINE: problem` or `FILE: problem`."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert lines == info.value.problems
    located = [re.fullmatch(rf"{re.escape(str(path))}(?::(\d+))?: (.+)", line) for line in lines]
    assert all(located), lines
    return [(int(m[1]) if m[1] else None, m[2]) for m in located]


def _problems(tmp_path: Path, text: str) -> list[str]:
    return [problem for _, problem in _located_problems(tmp_path, text)]


def test_root_config_loads_and_matches_the_defaults():
    config = load_config(REPO / "config.toml")
    # The documented file states the defaults: loading it changes nothing but [prepare].
    assert config.model_dump(exclude={"prepare"}) == BotConfig.default().model_dump(exclude={"prepare"})
    assert config.model.base == "" and config.model.base_model == "rinna/japanese-gpt-neox-3.6b"  # "": an adapter's own
    assert config.prepare.session_gap == 3 * 3600  # "3h", read as prepare's flag reads it
    # ... and `finetune prepare --config` reads its table through the same model of the file.
    assert prepare_defaults_from_config(REPO / "config.toml")["max_context_turns"] == 10


def test_empty_file_gives_the_defaults(tmp_path):
    config = load_config(_write(tmp_path, ""))
    assert config.model_dump() == BotConfig.default().model_dump()
    assert config.model.adapter == ""  # the daemon loads the base model alone
    assert config.model.quantize == "none" and config.model.dtype == "auto" and config.model.revision is None
    assert config.memory.path == "" and config.memory.max_turns == 20  # "": in the persona home (bot/memory_location.py)
    assert config.memory.reset_commands == ["/reset", "リセット"]
    assert (config.queue.max_size, config.queue.max_batch, config.queue.batch_wait_ms) == (64, 8, 5)
    assert (config.queue.deadline_s, config.queue.drain_timeout_s) == (60, 30)
    assert (config.limits.messages_per_minute, config.limits.burst, config.limits.max_message_chars) == (10, 5, 2000)
    assert config.limits.allow_users == [] and config.limits.allow_chats == []
    assert (config.server.enabled, config.server.host, config.server.port) == (True, "127.0.0.1", 8080)
    assert config.enabled_platforms() == []
    assert config.generation.overrides() == {}
    assert config.logging.level == "INFO" and config.logging.log_message_text is False
    assert config.source == str(tmp_path / "bot.toml")


def test_values_are_read(tmp_path):
    config = load_config(_write(tmp_path, """
[model]
adapter = "runs/misaki"
quantize = "4bit"
device = "cuda:1"
[persona]
template = "instruction"
[generation]
temperature = 0
top_p = 0.8
max_new_tokens = 64
[limits]
allow_users = ["discord:1234", "line:Uabc"]
messages_per_minute = 0.5
[logging]
level = "debug"
"""))
    assert config.model.adapter == "runs/misaki" and config.model.device == "cuda:1"
    assert config.generation.overrides() == {"temperature": 0, "top_p": 0.8, "max_new_tokens": 64}
    assert config.limits.messages_per_minute == 0.5
    assert config.logging.level == "DEBUG"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[memory]\nmax_turn = 5\n", "[memory] max_turn: unknown key (did you mean max_turns?); known: path, max_turns, reset_commands"),
        ("[memroy]\npath = 'x'\n", "[memroy]: unknown section (did you mean [memory]?); known: model, persona, generation, memory"),
        ("[server]\nport = '8080'\n", "[server] port: expected an integer, got a string"),
        ("[server]\nport = 70000\n", "[server] port: must be <= 65535"),
        ("[server]\nport = -1\n", "[server] port: must be >= 0"),
        ("[server]\nenabled = 'yes'\n", "[server] enabled: expected true or false, got a string"),
        ("[queue]\nmax_size = 0\n", "[queue] max_size: must be > 0"),
        ("[queue]\nbatch_wait_ms = -1\n", "[queue] batch_wait_ms: must be >= 0"),
        ("[queue]\ndeadline_s = 'soon'\n", "[queue] deadline_s: expected a number, got a string"),
        ("[generation]\ntop_p = 0\n", "[generation] top_p: must be > 0"),
        ("[generation]\nmax_new_tokens = 4096\n", "[generation] max_new_tokens: must be <= 2048"),
        ("[generation]\ntop_k = 1.5\n", "[generation] top_k: expected an integer, got a number"),
        ("[model]\nquantize = '2bit'\n", "[model] quantize: must be 'none', '8bit' or '4bit'"),
        ("[model]\ndtype = 'float16'\n", "[model] dtype: must be 'auto', 'bf16', 'fp16' or 'fp32'"),
        ("[model]\ndevice = 'gpu'\n", '[model] device: must be "" (auto), "cpu", "cuda", "cuda:N" or "mps"'),
        ("[persona]\ntemplate = 'chat'\n", "[persona] template: must be '', 'transcript' or 'instruction'"),
        ("[logging]\nlevel = 'LOUD'\n", "[logging] level: must be 'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL'"),
        ("[limits]\nallow_users = ['1234']\n", '[limits] allow_users[0]: must be "platform:id"'),
        ("[limits]\nallow_chats = 'discord:1'\n", "[limits] allow_chats: expected a list, got a string"),
        ("[memory]\nreset_commands = ['/reset', 3]\n", "[memory] reset_commands[1]: expected a string, got an integer"),
        ("memory = 3\n", "[memory]: expected a table, got an integer"),
        ("[line]\nwebhook_path = 'callback'\n", '[line] webhook_path: must start with "/"'),
        ("[discord]\ntoken_env = ''\n", "[discord] token_env: must name an environment variable"),
    ],
)
def test_bad_value_names_section_key_and_why(tmp_path, toml, expected):
    (problem,) = _problems(tmp_path, toml)
    assert problem.startswith(expected), problem


LINE_ID = "U4af4980629" + "0" * 22


def test_people_maps_platform_ids_to_names(tmp_path):
    config = load_config(_write(tmp_path, f"""
[people]
"line:{LINE_ID}" = "健太"
"discord:123456789012345678" = "健太"
"discord:42" = "ゆい"
"""))
    assert config.people == {f"line:{LINE_ID}": "健太", "discord:123456789012345678": "健太", "discord:42": "ゆい"}
    assert BotConfig.default().people == {}


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('"123456789012345678" = "健太"', '[people] "123456789012345678": must be "line:" and a LINE user id or '
                                          '"discord:" and a Discord user id'),
        ('"健太" = "健太"', '[people] "健太": must be "line:" and a LINE user id'),
        ('"slack:U123" = "健太"', '[people] "slack:U123": must be "line:"'),
        ('"line:" = "健太"', '[people] "line:": a LINE user id is "U" and 32 lowercase hex digits'),
        ('"line:C4af4980629' + "0" * 22 + '" = "健太"', '[people] "line:C4af'),  # a group's id
        (f'"line:{LINE_ID.upper()}" = "健太"', "a LINE user id is"),  # ids are lowercase: this would match nobody
        (f'"line:{LINE_ID[:-1]}" = "健太"', "a LINE user id is"),
        ('"discord:kenta#1234" = "健太"', '[people] "discord:kenta#1234": a Discord user id is digits'),
        ('"discord:<@123>" = "健太"', "a Discord user id is digits"),
        ('"discord:" = "健太"', "a Discord user id is digits"),
        ('"discord:123" = ""', '[people] "discord:123": must not be empty'),
        ('"discord:123" = "健\\n太"', '[people] "discord:123": must be one line'),
        ('"discord:123" = 5', '[people] "discord:123": expected a string, got an integer'),
    ],
)
def test_bad_people_keys_and_names_name_the_key_and_why(tmp_path, toml, expected):
    (problem,) = _problems(tmp_path, "[people]\n" + toml + "\n")
    assert expected in problem and problem.startswith("[people] "), problem


def test_people_must_be_a_table(tmp_path):
    (problem,) = _problems(tmp_path, 'people = ["discord:123"]\n')
    assert problem == "[people]: expected a table, got a list"


def test_nested_table_is_named_with_a_dot(tmp_path):
    (problem,) = _problems(tmp_path, "[discord.intents]\nmembers = true\n")
    assert problem.startswith("[discord] intents: unknown key")
    (problem,) = _problems(tmp_path, "[model]\nbase = 'x'\n[memory.sqlite]\nx = 1\n")
    assert problem.startswith("[memory] sqlite: unknown key")


@pytest.mark.parametrize(
    ("toml", "line", "expected"),
    [
        ("[model]\nadapter = 'x'\n\n[servr]\nport = 8090\n", 4, "[servr]: unknown section (did you mean [server]?); known: model,"),
        ("[Server]\nport = 8090\n", 1, "[Server]: unknown section (did you mean [server]?)"),
        ("[prepair]\nredact = false\n", 1, "[prepair]: unknown section (did you mean [prepare]?)"),
        ("servr.port = 8090\n", 1, "[servr]: unknown section (did you mean [server]?)"),
        ("[frobnicate]\nx = 1\n", 1, "[frobnicate]: unknown section; known: model,"),  # nothing close: no guess
        ("[model]\nbase = 'x'\nadaptor = 'runs/misaki'\n", 3, "[model] adaptor: unknown key (did you mean adapter?)"),
        ("[discord]\nenabled = true\nTOKEN_ENV = 'X'\n", 3, "[discord] TOKEN_ENV: unknown key (did you mean token_env?)"),
        # the right key in the wrong table
        ("[server]\nport = 8090\nadapter = 'runs/misaki'\n", 3, "[server] adapter: unknown key (did you mean [model] adapter?)"),
        # at any depth: a sub-table, a dotted key, an inline table (found at its table's line)
        ("[line]\nenabled = true\n[line.webhook]\npath = '/cb'\n", 3, "[line] webhook: unknown key (did you mean webhook_path?)"),
        ("[queue]\nlimits.max = 3\n", 2, "[queue] limits: unknown key"),
        ("[memory]\npath = 'm.sqlite3'\n\nserver = { prot = 1 }\n", 4, "[memory] server: unknown key"),
        ("server = { prot = 1 }\n", 1, "[server] prot: unknown key (did you mean port?)"),
        # a multi-line string's lines are no keys: the typo is found where it really is
        ('[persona]\nname = """\n[servr]\nprot = 1\n"""\n[servr]\n', 6, "[servr]: unknown section"),
        ("[people]\n\"discord:1\" = '健太'\n[model]\n\"adaptor\" = 'x'\n", 4, "[model] adaptor: unknown key (did you mean adapter?)"),
    ],
)
def test_a_misspelt_section_or_key_gets_its_line_and_the_closest_name(tmp_path, toml, line, expected):
    ((at, problem),) = _located_problems(tmp_path, toml)
    assert problem.startswith(expected), problem
    assert at == line, (at, problem)


def test_a_bad_value_keeps_the_plain_prefix(tmp_path):
    """Only unknown names get a line: for a bad value the section and key are what to search for."""
    assert _located_problems(tmp_path, "[server]\nport = '8080'\n") == [
        (None, "[server] port: expected an integer, got a string")]


def test_the_daemon_reports_a_misspelt_section_by_line(tmp_path, cli):
    path = _write(tmp_path, "[model]\nadapter = 'runs/misaki'\n[servr]\nport = 8090\n")
    proc = cli("--config", path, module="bot", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {path}:3: [servr]: unknown section (did you mean [server]?); known: "), proc.stderr


def test_every_problem_is_reported_one_per_line(tmp_path):
    problems = _problems(tmp_path, """
[model]
quantize = "2bit"
[queue]
max_size = -1
max_batch = "8"
[typo]
x = 1
""")
    assert len(problems) == 4
    assert [p.split(":")[0] for p in problems] == ["[model] quantize", "[queue] max_size", "[queue] max_batch", "[typo]"]


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"bot\.toml: not valid TOML"):
        load_config(_write(tmp_path, "[model\n"))


def test_from_dict_validates_like_a_file():
    config = BotConfig.from_dict({"persona": {"name": "美咲"}, "console": {"enabled": True}}, source="--demo")
    assert config.persona.name == "美咲" and config.enabled_platforms() == ["console"]
    with pytest.raises(ConfigError) as info:
        BotConfig.from_dict({"queue": {"max_size": 0}}, source="--demo")
    assert str(info.value) == "--demo: [queue] max_size: must be > 0"


def test_prepare_table_is_checked_like_the_others(tmp_path):
    config = load_config(_write(tmp_path, "[prepare]\nsession_gap = '2h'\nexport = 'alpaca'\n"))
    assert config.prepare.overrides() == {"session_gap": 7200.0, "export": ["alpaca"]}
    problems = _problems(tmp_path, "[prepare]\nmax_context_turn = 5\neval_fraction = 1.5\nredact = 'no'\n")
    assert problems == [
        "[prepare] eval_fraction: must be < 1",
        "[prepare] redact: expected true or false, got a string",
        "[prepare] max_context_turn: unknown key (did you mean max_context_turns?); known: session_gap, "
        "max_context_turns, max_context_chars, max_turn_chars, min_context_turns, eval_fraction, redact, timezone, export",
    ]


def test_config_is_immutable():
    config = BotConfig.default()
    with pytest.raises(ValueError):
        config.server.port = 1


# --- secrets ---------------------------------------------------------------------------------


def test_secret_from_environment(monkeypatch):
    monkeypatch.setenv("DISCORD_BOT_TOKEN", SECRET)
    config = BotConfig.from_dict({"discord": {"enabled": True}})
    assert config.secret(config.discord.token_env) == SECRET
    config.check_secrets()


def test_missing_secret_names_section_key_and_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("MY_LINE_SECRET", raising=False)
    monkeypatch.setenv("LINE_CHANNEL_ACCESS_TOKEN", "")  # empty counts as unset
    path = _write(tmp_path, "[line]\nenabled = true\nchannel_secret_env = 'MY_LINE_SECRET'\n")
    config = load_config(path)
    with pytest.raises(ConfigError) as info:
        config.secret("MY_LINE_SECRET")
    assert str(info.value) == f"{path}: [line] channel_secret_env: environment variable MY_LINE_SECRET is not set"
    with pytest.raises(ConfigError) as info:
        config.check_secrets()
    assert info.value.problems == [
        f"{path}: [line] channel_secret_env: environment variable MY_LINE_SECRET is not set",
        f"{path}: [line] access_token_env: environment variable LINE_CHANNEL_ACCESS_TOKEN is not set",
    ]


def test_only_enabled_platforms_need_secrets(monkeypatch):
    for name in ("DISCORD_BOT_TOKEN", "LINE_CHANNEL_SECRET", "LINE_CHANNEL_ACCESS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    BotConfig.from_dict({"console": {"enabled": True}}).check_secrets()
    with pytest.raises(ConfigError, match=r"\[discord\] token_env: environment variable DISCORD_BOT_TOKEN"):
        BotConfig.from_dict({"discord": {"enabled": True}}).check_secrets()


def test_check_ready_wants_a_persona_without_an_adapter():
    environ = {"DISCORD_BOT_TOKEN": SECRET}
    with pytest.raises(ConfigError, match=r"\[persona\] name: required when \[model\] adapter is empty"):
        BotConfig.default().check_ready(environ)
    BotConfig.from_dict({"persona": {"name": "美咲"}}).check_ready(environ)
    BotConfig.from_dict({"model": {"adapter": "runs/misaki"}, "discord": {"enabled": True}}).check_ready(environ)


def test_no_secret_in_repr_or_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("DISCORD_BOT_TOKEN", SECRET)
    config = load_config(_write(tmp_path, "[discord]\nenabled = true\n"))
    config.check_secrets()
    assert config.secret("DISCORD_BOT_TOKEN") == SECRET
    for text in (repr(config), str(config), config.model_dump_json(), repr(config.discord)):
        assert SECRET not in text
    # A token pasted where the variable's name belongs is refused without being repeated.
    problems = _problems(tmp_path, f"[discord]\ntoken_env = '{SECRET}'\n[secrets]\ntoken = '{SECRET}'\n")
    assert len(problems) == 2 and not any(SECRET in p for p in problems)
    assert problems[0].startswith("[discord] token_env: must name an environment variable")
