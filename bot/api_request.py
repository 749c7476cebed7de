"""What an OpenAI chat-completions request may be: its body checked field by field, and its key.

bot/api.py serves the routes; this module decides, without a server or a model, whether a request is one bunshin
answers and what it asks for. Every refusal is an `ApiError` in OpenAI's error shape, naming the field that is
wrong (`param`) and never quoting the conversation's text: a client's value shows in a message only when it is a
short identifier (a model name, a role), anything else by its JSON type. `make mutants` audits this module
(docs/mutation.md): a bug here answers a bad request as a good one, or lets a request past the key.
"""

from __future__ import annotations

import functools
import hmac
import json
import math
import re
from dataclasses import dataclass, field

from aiohttp import web

from finetune.prompt import ChatTurn

from .http_input import BadBody, header_bytes, is_utf8, parse_json
from .memory import window_start
from .names import apart_from_persona
from .router import WINDOW_SLACK

MODELS = "/v1/models"
json_text = functools.partial(json.dumps, ensure_ascii=False)  # the persona's Japanese readable in curl's output

# Checked as OpenAI checks them; the reply is generated with them (the adapter's settings fill in the rest).
SAMPLING_LIMITS = {  # field -> (kind, lowest, highest)
    "max_tokens": (int, 1, None),
    "max_completion_tokens": (int, 1, None),
    "temperature": (float, 0, 2),
    "top_p": (float, 0, 1),
    "presence_penalty": (float, -2, 2),
    "frequency_penalty": (float, -2, 2),
    "seed": (int, None, None),
}
# Of those, the ones bunshin does not apply (the model was tuned with the adapter's repetition penalty instead).
UNAPPLIED_SAMPLING = ("presence_penalty", "frequency_penalty")
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 256
OTHER_IGNORED = ("logit_bias", "logprobs", "top_logprobs", "tools", "tool_choice", "functions",
                 "function_call", "parallel_tool_calls", "response_format", "reasoning_effort")
# top_p 0 (OpenAI accepts it) keeps only the most likely token; the engine takes a top_p above 0, and this one
# keeps only the most likely token as well.
_SMALLEST_TOP_P = 1e-9
SYSTEM_ROLES = ("system", "developer")


