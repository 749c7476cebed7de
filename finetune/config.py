"""bunshin's configuration: one TOML file, one model of it, one loader (`load_config`).

The daemon reads it at start; `finetune prepare --config` takes its [prepare] table and `finetune train
--config` its [model] base as their flags' defaults. It lives in finetune/, the lower layer, so that both sides read
it without the offline commands reaching up into bot/. Each validates the whole file, so a mistake anywhere
in it is reported by whichever reads it first.

Every table forbids unknown keys and every value is checked strictly (no "8080" for 8080), so
a typo fails at start with a line per problem: `FILE: [section] key: why` (an unknown name as
`FILE:LINE: [section] key: unknown key (did you mean ...?)`, found by `key_lines`). Defaults make an
empty file valid; `config.toml` at the repository root documents every key.

Secrets never live in the file or in this object: `*_env` keys name environment variables,
read by `BotConfig.secret()` when a platform starts. Error messages name the section, the key
and the variable, never a value, so neither logs nor tracebacks can leak a token. An `*_env`
value must look like a variable name (capitals, digits, `_`), which catches the common mistake
of pasting the token itself there before anything echoes it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from .cli_values import parse_duration, parse_export_formats
from .manifest import AdapterManifest
from .model_loading import DEFAULT_BASE, DTYPE_CHOICES, QUANTIZE_CHOICES, ModelLoadError, read_adapter_manifest

PLATFORMS = ("console", "discord", "line")


class ConfigError(Exception):
    """The configuration cannot be used; `str()` has one line per problem, `problems` the same as a list."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# --- value checks shared by several keys ---------------------------------------------------

_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_DEVICE = re.compile(r"^(|cpu|mps|cuda|cuda:\d+)$")


def _env_name(value: str) -> str:
    if not _ENV_NAME.match(value):
        # The value is never repeated: a secret pasted here by mistake must not reach a log.
        raise ValueError("must name an environment variable (capitals, digits, _), not hold the secret itself")
    return value


def _device(value: str) -> str:
    if not _DEVICE.match(value):
        raise ValueError('must be "" (auto), "cpu", "cuda", "cuda:N" or "mps"')
    return value


def _base_url(value: str) -> str:
    if value and not re.match(r"^https?://[^/\s?#]+(/[^\s?#]*)?$", value):
        raise ValueError('must be an http(s) URL without query, e.g. "http://127.0.0.1:8000/v1"')
    return value


def _platform_key(value: str) -> str:
    platform, sep, ident = value.partition(":")
    if not sep or platform not in PLATFORMS or not ident:
        raise ValueError(f'must be "platform:id" with platform one of {", ".join(PLATFORMS)}, e.g. "discord:1234"')
    return value


def _not_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


EnvName = Annotated[str, AfterValidator(_env_name)]
PlatformKey = Annotated[str, AfterValidator(_platform_key)]
NonEmpty = Annotated[str, AfterValidator(_not_empty)]


class _Section(BaseModel):
    # strict: TOML already has types, so "8080" for a port is a mistake worth reporting.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# --- the tables ------------------------------------------------------------------------------


class ModelConfig(_Section):
    # "" = the adapter's base (its bunshin.json names it), or DEFAULT_BASE without an adapter. Named beside an
    # adapter, it must be that same base: `adapter_manifest()` refuses another (naming both).
    base: str = ""
    revision: Annotated[str | None, AfterValidator(lambda v: v or None)] = None  # TOML has no null: "" = latest
    adapter: str = ""  # `finetune train` adapter folder or merged model; "" = the base model alone
    quantize: Literal[QUANTIZE_CHOICES] = "none"
    device: Annotated[str, AfterValidator(_device)] = ""
    dtype: Literal[DTYPE_CHOICES] = "auto"
    # continuous batching, plain batched generate(), or an OpenAI-compatible engine elsewhere (bot/remote_engine.py)
    engine: Literal["slots", "plain", "openai"] = "slots"
    merge_adapter: bool = True  # fold the LoRA weights into the base at load (not with quantize)
    cuda_graphs: bool = True
    compile: bool = False  # torch.compile the slot engine's decode step (GPU only)
    # a message that arrives while replies decode joins their forward passes (engine/scheduler.py); false: it waits
    # for a prefill step of its own, as before mixed steps
    mixed_steps: bool = True
    # engine = "openai": the engine's completions endpoint; no weights are loaded here, only tokenizer and manifest.
    base_url: Annotated[str, AfterValidator(_base_url)] = ""  # e.g. "http://127.0.0.1:8000/v1"
    api_key_env: Annotated[str, AfterValidator(lambda v: v and _env_name(v))] = ""  # "" = the engine needs no key
    remote_model: str = ""  # the model name the engine serves (vLLM: what `vllm serve` was given, or a LoRA's name)
    max_concurrency: int = Field(64, gt=0, le=4096)  # requests in flight to the engine at once
    timeout_s: float = Field(60.0, gt=0, le=3600)  # to connect, and for each next piece of a reply

    @property
    def base_model(self) -> str:
        """The base served without an adapter: [model] base, else DEFAULT_BASE."""
        return self.base or DEFAULT_BASE

    @model_validator(mode="after")
    def _remote_engine_named(self) -> ModelConfig:
        missing = [key for key in ("base_url", "remote_model") if self.engine == "openai" and not getattr(self, key)]
        if missing:
            raise ValueError(f'engine = "openai" needs {" and ".join(missing)}')
        return self


