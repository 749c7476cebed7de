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

A request's `temperature`, `top_p`, `max_tokens` (or `max_completion_tokens`), `seed` and `stop` are checked as
OpenAI checks them (a value OpenAI would refuse is a 400 here too) and generate the reply, the adapter's settings
and `[generation]` filling in what a request leaves out (max_tokens is at most `[generation] max_new_tokens`: the
prompt budget leaves room for that many). `presence_penalty`, `frequency_penalty`, `logit_bias` and the tool
fields are accepted and not applied; the response's `X-Bunshin-Ignored` header names them, so a client is never
led to think they were. `usage` and `finish_reason` are the engine's counts and reason ("length" when max_tokens
ran out). With `stream: true` the text goes out as server-sent events as the engine decodes it, a piece per step
(held back only while it may still turn into a stop); the response starts with the first piece, so a reply that
fails before any text still gets its error status. A client that goes away cancels its reply in the engine.

What a request may be (its body field by field, the model, the key) is bot/api_request.py's, with no server
or model; this module serves it.

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
import logging
import time
import traceback
import uuid

from aiohttp import web

from finetune.prompt import ChatTurn

from .api_request import MODELS, ApiError, bad_request, check_key, check_model, json_text, parse_chat_request
from .http_input import BadBody, read_capped
from .reply_memory import recall_in_thread
from .router import RateLimiter
from .worker import DeadlineExceeded, GenerationFailed, QueueFull, WorkerStopped

log = logging.getLogger("bunshin.api")