class ApiError(Exception):
    """A request answered with OpenAI's error shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: float | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = dict(headers or {})
        if retry_after is not None:
            self.headers["Retry-After"] = str(math.ceil(retry_after))

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        text = json_text(body)
        if not is_utf8(text):  # a lone surrogate that slipped into a message: escaped, never an encoding error
            text = json.dumps(body)
        return web.json_response(text=text, status=self.status, headers=self.headers or None)


def bad_request(message: str, param: str | None) -> ApiError:
    """A 400 naming the field that is wrong (`param`), or the body itself (None)."""
    return ApiError(400, message, param=param, code="invalid_value" if param else None)


def _missing(message: str, param: str) -> ApiError:
    return ApiError(400, message, param=param, code="missing_required_parameter")


_IDENTIFIER = re.compile(r"[\w.:/@+-]{1,64}")  # \w: Unicode letters too (a persona named 美咲)


def _shown(value) -> str:
    """A client's value for an error message: a short identifier (a model, a role) quoted, anything else only by its
    JSON type, so that no message echoes a conversation's text, a huge value, or one nested past repr's depth."""
    if isinstance(value, str) and _IDENTIFIER.fullmatch(value) and is_utf8(value):
        return repr(value)
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    kinds = {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _not_utf8(where: str) -> ApiError:
    # A JSON "\ud800" escape with no partner: valid JSON, but no text a tokenizer (or UTF-8) can take.
    return bad_request(f"{where}: is not valid Unicode text (it holds an unpaired surrogate, a \\ud800-\\udfff escape)", where)


@dataclass
class ChatRequest:
    """What a chat completion asks for, checked: the turns for the prompt and how to answer."""

    turns: list[ChatTurn]
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    ignored: list[str] = field(default_factory=list)  # fields and messages accepted but not applied
    # The request's own sampling values, in GenerationSettings.sampling's names (max_tokens, temperature, top_p,
    # seed, stop): what it leaves out comes from the adapter's settings.
    sampling: dict = field(default_factory=dict)


def parse_chat_request(body: bytes, persona: str, config, model_id: str) -> ChatRequest:
    """The request body as turns for the prompt renderer; ApiError (400) names the field that is wrong, (404) a
    model other than `model_id`."""
    try:
        data = parse_json(body)
    except BadBody as exc:
        raise bad_request(f"the body is {exc.reason}; send the request as a JSON object in UTF-8", None) from None
    if not isinstance(data, dict):
        raise bad_request(f"the body must be a JSON object, not {_shown(data)}", None)
    check_model(data.get("model"), model_id)
    ignored: list[str] = []
    n = data.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise bad_request("n: bunshin generates one reply per request; leave n out or set it to 1", "n")
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("stream: must be true or false", "stream")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options: must be an object", "stream_options")
    for name, (kind, lowest, highest) in SAMPLING_LIMITS.items():
        value = data.get(name)
        if value is None:
            continue
        if not (_is_int(value) if kind is int else _is_number(value)):
            raise bad_request(f"{name}: must be {'an integer' if kind is int else 'a number'}", name)
        if (lowest is not None and value < lowest) or (highest is not None and value > highest):
            bounds = f"at least {lowest}" if highest is None else f"between {lowest} and {highest}"
            raise bad_request(f"{name}: must be {bounds}", name)
        if name in UNAPPLIED_SAMPLING:
            ignored.append(name)
    sampling = {name: data[name] for name in ("temperature", "top_p", "seed") if data.get(name) is not None}
    limit = data.get("max_completion_tokens", data.get("max_tokens"))  # the newer name wins where both are sent
    if limit is not None:
        sampling["max_tokens"] = limit
    if sampling.get("top_p") == 0:
        sampling["top_p"] = _SMALLEST_TOP_P
    if "temperature" in sampling:
        sampling["temperature"] = float(sampling["temperature"])
    stop = _stop_strings(data.get("stop"))
    if stop:
        sampling["stop"] = stop
    ignored += [name for name in OTHER_IGNORED if data.get(name) is not None]
    # Each message is cut to [limits] max_message_chars, as a platform's message is.
    turns = conversation_turns(data.get("messages"), persona, config.api, ignored, config.limits.max_message_chars)
    limit = config.memory.max_turns
    # As a platform chat's window: the last max_turns or a few fewer, from a start that holds while the client's
    # history grows (positions in the request stand in for the memory's ids), so the engine reuses its prefix.
    turns = turns[window_start(list(range(len(turns))), limit, min(WINDOW_SLACK, limit - 1)):]
    return ChatRequest(turns, bool(stream), bool(options and options.get("include_usage")), ignored, sampling)


def _stop_strings(stop) -> tuple[str, ...]:
    """OpenAI's `stop`: null, a string, or an array of up to 4 strings; the reply ends before the first of them."""
    if stop is None:
        return ()
    values = [stop] if isinstance(stop, str) else stop
    if not isinstance(values, list) or len(values) > MAX_STOP_STRINGS:
        raise bad_request(f"stop: must be a string or an array of at most {MAX_STOP_STRINGS} strings, not "
                          f"{_shown(stop) if not isinstance(values, list) else f'an array of {len(values)}'}", "stop")
    for j, value in enumerate(values):
        where = "stop" if isinstance(stop, str) else f"stop[{j}]"
        if not isinstance(value, str) or not value or len(value) > MAX_STOP_CHARS:
            raise bad_request(f"{where}: must be a non-empty string of at most {MAX_STOP_CHARS} characters, not "
                              f"{_shown(value)}", where)
        if not is_utf8(value):
            raise _not_utf8(where)
    return tuple(values)