class PersonaConfig(_Section):
    name: str = ""  # "" = the adapter's persona
    template: Literal["", "transcript", "instruction"] = ""  # "" = the adapter's


class GenerationConfig(_Section):
    """Overrides of the adapter manifest's generation settings; None = the manifest's value."""

    max_new_tokens: int | None = Field(None, ge=1, le=2048)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)

    def overrides(self) -> dict[str, int | float]:
        """The keys the file sets, to lay over the manifest's `generation` dict."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class MemoryConfig(_Section):
    # "" = memory.sqlite3 in the persona home (bot/memory_location.py); else relative to the working directory;
    # ":memory:" keeps nothing
    path: str = ""
    max_turns: int = Field(20, gt=0)
    reset_commands: list[NonEmpty] = Field(default_factory=lambda: ["/reset", "リセット"])
    # What a reply recalls beyond the window (bot/reply_memory.py): the persona's memory from the adapter folder,
    # the chat's own older turns, and a profile file at the top of every prompt.
    person: bool = True
    notes: int = Field(0, ge=0, le=64)  # notes per reply from each source; 0 = as trained (the manifest's memory.notes)
    chat_recall: bool = True
    recall_keep: int = Field(2000, gt=0, le=100_000)  # a chat's turns kept on disk and searched for recall
    profile: str = ""  # "" = none

    def kept_turns(self) -> int:
        """Turns kept per chat in the SQLite file (ConversationMemory's `keep`): a few prompts' worth, or what
        chat recall searches."""
        return max(4 * self.max_turns, self.recall_keep) if self.chat_recall else 4 * self.max_turns


class QueueConfig(_Section):
    max_size: int = Field(64, gt=0)
    max_batch: int = Field(8, gt=0)
    batch_wait_ms: float = Field(5.0, ge=0)
    deadline_s: float = Field(60.0, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0)
    # Accepted messages being answered at once (the rest wait their turn in the inbox, in order).
    max_active: int = Field(256, gt=0)


class LimitsConfig(_Section):
    messages_per_minute: float = Field(10.0, gt=0)
    burst: int = Field(5, gt=0)
    allow_users: list[PlatformKey] = Field(default_factory=list)
    allow_chats: list[PlatformKey] = Field(default_factory=list)
    # Who may run admin commands ([memory] reset_commands): a reset wipes a whole chat's memory,
    # a group's included, so it is not for everyone in the group. Empty = nobody but the console.
    admins: list[PlatformKey] = Field(default_factory=list)
    max_message_chars: int = Field(2000, gt=0)


class ServerConfig(_Section):
    enabled: bool = True
    host: NonEmpty = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)  # 0 = any free port (tests, --demo)


class ConsoleConfig(_Section):
    enabled: bool = False
    user_name: NonEmpty = "あなた"


def _snowflake(value: str) -> str:
    if not value.isdigit():
        raise ValueError('must be a Discord id written as a string of digits, e.g. "123456789012345678"')
    return value


Snowflake = Annotated[str, AfterValidator(_snowflake)]


class DiscordConfig(_Section):
    enabled: bool = False
    token_env: EnvName = "DISCORD_BOT_TOKEN"
    # Empty = every server / channel / user. A thread counts as its parent channel; a DM is let in by allow_users alone.
    allow_guilds: list[Snowflake] = Field(default_factory=list)
    allow_channels: list[Snowflake] = Field(default_factory=list)
    allow_users: list[Snowflake] = Field(default_factory=list)
    answer_everyone: bool = False  # treat @everyone / @here as addressed to the bot
    answer_bots: bool = False  # answer other bots (never its own messages)
    # A message accepted before a crash or restart is answered after it only while younger than this.
    answer_missed_within_s: float = Field(600.0, ge=0)


def _webhook_path(value: str) -> str:
    if not value.startswith("/") or value in ("/healthz", "/metrics"):
        raise ValueError('must start with "/" and not be /healthz or /metrics')
    return value


def _api_host(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+$", value):
        raise ValueError('must be a scheme and host without a path, e.g. "https://api.line.me"')
    return value


class LineConfig(_Section):
    enabled: bool = False
    channel_secret_env: EnvName = "LINE_CHANNEL_SECRET"
    access_token_env: EnvName = "LINE_CHANNEL_ACCESS_TOKEN"
    webhook_path: Annotated[str, AfterValidator(_webhook_path)] = "/callback"
    api_host: Annotated[str, AfterValidator(_api_host)] = "https://api.line.me"  # a fake LINE in tests
    call_by_name: bool = False  # in groups, also answer when the persona's name is in the text (not only @mentions)
    push_fallback: bool = False  # a reply token gone stale -> push instead (pushes count against the plan's quota)
    reply_token_margin_s: float = Field(50.0, ge=0, le=60)  # use the reply token only this long after the event
    # A reply whose outcome is unknown (tried, then the bot died or the answer was lost) once its token is past
    # margin: "push" delivers it, perhaps a second time; "drop" does not, so perhaps never. Logged either way.
    unknown_outcome: Literal["push", "drop"] = "drop"
    api_timeout_s: float = Field(10.0, gt=0, le=120)  # per call to LINE's API (the SDK's own default is 300 s)


# [people] keys: exactly what the platform adapters' user keys look like, so that a typo cannot silently match nobody.
_LINE_USER_ID = re.compile(r"^U[0-9a-f]{32}$")
_DISCORD_USER_ID = re.compile(r"^[0-9]{1,20}$")


def _person_key(value: str) -> str:
    platform, sep, ident = value.partition(":")
    if platform == "line" and sep:
        if not _LINE_USER_ID.match(ident):
            raise ValueError('a LINE user id is "U" and 32 lowercase hex digits, as LINE\'s webhooks give it '
                             "(not a group or room id, nor a display name)")
    elif platform == "discord" and sep:
        if not _DISCORD_USER_ID.match(ident):
            raise ValueError('a Discord user id is digits, as "Copy User ID" gives it (Developer Mode), not a username')
    else:
        raise ValueError('must be "line:" and a LINE user id or "discord:" and a Discord user id, e.g. '
                         '"line:U4af4980629..." or "discord:123456789012345678"')
    return value


def _speaker_name(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    if any(ch in value for ch in "\r\n"):
        raise ValueError("must be one line (a name starts a line of the conversation the model reads)")
    return value


PersonKey = Annotated[str, AfterValidator(_person_key)]
SpeakerName = Annotated[str, AfterValidator(_speaker_name)]


class ApiConfig(_Section):
    """bunshin as an OpenAI-compatible server (bot/api.py), on the daemon's HTTP server ([server] host and port)."""

    enabled: bool = False
    key_env: EnvName = "BUNSHIN_API_KEY"  # clients send its value as `Authorization: Bearer ...`
    model_id: str = ""  # the one model /v1/models lists; "" = the persona's name
    user_name: SpeakerName = "あなた"  # the speaker of a `user` message that has no `name`
    system_messages: Literal["ignore", "reject"] = "ignore"  # the persona was never trained with a system prompt
    max_body_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    # Per client address (token bucket), before the queue: one script cannot take every place in it.
    requests_per_minute: float = Field(60.0, gt=0)
    burst: int = Field(10, gt=0)


class LoggingConfig(_Section):
    level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(_upper)] = "INFO"
    log_message_text: bool = False