API_ROOT = "/v1"
CHAT_COMPLETIONS = "/v1/chat/completions"
IGNORED_HEADER = "X-Bunshin-Ignored"
LOADING_RETRY_S = 5  # Retry-After while the model loads or warms up
BUSY_RETRY_S = 2  # Retry-After when the queue is full: a reply takes seconds


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
        return web.json_response({"object": "list", "data": [self._model_object()]}, dumps=json_text)

    async def model(self, request: web.Request) -> web.Response:
        self._authorize(request)
        check_model(request.match_info["model"], self.model_id)
        return web.json_response(self._model_object(), dumps=json_text)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        return await self._complete(request)

    def _authorize(self, request: web.Request) -> None:
        check_key(request.headers.get("Authorization", ""), self._key)

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
            raise bad_request(f"the body is {exc.reason}", None) from None
        if body is None:
            raise ApiError(413, f"the body is over [api] max_body_bytes ({self.api.max_body_bytes} bytes)")
        chat = parse_chat_request(body, self.persona, self.config, self.model_id)
        worker = self.worker
        if worker is None:
            raise ApiError(503, "the model is still loading; try again shortly", kind="server_error",
                           retry_after=LOADING_RETRY_S)
        self._log_ignored(chat.ignored)
        notes = await self._recalled(chat.turns)
        headers = {IGNORED_HEADER: ", ".join(chat.ignored)} if chat.ignored else {}
        pieces: asyncio.Queue[str] | None = asyncio.Queue() if chat.stream else None
        try:
            future = worker.submit(chat.turns, memory=notes, deadline=received + self.config.queue.deadline_s,
                                   received=received, sampling=chat.sampling,
                                   on_text=pieces.put_nowait if pieces is not None else None)
        except QueueFull:
            self.metrics.messages.labels(outcome="busy").inc()
            raise ApiError(429, "bunshin is busy: the queue of replies is full; retry shortly", kind="requests",
                           code="rate_limit_exceeded", retry_after=BUSY_RETRY_S) from None
        except WorkerStopped:
            raise ApiError(503, "bunshin is shutting down", kind="server_error", retry_after=LOADING_RETRY_S) from None
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            if pieces is not None:
                return await self._stream(request, future, pieces, reply_id, chat, notes, headers)
            reply = await self._outcome(future, client)
        finally:
            if not future.done():  # the client went away (the handler was cancelled): the engine stops the reply
                future.cancel()
        usage = await self._usage(chat.turns, reply, notes)
        return web.json_response({
            "id": reply_id, "object": "chat.completion", "created": int(time.time()), "model": self.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text, "refusal": None},
                         "logprobs": None, "finish_reason": reply.finish_reason}],
            "usage": usage,
        }, headers=headers, dumps=json_text)

    async def _outcome(self, future: asyncio.Future, client: str):
        """The finished reply, or the ApiError its failure is answered with."""
        try:
            reply = await future
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
        return reply

    async def _stream(self, request: web.Request, future: asyncio.Future, pieces: asyncio.Queue, reply_id: str,
                      chat, notes, headers: dict) -> web.StreamResponse:
        """The reply as server-sent events as it is decoded: the role, a content delta per piece of text, the finish
        (and usage). The response starts at the first piece: a reply that fails before any text gets its status."""
        client = request.remote or "?"
        trimmed = _Trimmed()
        first = await _next_piece(pieces, future)
        if first is None:  # done before any text: its failure is an error answer, or it is an empty reply
            await self._outcome(future, client)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               **headers})
        await response.prepare(request)
        base = {"id": reply_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.model_id}

        def chunk(delta: dict, finish_reason: str | None = None) -> bytes:
            event = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            if chat.include_usage:
                event["usage"] = None
            return f"data: {json_text(event)}\n\n".encode()

        try:
            await response.write(chunk({"role": "assistant", "content": ""}))
            piece = first
            while piece is not None:
                text = trimmed.add(piece)
                if text:
                    await response.write(chunk({"content": text}))
                piece = await _next_piece(pieces, future)
            try:
                reply = await self._outcome(future, client)
            except ApiError as exc:  # after the first piece: OpenAI's clients raise on an event with an error
                error = {"error": {"message": exc.message, "type": exc.kind, "param": None, "code": exc.code}}
                await response.write(f"data: {json_text(error)}\n\n".encode())
            else:
                await response.write(chunk({}, reply.finish_reason))
                if chat.include_usage:
                    usage = await self._usage(chat.turns, reply, notes)
                    await response.write(f"data: {json_text({**base, 'choices': [], 'usage': usage})}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            log.info("the client at %s left before the streamed reply was sent", client)
        return response

    async def _recalled(self, turns: list[ChatTurn]) -> list:
        """The persona's notes for this conversation (in a thread, as the router recalls); none without memory."""
        if self.recall is None or not self.recall.recalls:
            return []
        return await recall_in_thread(self.metrics, "an API request", self.recall.for_turns, turns)

    async def _usage(self, turns: list[ChatTurn], reply, notes=()) -> dict:
        """OpenAI's usage: the engine's counts; the prompt counted again where a stepper did not report it."""
        completion = reply.tokens
        prompt = reply.prompt_tokens
        count = getattr(self.backend, "prompt_ids", None)
        if prompt is None and count is not None:
            args = (turns, notes) if notes else (turns,)  # the notes are part of the prompt too
            try:
                prompt = len(await asyncio.to_thread(count, *args))
            except Exception as exc:  # noqa: BLE001 - a count is not worth failing a finished reply
                log.warning("could not count the prompt's tokens: %s", type(exc).__name__)
        if prompt is None:
            return {"completion_tokens": completion}
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _log_ignored(self, ignored: list[str]) -> None:
        fields = {name for name in ignored if not name.startswith("messages[")}
        new = fields - self._ignored_logged
        if new:  # once per field, not per request
            self._ignored_logged |= new
            log.info("API requests set %s: accepted, not applied (responses name what was ignored in %s)",
                     ", ".join(sorted(new)), IGNORED_HEADER)


async def _next_piece(pieces: asyncio.Queue, future: asyncio.Future) -> str | None:
    """The next piece of a streamed reply's text, or None once the reply is done and every piece was taken."""
    while pieces.empty():
        if future.done():
            return None
        getter = asyncio.ensure_future(pieces.get())
        await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
    return pieces.get_nowait()


class _Trimmed:
    """A streamed reply's pieces as the whole reply is sent (stripped): no whitespace before its first character,
    and whitespace held until more text follows it (at the end it is dropped)."""

    def __init__(self) -> None:
        self.started = False
        self.held = ""

    def add(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.started = True
        body = piece.rstrip()
        if not body:
            self.held += piece
            return ""
        text, self.held = self.held + body, piece[len(body):]
        return text


def _url_shown(request: web.Request) -> str:
    """The path as sent (percent-encoded: one line of ASCII), cut to a length fit for a message."""
    path = request.rel_url.raw_path
    return path if len(path) <= 200 else path[:200] + "…"