def check_model(model, model_id: str) -> None:
    """The request names the one model served (the id /v1/models lists): 404 model_not_found for any other, as
    OpenAI and vLLM answer."""
    if model is None:
        raise _missing(f"model: required; this server's model is {model_id!r} (listed by GET {MODELS})", "model")
    if not isinstance(model, str):
        raise bad_request(f"model: must be a string, not {_shown(model)}", "model")
    if model != model_id:
        raise ApiError(404, f"The model {_shown(model)} does not exist; this server has {model_id!r} (listed by GET "
                       f"{MODELS})", param="model", code="model_not_found")


def conversation_turns(messages, persona: str, api, ignored: list[str], max_chars: int | None = None) -> list[ChatTurn]:
    """OpenAI `messages` as (speaker, text) turns: `name` or the role's speaker, the text parts joined.
    What is dropped (system messages with system_messages = "ignore") is added to `ignored`."""
    if messages is None:
        raise _missing("messages: required (the conversation, oldest first)", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages: must be a non-empty array of messages", "messages")
    turns = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where}: must be an object with role and content", where)
        role = message.get("role")
        if role in SYSTEM_ROLES:
            if api.system_messages == "reject":
                raise bad_request(f"{where}: {role} messages are refused ([api] system_messages = \"reject\"): the persona "
                           "was trained on conversations only, never with a system prompt", f"{where}.role")
            ignored.append(f"{where} ({role})")
            continue
        if role in ("tool", "function"):
            raise bad_request(f"{where}.role: {role!r} is not supported: bunshin does not call tools", f"{where}.role")
        if role not in ("user", "assistant"):
            raise bad_request(f"{where}.role: must be user, assistant, system or developer, not {_shown(role)}",
                       f"{where}.role")
        text = _text_of(message.get("content"), where)
        if max_chars is not None:
            text = text[:max_chars]
        if not text.strip():
            continue  # e.g. an assistant message that only called tools: nothing was said
        turns.append(ChatTurn(_speaker(message, role, persona, api.user_name, where), text.strip()))
    if not turns:
        raise bad_request("messages: no user or assistant message has text", "messages")
    return turns


def _text_of(content, where: str) -> str:
    if content is None or isinstance(content, str):
        if content and not is_utf8(content):
            raise _not_utf8(f"{where}.content")
        return content or ""
    if not isinstance(content, list):
        raise bad_request(f"{where}.content: must be a string or an array of text parts, not {_shown(content)}",
                   f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = _shown(part.get("type")) if isinstance(part, dict) else _shown(part)
            raise bad_request(f"{where}.content[{j}]: only text parts are understood (the persona reads text), not {kind}",
                       f"{where}.content[{j}]")
        if not is_utf8(part["text"]):
            raise _not_utf8(f"{where}.content[{j}].text")
        texts.append(part["text"])
    return "\n".join(texts)


def _speaker(message: dict, role: str, persona: str, user_name: str, where: str) -> str:
    if role == "assistant":
        return persona  # whatever name it carries: the model's own turns are the persona's
    name = message.get("name")
    if name is None or (isinstance(name, str) and not name.strip()):
        return apart_from_persona(user_name, persona)
    if not isinstance(name, str) or any(ch in name for ch in "\r\n") or len(name) > 64:
        # A name starts a line of the transcript: a line break in it would write turns nobody said.
        raise bad_request(f"{where}.name: must be one line of at most 64 characters", f"{where}.name")
    if not is_utf8(name):
        raise _not_utf8(f"{where}.name")
    return apart_from_persona(name.strip(), persona)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    # An int is finite however large (math.isfinite(10**400) would raise OverflowError converting it to a float).
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def check_key(authorization: str, key: bytes) -> None:
    """The request's `Authorization` header carries the server's key as `Bearer KEY`; ApiError (401) if not."""
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(401, "no API key: send it as 'Authorization: Bearer KEY' (the value of the variable "
                       "[api] key_env names)", code="invalid_api_key")
    # The bytes as sent: a header may hold any byte, and compare_digest takes bytes of any length.
    if not hmac.compare_digest(header_bytes(given.strip()), key):
        raise ApiError(401, "incorrect API key", code="invalid_api_key")