def _duration_seconds(value: Any) -> Any:
    """`session_gap` as --session-gap reads it: "45s", "30m", "3h", "1d", or a bare number of minutes."""
    try:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return parse_duration(str(value))
    except argparse.ArgumentTypeError:
        pass
    raise ValueError('must be a duration: "45s", "30m", "3h", "1d", or a number of minutes')


def _export_formats(value: Any) -> Any:
    """`["sharegpt", "alpaca"]` or `"sharegpt,alpaca"`; an empty list or string asks for none."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    if not isinstance(value, str):
        raise ValueError('must be a list of format names, e.g. ["sharegpt", "alpaca"]')
    try:
        return parse_export_formats(value) if value.strip() else []
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None


def _time_zone(value: str) -> str | None:
    if not value:
        return None  # TOML has no null: "" = this machine's zone, as without --timezone
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError('must be a time zone name such as "Asia/Tokyo", or "" for the zone of the machine') from None
    return value


class PrepareConfig(_Section):
    """`finetune prepare --config`'s defaults, each as its flag reads it; flags on the command line still win.
    None = not in the file: the flag's own default. The daemon does not use them, but checks them all the same."""

    session_gap: Annotated[float | None, BeforeValidator(_duration_seconds)] = None  # in seconds once read
    max_context_turns: int | None = Field(None, ge=0)
    max_context_chars: int | None = Field(None, ge=0)
    max_turn_chars: int | None = Field(None, gt=0)
    min_context_turns: int | None = Field(None, ge=0)
    eval_fraction: float | None = Field(None, ge=0, lt=1)
    redact: bool | None = None
    timezone: Annotated[str | None, AfterValidator(_time_zone)] = None
    export: Annotated[list[str] | None, BeforeValidator(_export_formats)] = None

    def overrides(self) -> dict[str, Any]:
        """The keys the file sets, by their [prepare] names."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


# Platform (or [api], or [model] with engine = "openai") -> the *_env keys it needs when enabled.
_SECRET_KEYS = {"discord": ("token_env",), "line": ("channel_secret_env", "access_token_env"), "api": ("key_env",),
                "model": ("api_key_env",)}


class BotConfig(_Section):
    """The whole file: the daemon's tables, and [prepare] for `finetune prepare`."""

    model: ModelConfig = ModelConfig()
    persona: PersonaConfig = PersonaConfig()
    generation: GenerationConfig = GenerationConfig()
    memory: MemoryConfig = MemoryConfig()
    queue: QueueConfig = QueueConfig()
    limits: LimitsConfig = LimitsConfig()
    server: ServerConfig = ServerConfig()
    console: ConsoleConfig = ConsoleConfig()
    discord: DiscordConfig = DiscordConfig()
    line: LineConfig = LineConfig()
    api: ApiConfig = ApiConfig()
    # "platform:id" -> the name the training export gives that person: the platform adapters name them so, and
    # LINE's profile is not asked. The same name under two ids makes one speaker of them.
    people: dict[PersonKey, SpeakerName] = Field(default_factory=dict)
    logging: LoggingConfig = LoggingConfig()
    prepare: PrepareConfig = PrepareConfig()
    _source: str = PrivateAttr("<defaults>")  # the file it came from, for messages

    @property
    def source(self) -> str:
        return self._source

    @classmethod
    def default(cls) -> BotConfig:
        return cls()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<config>", text: str | None = None) -> BotConfig:
        """Validate a dict shaped like the TOML file (tests, --demo); problems raise ConfigError.

        With the file's `text`, an unknown section or key is reported at its line (`FILE:LINE: ...`): a typo is
        found by where it is, since its name is not one the user would search for."""
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            lines = key_lines(text) if text is not None else {}
            raise ConfigError([f"{_at(source, lines, err)}: {_describe(err)}" for err in exc.errors()]) from None
        config._source = source
        return config

    def adapter_manifest(self) -> AdapterManifest | None:
        """[model] adapter's bunshin.json (None without an adapter): the base, persona and template it was trained
        with. An adapter's weights mean something only on its own base, so a [model] base naming another is an
        error naming both, never a base loaded beside it. Raises ModelLoadError (no adapter there) or ConfigError."""
        if not self.model.adapter:
            return None
        manifest = read_adapter_manifest(Path(self.model.adapter))
        if self.model.base and self.model.base != manifest.base_model:
            raise ConfigError([
                f"{self.source}: [model] base: {self.model.base!r} is not {manifest.base_model!r}, the base adapter "
                f"{self.model.adapter} was trained on (its bunshin.json); leave [model] base out to serve the adapter "
                "on its own base"])
        return manifest

    def is_admin(self, user_key: str) -> bool:
        """May this "platform:id" run admin commands? The console's user is the operator at the terminal."""
        return user_key.startswith("console:") or user_key in self.limits.admins

    def enabled_platforms(self) -> list[str]:
        return [p for p in PLATFORMS if getattr(self, p).enabled]

    def secret(self, env_name: str, environ: Mapping[str, str] | None = None) -> str:
        """The value of the environment variable `env_name` (as an `*_env` key names it)."""
        environ = os.environ if environ is None else environ
        value = environ.get(env_name, "")
        if not value.strip():
            raise ConfigError([f"{self.source}: {self._names(env_name)}: environment variable {env_name} is not set"])
        return value

    def check_secrets(self, environ: Mapping[str, str] | None = None) -> None:
        """Every enabled platform's secrets, [api]'s key and the remote engine's are set (disabled ones are not asked for)."""
        problems = []
        asked = self.enabled_platforms() + (["api"] if self.api.enabled else [])
        if self.model.engine == "openai" and self.model.api_key_env:
            asked.append("model")
        for platform in asked:
            for key in _SECRET_KEYS.get(platform, ()):
                try:
                    self.secret(getattr(getattr(self, platform), key), environ)
                except ConfigError as exc:
                    problems += exc.problems
        if problems:
            raise ConfigError(problems)

    def check_ready(self, environ: Mapping[str, str] | None = None) -> None:
        """What the daemon needs before it serves: a persona to speak as, the enabled platforms' secrets, and no
        [model] base beside an adapter trained on another."""
        problems = []
        if not self.model.adapter and not self.persona.name:
            problems.append(f"{self.source}: [persona] name: required when [model] adapter is empty "
                            "(an adapter's manifest names its persona; the base model alone has none)")
        if self.api.enabled and not self.server.enabled:
            problems.append(f"{self.source}: [api] enabled: needs [server] enabled (the API is served on that server)")
        if self.api.enabled and self.line.enabled and self.line.webhook_path.startswith("/v1/"):
            problems.append(f"{self.source}: [line] webhook_path: must not start with /v1/ while [api] is enabled "
                            "(the API's paths)")
        try:
            self.check_secrets(environ)
        except ConfigError as exc:
            problems += exc.problems
        try:
            self.adapter_manifest()  # a [model] base that is not the adapter's
        except ConfigError as exc:
            problems += exc.problems
        except ModelLoadError:
            pass  # a missing or broken adapter folder: the daemon says so where it loads the model
        if problems:
            raise ConfigError(problems)

    def _names(self, env_name: str) -> str:
        """`[section] key` of every *_env key naming this variable (for error messages)."""
        where = [f"[{platform}] {key}" for platform, keys in _SECRET_KEYS.items() for key in keys
                 if getattr(getattr(self, platform), key) == env_name]
        return ", ".join(where) or "secret"


