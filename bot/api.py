"""bunshin as an OpenAI-compatible server: other tools (llmcord, Open WebUI, AstrBot, scripts) talk to the persona.

    POST /v1/chat/completions ─► bearer key ─► rate limit (per address) ─► size cap ─► messages → turns
                              ─► worker.submit (the platforms' queue, deadline and metrics) ─► JSON or SSE
    GET  /v1/models           ─► the one model: the persona

Served on the daemon's own HTTP server ([server] host and port, 127.0.0.1 by default) next to /healthz,
/metrics and LINE's webhook: one port to open, one process, one model. It is enabled by `[api] enabled`.

The API is stateless, as OpenAI's is: the client sends the conversation every time, and nothing is written to
the bot's memory. Each message becomes a `name: text` turn of the same prompt the persona was trained on:
`name` (if given) is the speaker, else `user` is `[api] user_name` and `assistant` the persona. The persona never
saw a system prompt in training, so `system` (and `developer`) messages are dropped (`[api] system_messages =
"ignore"`, most tools send one by default) or refused with a 400 ("reject").

The worker generates a whole reply at once and takes no per-request settings: generation uses the adapter's
settings and `[generation]`. `max_tokens`, `temperature`, `top_p` and the other sampling fields are checked
(a value OpenAI would refuse is a 400 here too) and not applied; the response's `X-Bunshin-Ignored` header names
what was ignored, so a client is never led to think they were. With `stream: true` the reply, once generated,
is sent as server-sent events in one content delta: valid SSE that every client reads, without faking
token-by-token timing.

Every answer under /v1 goes through `OpenAIApi.errors` (an aiohttp middleware), which gives each error OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`, so its clients raise the usual exceptions, and counts
every answer in `bunshin_api_responses{status}`: 400 a malformed request (naming the field in `param`), 401 a
missing or wrong key, 404 an unknown model (`model_not_found`) or URL (`unknown_url`), 405 a method the URL does
not take, 413 a body over `[api] max_body_bytes`, 429 (with Retry-After) a full queue or a client over its
rate, 503 still loading / past the deadline / shutting down, 500 a failed generation or a bug. No input is a
500: whatever a client sends (bytes that are not UTF-8 or not JSON, JSON nested past the parser's depth, lone
surrogates, any header bytes) is a 4xx (bot/http_input.py; tests/test_api_bad_input.py fuzzes it). Error
messages name fields and positions, never the conversation's text; the log names the client's address and the
status, never the conversation or the key.

Each reply gets notes from the persona's own memory, as a platform's does (bot/reply_memory.py); not from a chat's
past, since the API has no chat.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import math
import re
import time
import traceback
import uuid
from dataclasses import dataclass, field

from aiohttp import web

from finetune.prompt import ChatTurn

from .http_input import BadBody, header_bytes, is_utf8, parse_json, read_capped
from .memory import window_start
from .names import apart_from_persona
from .reply_memory import recall_in_thread
from .router import WINDOW_SLACK, RateLimiter
from .worker import DeadlineExceeded, GenerationFailed, QueueFull, WorkerStopped

log = logging.getLogger("bunshin.api")

API_ROOT = "/v1"
CHAT_COMPLETIONS = "/v1/chat/completions"
MODELS = "/v1/models"
IGNORED_HEADER = "X-Bunshin-Ignored"
LOADING_RETRY_S = 5  # Retry-After while the model loads or warms up
BUSY_RETRY_S = 2  # Retry-After when the queue is full: a reply takes seconds
# Accepted, checked as OpenAI checks them, not applied (the worker generates with the adapter's settings).
SAMPLING_LIMITS = {  # field -> (kind, lowest, highest)
    "max_tokens": (int, 1, None),
    "max_completion_tokens": (int, 1, None),
    "temperature": (float, 0, 2),
    "top_p": (float, 0, 1),
    "presence_penalty": (float, -2, 2),
    "frequency_penalty": (float, -2, 2),
    "seed": (int, None, None),
}
OTHER_IGNORED = ("stop", "logit_bias", "logprobs", "top_logprobs", "tools", "tool_choice", "functions",
                 "function_call", "parallel_tool_calls", "response_format", "reasoning_effort")
SYSTEM_ROLES = ("system", "developer")
_json = functools.partial(json.dumps, ensure_ascii=False)  # the persona's Japanese readable in curl's output


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
        text = _json(body)
        if not is_utf8(text):  # a lone surrogate that slipped into a message: escaped, never an encoding error
            text = json.dumps(body)
        return web.json_response(text=text, status=self.status, headers=self.headers or None)


def _bad(message: str, param: str | None) -> ApiError:
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
    return _bad(f"{where}: is not valid Unicode text (it holds an unpaired surrogate, a \\ud800-\\udfff escape)", where)


@dataclass
class ChatRequest:
    """What a chat completion asks for, checked: the turns for the prompt and how to answer."""

    turns: list[ChatTurn]
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    ignored: list[str] = field(default_factory=list)  # fields and messages accepted but not applied


def parse_chat_request(body: bytes, persona: str, config, model_id: str) -> ChatRequest:
    """The request body as turns for the prompt renderer; ApiError (400) names the field that is wrong, (404) a
    model other than `model_id`."""
    try:
        data = parse_json(body)
    except BadBody as exc:
        raise _bad(f"the body is {exc.reason}; send the request as a JSON object in UTF-8", None) from None
    if not isinstance(data, dict):
        raise _bad(f"the body must be a JSON object, not {_shown(data)}", None)
    check_model(data.get("model"), model_id)
    ignored: list[str] = []
    n = data.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise _bad("n: bunshin generates one reply per request; leave n out or set it to 1", "n")
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream: must be true or false", "stream")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options: must be an object", "stream_options")
    for name, (kind, lowest, highest) in SAMPLING_LIMITS.items():
        value = data.get(name)
        if value is None:
            continue
        if not (_is_int(value) if kind is int else _is_number(value)):
            raise _bad(f"{name}: must be {'an integer' if kind is int else 'a number'}", name)
        if (lowest is not None and value < lowest) or (highest is not None and value > highest):
            bounds = f"at least {lowest}" if highest is None else f"between {lowest} and {highest}"
            raise _bad(f"{name}: must be {bounds}", name)
        ignored.append(name)
    ignored += [name for name in OTHER_IGNORED if data.get(name) is not None]
    # Each message is cut to [limits] max_message_chars, as a platform's message is.
    turns = conversation_turns(data.get("messages"), persona, config.api, ignored, config.limits.max_message_chars)
    limit = config.memory.max_turns
    # As a platform chat's window: the last max_turns or a few fewer, from a start that holds while the client's
    # history grows (positions in the request stand in for the memory's ids), so the engine reuses its prefix.
    turns = turns[window_start(list(range(len(turns))), limit, min(WINDOW_SLACK, limit - 1)):]
    return ChatRequest(turns, bool(stream), bool(options and options.get("include_usage")), ignored)


def check_model(model, model_id: str) -> None:
    """The request names the one model served (the id /v1/models lists): 404 model_not_found for any other, as
    OpenAI and vLLM answer."""
    if model is None:
        raise _missing(f"model: required; this server's model is {model_id!r} (listed by GET {MODELS})", "model")
    if not isinstance(model, str):
        raise _bad(f"model: must be a string, not {_shown(model)}", "model")
    if model != model_id:
        raise ApiError(404, f"The model {_shown(model)} does not exist; this server has {model_id!r} (listed by GET "
                       f"{MODELS})", param="model", code="model_not_found")


def conversation_turns(messages, persona: str, api, ignored: list[str], max_chars: int | None = None) -> list[ChatTurn]:
    """OpenAI `messages` as (speaker, text) turns: `name` or the role's speaker, the text parts joined.
    What is dropped (system messages with system_messages = "ignore") is added to `ignored`."""
    if messages is None:
        raise _missing("messages: required (the conversation, oldest first)", "messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages: must be a non-empty array of messages", "messages")
    turns = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where}: must be an object with role and content", where)
        role = message.get("role")
        if role in SYSTEM_ROLES:
            if api.system_messages == "reject":
                raise _bad(f"{where}: {role} messages are refused ([api] system_messages = \"reject\"): the persona "
                           "was trained on conversations only, never with a system prompt", f"{where}.role")
            ignored.append(f"{where} ({role})")
            continue
        if role in ("tool", "function"):
            raise _bad(f"{where}.role: {role!r} is not supported: bunshin does not call tools", f"{where}.role")
        if role not in ("user", "assistant"):
            raise _bad(f"{where}.role: must be user, assistant, system or developer, not {_shown(role)}",
                       f"{where}.role")
        text = _text_of(message.get("content"), where)
        if max_chars is not None:
            text = text[:max_chars]
        if not text.strip():
            continue  # e.g. an assistant message that only called tools: nothing was said
        turns.append(ChatTurn(_speaker(message, role, persona, api.user_name, where), text.strip()))
    if not turns:
        raise _bad("messages: no user or assistant message has text", "messages")
    return turns


def _text_of(content, where: str) -> str:
    if content is None or isinstance(content, str):
        if content and not is_utf8(content):
            raise _not_utf8(f"{where}.content")
        return content or ""
    if not isinstance(content, list):
        raise _bad(f"{where}.content: must be a string or an array of text parts, not {_shown(content)}",
                   f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = _shown(part.get("type")) if isinstance(part, dict) else _shown(part)
            raise _bad(f"{where}.content[{j}]: only text parts are understood (the persona reads text), not {kind}",
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
        raise _bad(f"{where}.name: must be one line of at most 64 characters", f"{where}.name")
    if not is_utf8(name):
        raise _not_utf8(f"{where}.name")
    return apart_from_persona(name.strip(), persona)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    # An int is finite however large (math.isfinite(10**400) would raise OverflowError converting it to a float).
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


class OpenAIApi:
    """The routes, added to the daemon's server before the model loads (they answer 503 until `attach`)."""

    def __init__(self, config, metrics, persona: str, key: str) -> None:
        self.config = config
        self.api = config.api
        self.metrics = metrics
        self.persona = persona
        self._key = key.encode("utf-8")
        self.limiter = RateLimiter(self.api.requests_per_minute, self.api.burst)
        self.worker = None
        self.backend = None
        self.recall = None  # bot.reply_memory.ReplyMemory: the persona's memory for each request
        self.created = int(time.time())
        self._ignored_logged: set[str] = set()

    @property
    def model_id(self) -> str:
        return self.api.model_id or self.persona

    def attach(self, worker, backend, recall=None) -> None:
        """Serving starts: requests go to `worker`; `backend` names the persona and counts prompt tokens; `recall`
        (a ReplyMemory) gives each request the persona's notes."""
        self.worker, self.backend, self.recall = worker, backend, recall
        self.persona = getattr(backend, "persona", None) or self.persona

    def web_routes(self) -> list:
        return [web.post(CHAT_COMPLETIONS, self.chat_completions), web.get(MODELS, self.models),
                web.get(MODELS + "/{model}", self.model)]

    @web.middleware
    async def errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Every answer under /v1, the router's 404 and 405 included: errors in OpenAI's shape, each answer counted
        in bunshin_api_responses. Other paths (/healthz, /metrics, LINE's webhook) pass through untouched."""
        if request.path != API_ROOT and not request.path.startswith(API_ROOT + "/"):
            return await handler(request)
        try:
            response = await handler(request)
        except ApiError as exc:
            # Not 429 or 503: under overload a line per request would add work when there is none to spare
            # (bunshin_api_responses counts them all). raw_path: percent-encoded, one line whatever the client sent.
            if exc.status in (401, 413, 500):
                log.warning("%s %s from %s: %d %s", request.method, request.rel_url.raw_path[:200], request.remote,
                            exc.status, exc.message)
            response = exc.response()
        except web.HTTPMethodNotAllowed as exc:
            response = ApiError(405, f"Invalid method for URL ({request.method} {_url_shown(request)}): it takes "
                                f"{', '.join(sorted(exc.allowed_methods))}",
                                headers={"Allow": ",".join(sorted(exc.allowed_methods))}).response()
        except web.HTTPNotFound:
            response = ApiError(404, f"Unknown request URL: {request.method} {_url_shown(request)}. bunshin serves "
                                f"POST {CHAT_COMPLETIONS}, GET {MODELS} and GET {MODELS}/MODEL",
                                code="unknown_url").response()
        except web.HTTPException as exc:  # none of the routes raises another today; in the same shape if one does
            response = ApiError(exc.status, exc.reason,
                                kind="server_error" if exc.status >= 500 else "invalid_request_error").response()
        except Exception as exc:  # noqa: BLE001 - a bug: a 500 in OpenAI's shape, counted, and logged for fixing
            # The frames, not the exception's text: a message can quote what it failed on (a user's words).
            log.error("%s %s from %s: 500, unexpected %s\n%s", request.method, request.rel_url.raw_path[:200],
                      request.remote, type(exc).__name__, "".join(traceback.format_tb(exc.__traceback__)).rstrip())
            response = ApiError(500, "bunshin failed on this request (a bug); the log has the details",
                                kind="server_error").response()
        self.metrics.api_responses.labels(str(response.status)).inc()
        return response

    # --- the endpoints ---

    async def models(self, request: web.Request) -> web.Response:
        self._authorize(request)
        return web.json_response({"object": "list", "data": [self._model_object()]}, dumps=_json)

    async def model(self, request: web.Request) -> web.Response:
        self._authorize(request)
        check_model(request.match_info["model"], self.model_id)
        return web.json_response(self._model_object(), dumps=_json)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        return await self._complete(request)

    def _authorize(self, request: web.Request) -> None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "no API key: send it as 'Authorization: Bearer KEY' (the value of the variable "
                           "[api] key_env names)", code="invalid_api_key")
        # The bytes as sent: a header may hold any byte, and compare_digest takes bytes of any length.
        if not hmac.compare_digest(header_bytes(given.strip()), self._key):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    def _model_object(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "bunshin"}

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        received = time.monotonic()
        client = request.remote or "?"
        if not self.limiter.allow(client):
            self.metrics.messages.labels(outcome="rate_limited").inc()
            raise ApiError(429, f"over [api] requests_per_minute ({self.api.requests_per_minute:g}) for {client}",
                           kind="requests", code="rate_limit_exceeded", retry_after=60 / self.api.requests_per_minute)
        try:
            body = await read_capped(request, self.api.max_body_bytes)
        except BadBody as exc:
            raise _bad(f"the body is {exc.reason}", None) from None
        if body is None:
            raise ApiError(413, f"the body is over [api] max_body_bytes ({self.api.max_body_bytes} bytes)")
        chat = parse_chat_request(body, self.persona, self.config, self.model_id)
        worker = self.worker
        if worker is None:
            raise ApiError(503, "the model is still loading; try again shortly", kind="server_error",
                           retry_after=LOADING_RETRY_S)
        self._log_ignored(chat.ignored)
        notes = await self._recalled(chat.turns)
        try:
            reply = await worker.submit(chat.turns, memory=notes, deadline=received + self.config.queue.deadline_s,
                                        received=received)
        except QueueFull:
            self.metrics.messages.labels(outcome="busy").inc()
            raise ApiError(429, "bunshin is busy: the queue of replies is full; retry shortly", kind="requests",
                           code="rate_limit_exceeded", retry_after=BUSY_RETRY_S) from None
        except DeadlineExceeded:
            self.metrics.messages.labels(outcome="expired").inc()
            raise ApiError(503, f"no reply was started within [queue] deadline_s ({self.config.queue.deadline_s:g} s)",
                           kind="server_error", code="timeout", retry_after=BUSY_RETRY_S) from None
        except GenerationFailed as exc:
            self.metrics.messages.labels(outcome="error").inc()
            log.error("generation failed for an API request from %s: %s", client, exc.kind)
            raise ApiError(500, f"generating the reply failed ({exc.kind}); the log has the details",
                           kind="server_error", code=exc.kind) from None
        except WorkerStopped:
            raise ApiError(503, "bunshin is shutting down", kind="server_error", retry_after=LOADING_RETRY_S) from None
        self.metrics.messages.labels(outcome="replied").inc()
        usage = await self._usage(chat.turns, reply.tokens, notes)
        finish = self._finish_reason(reply.tokens)
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        headers = {IGNORED_HEADER: ", ".join(chat.ignored)} if chat.ignored else {}
        if chat.stream:
            return await self._stream(request, reply_id, reply.text, finish, usage if chat.include_usage else None,
                                      headers)
        return web.json_response({
            "id": reply_id, "object": "chat.completion", "created": int(time.time()), "model": self.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text, "refusal": None},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage,
        }, headers=headers, dumps=_json)

    async def _stream(self, request: web.Request, reply_id: str, text: str, finish: str, usage: dict | None,
                      headers: dict) -> web.StreamResponse:
        """The finished reply as server-sent events: the role, the text in one delta, the finish (and usage)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               **headers})
        await response.prepare(request)
        base = {"id": reply_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.model_id}

        def chunk(delta: dict, finish_reason: str | None = None) -> dict:
            event = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            return {**event, "usage": None} if usage is not None else event

        events = [chunk({"role": "assistant", "content": ""})]
        if text:
            events.append(chunk({"content": text}))
        events.append(chunk({}, finish))
        if usage is not None:
            events.append({**base, "choices": [], "usage": usage})
        try:
            for event in events:
                await response.write(f"data: {_json(event)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            log.info("the client at %s left before the streamed reply was sent", request.remote)
        return response

    async def _recalled(self, turns: list[ChatTurn]) -> list:
        """The persona's notes for this conversation (in a thread, as the router recalls); none without memory."""
        if self.recall is None or not self.recall.recalls:
            return []
        return await recall_in_thread(self.metrics, "an API request", self.recall.for_turns, turns)

    async def _usage(self, turns: list[ChatTurn], completion_tokens: int, notes=()) -> dict:
        """OpenAI's usage; prompt tokens are counted again (the worker does not report them) when the backend can."""
        count = getattr(self.backend, "prompt_ids", None)
        usage = {"completion_tokens": completion_tokens}
        if count is not None:
            args = (turns, notes) if notes else (turns,)  # the notes are part of the prompt too
            try:
                prompt = len(await asyncio.to_thread(count, *args))
            except Exception as exc:  # noqa: BLE001 - a count is not worth failing a finished reply
                log.warning("could not count the prompt's tokens: %s", type(exc).__name__)
            else:
                usage = {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                         "total_tokens": prompt + completion_tokens}
        return usage

    def _finish_reason(self, tokens: int) -> str:
        settings = getattr(self.backend, "settings", None)
        limit = getattr(settings, "max_new_tokens", None)
        return "length" if limit is not None and tokens >= limit else "stop"

    def _log_ignored(self, ignored: list[str]) -> None:
        fields = {name for name in ignored if not name.startswith("messages[")}
        new = fields - self._ignored_logged
        if new:  # once per field, not per request
            self._ignored_logged |= new
            log.info("API requests set %s: accepted, not applied (generation uses the adapter's settings and "
                     "[generation]; responses name what was ignored in %s)", ", ".join(sorted(new)), IGNORED_HEADER)


def _url_shown(request: web.Request) -> str:
    """The path as sent (percent-encoded: one line of ASCII), cut to a length fit for a message."""
    path = request.rel_url.raw_path
    return path if len(path) <= 200 else path[:200] + "…"