def load_config(path: Path) -> BotConfig:
    """Read and validate a config file (the daemon's, prepare's and train's alike); ConfigError names the file,
    `[section] key` and why, one line per problem. The project's one TOML reader."""
    try:
        import tomllib  # novermin: guarded, tomli below on 3.10
    except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli package (pyproject depends on it there)
        import tomli as tomllib
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a folder, not a TOML file"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not valid UTF-8: {exc}"]) from None
    # tomllib read the bytes as UTF-8 already, so this decode cannot fail.
    return BotConfig.from_dict(data, source=str(path), text=path.read_bytes().decode("utf-8"))


# --- pydantic's errors in plain words ----------------------------------------------------

_TYPE_WORDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
}
_TOML_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_KEYED_TABLES = ("people",)  # tables whose keys are the user's data (ids), not names of settings


def _sections() -> list[str]:
    return list(BotConfig.model_fields)


def _where(loc: tuple) -> tuple[str, str]:
    """('limits', 'allow_users', 0) -> ('[limits]', 'allow_users[0]'); ('a', 'b', 'c') -> ('[a.b]', 'c');
    ('people', 'line:x', '[key]') -> ('[people]', '"line:x"'): a table whose keys are data, not names, quotes them."""
    if len(loc) >= 2 and loc[0] in _KEYED_TABLES:
        return f"[{loc[0]}]", json.dumps(str(loc[1]), ensure_ascii=False)
    names = [str(part) for part in loc if isinstance(part, str)]
    index = "".join(f"[{part}]" for part in loc if isinstance(part, int))
    if len(names) <= 1:
        return f"[{'.'.join(names)}]", ""
    return f"[{'.'.join(names[:-1])}]", names[-1] + index


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _describe(err: dict) -> str:
    """One pydantic error as `[section] key: why`, never repeating the value (it might be a secret)."""
    loc, kind, ctx = tuple(err["loc"]), err["type"], err.get("ctx") or {}
    section, key = _where(loc)
    where = f"{section} {key}" if key else section
    if kind == "extra_forbidden":
        if not key:
            close = _closest(section.strip("[]"), _sections())
            hint = f" (did you mean [{close}]?)" if close else ""
            return f"{where}: unknown section{hint}; known: {', '.join(_sections())}"
        known = list(_section_model(loc[:-1]).model_fields)
        close = _closest(key, known)
        if close:
            hint = f" (did you mean {close}?)"
        else:  # the right key in the wrong table: `[server] adapter = ...`
            homes = [f"[{name}] {key}" for name in _sections() if key in getattr(_field_model(name), "model_fields", {})]
            hint = f" (did you mean {homes[0]}?)" if len(homes) == 1 else ""
        return f"{where}: unknown key{hint}; known: {', '.join(known)}"
    if kind in _TYPE_WORDS:
        got = _TOML_TYPES.get(type(err["input"]))
        return f"{where}: expected {_TYPE_WORDS[kind]}" + (f", got {got}" if got else "")
    if kind in _BOUNDS:
        (bound,) = ctx.values()
        return f"{where}: must be {_BOUNDS[kind]} {_number(bound)}"
    if kind == "literal_error":
        return f"{where}: must be {ctx['expected']}"
    if kind == "value_error":
        return f"{where}: {ctx.get('error', err['msg'])}"
    return f"{where}: {err['msg'][:1].lower()}{err['msg'][1:]}"


def _closest(name: str, known: list[str]) -> str | None:
    """The known name a misspelt one most likely meant: the same but for case, else difflib's closest."""
    same = [k for k in known if k.casefold() == name.casefold()]
    close = same or difflib.get_close_matches(name.casefold(), known, n=1)
    return close[0] if close else None


def _field_model(section: str) -> Any:
    return BotConfig.model_fields[section].annotation


def _section_model(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = BotConfig
    for part in loc:
        if isinstance(part, str):
            model = model.model_fields[part].annotation
    return model


# --- where a key is in the file ----------------------------------------------------------------

_BARE_KEY = r"[A-Za-z0-9_-]+"
_ONE_KEY = rf"""(?:{_BARE_KEY}|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED_KEY = rf"{_ONE_KEY}(?:\s*\.\s*{_ONE_KEY})*"
_TABLE_LINE = re.compile(rf"^\s*\[\[?\s*({_DOTTED_KEY})\s*\]\]?\s*(?:#.*)?$")
_KEY_LINE = re.compile(rf"^\s*({_DOTTED_KEY})\s*=")


def _key_parts(dotted: str) -> tuple[str, ...]:
    parts = re.findall(_ONE_KEY, dotted)
    return tuple(json.loads(p) if p.startswith('"') else p.strip("'") for p in parts)


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Every table and key path in a TOML file -> the line it first appears on (1-based), its parents included.

    A line scan, not a parser: tomllib has read the file already and keeps no positions. Lines inside a
    multi-line string are skipped; a key inside an inline table is found at its table's line."""
    found: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    open_string = None  # the delimiter of a multi-line string being read
    for number, line in enumerate(text.splitlines(), 1):
        if open_string:
            if open_string in line:
                open_string = None
            continue
        if m := _TABLE_LINE.match(line):
            table = _key_parts(m[1])
            path = table
        elif m := _KEY_LINE.match(line):
            path = table + _key_parts(m[1])
        else:
            path = None
        for i in range(1, len(path or ()) + 1):
            found.setdefault(path[:i], number)
        for delimiter in ('"""', "'''"):
            if line.count(delimiter) % 2:
                open_string = delimiter
                break
    return found


def _at(source: str, lines: dict[tuple[str, ...], int], err: dict) -> str:
    """`FILE:LINE` for an unknown section or key whose line is known, else `FILE`."""
    if err["type"] != "extra_forbidden":
        return source
    path = tuple(str(part) for part in err["loc"] if isinstance(part, str))
    while path and path not in lines:
        path = path[:-1]  # inside an inline table: its table's line
    return f"{source}:{lines[path]}" if path else source
