"""Whatever a client sends, bunshin's API answers in OpenAI's error shape with a 4xx, never a 500, counts the
answer in /metrics, keeps the sender's words out of the answer and the log, and stays healthy.

A storm of generated requests goes to the real daemon (tests/support/api_daemon.py: the worker and the tiny
model's real backend, the real aiohttp server on loopback) as raw bytes over asyncio streams: bodies of any
JSON shape, type and size, nested past the parser's depth, with unpaired surrogates, not UTF-8 or not JSON at
all; Authorization headers with any bytes, odd Content-Types, Content-Lengths that lie, missing and duplicate
headers, chunked and gzip bodies; every method on known and unknown paths. The cases that once were 500s are
tested by name too, and so are the errors that are features: unknown routes, methods and models, `developer`
treated as `system`. Bytes that are not valid HTTP never reach a route: aiohttp answers them 400 itself
(bot/server.py), which the storm allows only for the requests it built to break HTTP's framing.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
import time
import zlib
from dataclasses import dataclass, field

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.api_request import ApiError, parse_chat_request
from finetune.config import BotConfig
from finetune.prompt import ChatTurn
from tests.support.api_daemon import (
    KEY,
    PERSONA,
    HeldBackend,
    LogLines,
    client,
    get_json,
    metric_samples,
    serving,
    tiny_backend,
)

# The user's words in every generated conversation: no error answer and no log line may carry them.
CANARY = "secret-words-q7x3"
CANARY_JA = "ひみつの話"
VALID = {"model": PERSONA, "messages": [{"role": "user", "name": "健太", "content": f"{CANARY} {CANARY_JA}"}]}
ERROR_KEYS = {"message", "type", "param", "code"}
FRESH_RATE = {"requests_per_minute": 1e9, "burst": 1_000_000}  # the storm is not a client over its rate


@pytest.fixture(scope="module")
def inner(tmp_path_factory):
    return tiny_backend(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def api(tmp_path_factory, inner):
    """The daemon, with every log record of the process collected while it runs (root logger, INFO and up)."""
    lines = LogLines()
    root = logging.getLogger()
    level, root.level = root.level, logging.INFO
    root.addHandler(lines)
    try:
        with serving(tmp_path_factory.mktemp("api"), inner, api=FRESH_RATE) as url:
            yield url, lines
    finally:
        root.removeHandler(lines)
        root.level = level


def port_of(url: str) -> int:
    return int(re.search(r":(\d+)/", url).group(1))


# --- a raw HTTP/1.1 client: the bytes as given, the answer as it comes --------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def is_json(self) -> bool:
        return self.headers.get("content-type", "").startswith("application/json")

    def json(self):
        return json.loads(self.body)


def exchange(port: int, data: bytes, half_close: bool = False) -> Answer | None:
    """Sends `data` on a new connection and reads until the server closes it; the first final answer, or None
    when the server closed without one."""

    async def talk() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        received = b""
        try:
            try:
                writer.write(data)
                if half_close:
                    writer.write_eof()
                await writer.drain()
            except ConnectionError:  # the server answered and closed before taking all of it
                pass
            while chunk := await asyncio.wait_for(reader.read(65536), 30):
                received += chunk
        except ConnectionError:
            pass
        finally:
            writer.close()
        return received

    return parse_answer(asyncio.run(talk()))


def parse_answer(raw: bytes) -> Answer | None:
    while re.match(rb"HTTP/1\.[01] 1\d\d ", raw):  # an interim answer (100 Continue)
        raw = raw.split(b"\r\n\r\n", 1)[1]
    if not raw:
        return None
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body, rest = body + rest[:size], rest[size + 2:]
    elif "content-length" in headers:
        body = rest[:int(headers["content-length"])]
    else:
        body = rest
    return Answer(int(status_line.split(" ")[1]), headers, body)


def request_bytes(method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes,
                  length: str = "auto") -> bytes:
    """One request; `length` "auto" adds a true Content-Length (none for an empty body), "none" adds none (the
    headers may carry their own)."""
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    if length == "auto" and body:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def auth(key: str = KEY) -> tuple[bytes, bytes]:
    return b"Authorization", b"Bearer " + key.encode()


def post(port: int, body: bytes, *headers: tuple[bytes, bytes], path: str = "/v1/chat/completions") -> Answer:
    answer = exchange(port, request_bytes("POST", path, [auth(), *headers], body))
    assert answer is not None, "the server closed without an answer"
    return answer


def openai_error(answer: Answer, status: int, code: str | None = None, param: str | None = None) -> dict:
    """The answer is OpenAI's error shape with this status (and code, param); returns its "error"."""
    assert answer.status == status, (answer.status, answer.body[:300])
    assert answer.is_json, answer.headers
    body = answer.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    assert error["code"] == code and error["param"] == param, error
    return error


# --- the cases that were 500s, by name ----------------------------------------------------------------------------


def test_json_nested_past_the_parsers_depth_is_400(api):
    url, _ = api
    for depth in (1_000, 100_000):
        for opener in (b"[", b'{"a":'):
            error = openai_error(post(port_of(url), opener * depth), 400)
            assert "nested too deeply" in error["message"]
    wrapped = b'{"model": "m", "messages": ' + b"[" * 5_000 + b"]" * 5_000 + b"}"
    assert "nested too deeply" in openai_error(post(port_of(url), wrapped), 400)["message"]


def test_a_number_past_pythons_digit_limit_is_400(api):
    url, _ = api
    body = b'{"model": "%s", "messages": [], "max_tokens": %s}' % (PERSONA.encode(), b"9" * 5_000)
    assert "too many digits" in openai_error(post(port_of(url), body), 400)["message"]


def unpaired(where: str) -> bytes:
    """VALID with an unpaired surrogate written where `where` says, as JSON (ASCII, \\u escapes) carries it."""
    message = {"role": "user", "content": "ok \ud800 ok"}
    if where == "part":
        message["content"] = [{"type": "text", "text": "a\udfffb"}]
    elif where == "name":
        message = {"role": "user", "name": "\udc00", "content": "ok"}
    return json.dumps({"model": PERSONA, "messages": [message]}).encode()


def test_unpaired_surrogates_are_400_naming_the_field(api):
    url, _ = api
    for where, param in (("content", "messages[0].content"), ("part", "messages[0].content[0].text"),
                         ("name", "messages[0].name")):
        error = openai_error(post(port_of(url), unpaired(where)), 400, "invalid_value", param)
        assert "unpaired surrogate" in error["message"]
    # A model name with one is simply not the model, and its error message stays valid UTF-8.
    body = json.dumps({**VALID, "model": "\ud800x"}).encode()
    openai_error(post(port_of(url), body), 404, "model_not_found", "model")


def test_authorization_bytes_that_are_not_utf8_are_401(api):
    url, _ = api
    port = port_of(url)
    body = json.dumps(VALID).encode()
    for value in (b"Bearer \xff\xfe", b"Bearer " + KEY.encode() + b"\xe9", b"\xc3\x28 " + KEY.encode(),
                  b"Bearer \xed\xa0\x80", "Bearer キー".encode(), "Bearer sk-tëst".encode("latin-1")):
        answer = exchange(port, request_bytes("POST", "/v1/chat/completions", [(b"Authorization", value)], body))
        openai_error(answer, 401, "invalid_api_key")
    answer = exchange(port, request_bytes("GET", "/v1/models", [(b"Authorization", b"Bearer \x80" * 50)], b""))
    openai_error(answer, 401, "invalid_api_key")
    assert post(port, body).status == 200  # the right key, as bytes, still opens


def test_bodies_that_are_not_utf8_json_are_400(api):
    url, _ = api
    port = port_of(url)
    valid = json.dumps(VALID, ensure_ascii=False)
    for body, why in ((valid.encode("utf-16"), "not UTF-8 (invalid byte at offset 0)"),
                      (valid.encode("utf-32"), "not UTF-8"), (valid.encode("cp932"), "not UTF-8"),
                      (b"\xef\xbb\xbf" + valid.encode(), "not JSON"),  # a BOM: RFC 8259 lets a parser refuse it
                      (b"", "empty"), (b"  \n", "empty"), (b"{'model': 1}", "not JSON (Expecting property name"),
                      (b"[1, 2]", "must be a JSON object, not an array"), (b"NaN", "must be a JSON object")):
        error = openai_error(post(port, body), 400)
        assert why in error["message"], (body[:20], error)
        assert CANARY not in error["message"] and CANARY_JA not in error["message"]


def test_compressed_and_chunked_bodies_are_read_or_refused_in_openais_shape(api):
    url, _ = api
    port = port_of(url)
    body = json.dumps(VALID).encode()
    assert post(port, gzip.compress(body), (b"Content-Encoding", b"gzip")).status == 200
    assert post(port, zlib.compress(body), (b"Content-Encoding", b"deflate")).status == 200
    error = openai_error(post(port, b"not gzip at all", (b"Content-Encoding", b"gzip")), 400)
    assert "Content-Encoding" in error["message"]
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    answer = exchange(port, request_bytes("POST", "/v1/chat/completions",
                                          [auth(), (b"Transfer-Encoding", b"chunked")], chunked, length="none"))
    assert answer.status == 200 and answer.json()["object"] == "chat.completion"


def test_a_body_that_never_comes_is_a_counted_400_not_a_500(api):
    """A Content-Length 10 bytes over the body, then the client closes its side: the read fails, the answer is a
    400 (nobody is left to receive it), counted as one; not a 500 logged as a bug."""
    url, lines = api
    port = port_of(url)
    body = json.dumps(VALID).encode()
    before = metric_samples(url)
    first_line = len(lines.records)
    wire = request_bytes("POST", "/v1/chat/completions", [auth(), (b"Content-Length", b"%d" % (len(body) + 10))],
                         body, length="none")
    assert exchange(port, wire, half_close=True) is None
    key = 'bunshin_api_responses_total{status="400"}'
    deadline = time.monotonic() + 10
    while metric_samples(url).get(key, 0) == before.get(key, 0):
        assert time.monotonic() < deadline, "the request was never answered"
        time.sleep(0.02)
    after = metric_samples(url)
    assert after[key] == before.get(key, 0) + 1
    assert after.get('bunshin_api_responses_total{status="500"}', 0) == before.get(
        'bunshin_api_responses_total{status="500"}', 0)
    assert [r.getMessage() for r in lines.records[first_line:] if r.levelno >= logging.ERROR] == []


# --- the errors that are features --------------------------------------------------------------------------------


def test_unknown_routes_and_methods_are_404_and_405_in_openais_shape(api):
    url, _ = api
    port = port_of(url)
    for method, path in (("POST", "/v1/completions"), ("GET", "/v1"), ("POST", "/v1/"), ("GET", "/v1/embeddings"),
                         ("POST", "/v1/chat/completions/"), ("DELETE", "/v1/%ff%fe"), ("GET", "/v1/models/a/b")):
        error = openai_error(exchange(port, request_bytes(method, path, [auth()], b"")), 404, "unknown_url")
        assert f"Unknown request URL: {method} {path}" in error["message"]
    for method, path, allowed in (("GET", "/v1/chat/completions", "POST"), ("PUT", "/v1/chat/completions", "POST"),
                                  ("POST", "/v1/models", "GET,HEAD"), ("DELETE", "/v1/models/x", "GET,HEAD")):
        answer = exchange(port, request_bytes(method, path, [auth()], b""))
        error = openai_error(answer, 405)
        assert answer.headers["allow"] == allowed and f"Invalid method for URL ({method} {path})" in error["message"]
    # Without a key too: the route is checked first, as OpenAI does.
    openai_error(exchange(port, request_bytes("GET", "/v1/files", [], b"")), 404, "unknown_url")
    # The official client reads them as its usual exceptions.
    with pytest.raises(openai.NotFoundError) as missing:
        client(url).get("/responses/none", cast_to=object)
    assert missing.value.code == "unknown_url"
    with pytest.raises(openai.APIStatusError) as wrong:
        client(url).get("/chat/completions", cast_to=object)
    assert wrong.value.status_code == 405 and wrong.value.body["type"] == "invalid_request_error"


def test_the_daemons_other_paths_answer_as_they_always_did(api):
    url, _ = api
    port = port_of(url)
    assert get_json(url.replace("/v1", "/healthz"))[0] == 200
    for method, path, status in (("POST", "/healthz", 405), ("GET", "/nothing", 404), ("GET", "/v1x", 404)):
        answer = exchange(port, request_bytes(method, path, [], b""))
        assert answer.status == status and answer.headers["content-type"].startswith("text/plain")


def test_an_unknown_model_is_404_model_not_found(api):
    url, _ = api
    served = [m.id for m in client(url).models.list().data]
    assert served == [PERSONA]
    for model in ("gpt-4o", "美咲 ", "", PERSONA.upper() + "x"):
        with pytest.raises(openai.NotFoundError) as unknown:
            client(url).chat.completions.create(model=model, messages=VALID["messages"])
        assert unknown.value.code == "model_not_found" and unknown.value.param == "model"
        assert PERSONA in unknown.value.message  # it names the model served
    with pytest.raises(openai.NotFoundError) as unknown:
        client(url).models.retrieve("gpt-4o")
    assert unknown.value.code == "model_not_found"
    port = port_of(url)
    for name in ("%ff%fe", "%0A%0Dx", "%ED%A0%80", "a" * 5_000, "%E7%BE%8E%E5%92%B2x"):  # bytes, a line break, long
        answer = exchange(port, request_bytes("GET", f"/v1/models/{name}", [auth()], b""))
        assert "\n" not in openai_error(answer, 404, "model_not_found", "model")["message"]
    missing = json.dumps({"messages": VALID["messages"]}).encode()
    openai_error(post(port, missing), 400, "missing_required_parameter", "model")
    for odd in (1, True, ["美咲"], {"id": "美咲"}):
        openai_error(post(port, json.dumps({**VALID, "model": odd}).encode()), 400, "invalid_value", "model")
    assert client(url).chat.completions.create(model=PERSONA, messages=VALID["messages"]).model == PERSONA


def test_a_developer_message_is_treated_exactly_like_a_system_message(tmp_path, inner):
    spoken = [{"role": "user", "name": "健太", "content": "おはよう"}]
    for mode in ("ignore", "reject"):
        held = HeldBackend(inner)  # records the turns the model is given
        with serving(tmp_path / mode, held, api={**FRESH_RATE, "system_messages": mode}) as url:
            answers = {}
            for role in ("system", "developer"):
                messages = [{"role": role, "content": "You are a helpful assistant."}, *spoken]
                body = json.dumps({"model": PERSONA, "messages": messages}).encode()
                answers[role] = post(port_of(url), body)
        system, developer = answers["system"], answers["developer"]
        if mode == "ignore":
            assert system.status == developer.status == 200
            assert held.seen == [[ChatTurn("健太", "おはよう")]] * 2  # dropped alike: the model saw the same turns
            assert system.headers["x-bunshin-ignored"] == "messages[0] (system)"
            assert developer.headers["x-bunshin-ignored"] == "messages[0] (developer)"
        else:
            assert held.seen == []
            refused = {role: openai_error(answer, 400, "invalid_value", "messages[0].role")
                       for role, answer in answers.items()}
            assert refused["developer"]["message"].replace("developer", "system", 1) == refused["system"]["message"]


# --- the storm ---------------------------------------------------------------------------------------------------

json_leaves = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
               | st.sampled_from(["\ud800", "a\udfffb", "\x00", "", "user", "system", "developer", "text", PERSONA]))
json_values = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)
# Fresh [] and {} for each draw: a shared one could be put inside itself by a mutation.
odd_values = json_values | st.builds(list) | st.builds(dict) | st.sampled_from([10**400, -1, 2**63, 1e308])
FIELD_PATHS = [("model",), ("messages",), ("stream",), ("n",), ("temperature",), ("max_tokens",), ("top_p",),
               ("stream_options",), ("seed",), ("stop",), ("messages", 0), ("messages", 0, "role"),
               ("messages", 0, "content"), ("messages", 0, "name"), ("messages", 1)]


def as_json(value) -> bytes:
    # ASCII with \\uXXXX escapes: unpaired surrogates travel inside valid UTF-8 JSON, as anyone could send them.
    return json.dumps(value).encode("ascii")


@st.composite
def mutated_requests(draw) -> bytes:
    """VALID with fields replaced, removed or added, and sometimes a second message or parts for content."""
    request = json.loads(json.dumps(VALID))
    if draw(st.booleans()):
        request["messages"].append({"role": draw(st.sampled_from(["assistant", "system", "developer", "user"])),
                                    "content": [{"type": "text", "text": CANARY}]})
    for path in draw(st.lists(st.sampled_from(FIELD_PATHS), max_size=3)):
        target = request
        for key in path[:-1]:
            target = target[key] if isinstance(target, dict) and key in target or (
                isinstance(target, list) and isinstance(key, int) and key < len(target)) else None
            if not isinstance(target, dict | list):
                break
        else:
            key = path[-1]
            if isinstance(target, dict) and draw(st.booleans()):
                target.pop(key, None)
            elif isinstance(target, dict):
                target[key] = draw(odd_values)
            elif isinstance(key, int) and key < len(target):
                target[key] = draw(odd_values)
    return as_json(request)


# Text with unpaired surrogates among ordinary characters (st.text() itself never draws a surrogate).
odd_text = st.lists(st.text(max_size=4) | st.integers(0xD800, 0xDFFF).map(chr), min_size=1, max_size=5).map("".join)


@st.composite
def odd_text_requests(draw) -> bytes:
    """VALID with odd text where the persona's prompt takes it: the content, a text part, a speaker's name."""
    message = {"role": draw(st.sampled_from(["user", "assistant"])), "content": f"{CANARY} {draw(odd_text)}"}
    where = draw(st.sampled_from(["content", "part", "name"]))
    if where == "part":
        message["content"] = [{"type": "text", "text": CANARY}, {"type": "text", "text": draw(odd_text)}]
    elif where == "name":
        message["name"] = draw(odd_text)
    return as_json({"model": PERSONA, "messages": [*VALID["messages"], message]})


bodies = st.one_of(
    st.just(as_json(VALID)),
    mutated_requests(),
    mutated_requests(),
    odd_text_requests(),
    st.binary(max_size=200),  # anything at all, invalid UTF-8 included
    json_values.map(as_json),
    st.builds(lambda depth, opener: opener * depth, st.sampled_from([2, 900, 1_000, 3_000, 200_000]),
              st.sampled_from([b"[", b'{"a":', b'{"model": "x", "messages": ['])),
    st.builds(lambda digits: b'{"model": "m", "messages": [], "n": ' + b"7" * digits + b"}",
              st.sampled_from([4_300, 4_301, 50_000])),
    st.builds(lambda encoding: json.dumps(VALID, ensure_ascii=False).encode(encoding),
              st.sampled_from(["utf-16", "utf-16-be", "utf-32", "cp932", "utf-8-sig"])),
    st.builds(lambda body, cut: body[:cut], mutated_requests(), st.integers(0, 120)),  # cut short
)

# Header values a client can put on the wire: visible ASCII, space, tab and any byte above 0x7f (obs-text).
header_value = st.binary(max_size=40).map(lambda raw: bytes(b for b in raw if b == 9 or 32 <= b < 127 or b >= 128)
                                          .strip(b" \t"))
token = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~",
                min_size=1, max_size=12).map(str.encode)
FRAMING_NAMES = {b"content-length", b"transfer-encoding", b"host", b"connection", b"content-encoding", b"expect",
                 b"upgrade", b"authorization"}
authorizations = st.one_of(
    st.just([auth()]), st.just([auth()]), st.just([]), st.just([auth("sk-wrong")]),
    st.just([(b"Authorization", b"bearer " + KEY.encode())]),  # the scheme is case-insensitive
    st.just([(b"Authorization", b"Basic " + KEY.encode())]),
    st.just([auth(), (b"Authorization", b"Bearer sk-wrong")]), st.just([auth("sk-wrong"), auth()]),
    header_value.map(lambda value: [(b"Authorization", b"Bearer " + value)]),
    header_value.map(lambda value: [(b"Authorization", value)]),
)
content_types = st.one_of(
    st.just([(b"Content-Type", b"application/json")]), st.just([]),
    st.sampled_from([b"text/plain", b"application/json; charset=utf-16", b"multipart/form-data; boundary=x",
                     b"application/x-www-form-urlencoded"]).map(lambda value: [(b"Content-Type", value)]),
    header_value.map(lambda value: [(b"Content-Type", value)]),
    st.just([(b"Content-Type", b"application/json"), (b"Content-Type", b"text/html")]),
)
extra_headers = st.lists(st.tuples(token.filter(lambda name: name.lower() not in FRAMING_NAMES), header_value),
                         max_size=3) | st.just([(b"Expect", b"100-continue")])
ROUTES = [("POST", "/v1/chat/completions")] * 6 + [
    ("GET", "/v1/models"), ("GET", "/v1/models/%E7%BE%8E%E5%92%B2"),
    ("GET", "/v1/models/gpt-4o"), ("HEAD", "/v1/models"), ("GET", "/v1/chat/completions"),
    ("OPTIONS", "/v1/chat/completions"), ("PATCH", "/v1/models"), ("POST", "/v1/nothing"), ("POST", "/v1"),
    ("PUT", "/v1/models/x/y"),
]
# How the body travels. The last ones are not valid HTTP framing: aiohttp may answer them itself.
TRANSPORTS = ["length"] * 20 + ["chunked", "gzip", "no-length", "shorter-length", "longer-length-closed",
                                "two-lengths", "two-equal-lengths", "bad-length", "length-and-chunked", "bad-chunk"]
FRAMING = {"no-length", "shorter-length", "longer-length-closed", "two-lengths", "two-equal-lengths", "bad-length",
           "length-and-chunked", "bad-chunk"}
# Headers a request may carry once (RFC 9110): aiohttp's parser refuses a second one, so that no two parts of a
# server chain read different values (aiohttp.http_parser.SINGLETON_HEADERS).
SINGLETONS = {b"content-length", b"content-location", b"content-range", b"content-type", b"etag", b"host",
              b"max-forwards", b"server", b"transfer-encoding", b"user-agent"}


@dataclass
class Case:
    method: str
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    transport: str
    wire: bytes = field(init=False)

    def __post_init__(self) -> None:
        body, length, headers = self.body, "auto", list(self.headers)
        if self.transport == "chunked":
            body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:50], body[50:]) if part)
            body, length = body + b"0\r\n\r\n", "none"
            headers.append((b"Transfer-Encoding", b"chunked"))
        elif self.transport == "gzip":
            body = gzip.compress(body)
            headers.append((b"Content-Encoding", b"gzip"))
        elif self.transport in FRAMING:
            length = "none"
            headers += {
                "no-length": [],
                "shorter-length": [(b"Content-Length", b"%d" % max(0, len(body) - 3))],
                "longer-length-closed": [(b"Content-Length", b"%d" % (len(body) + 10))],
                "two-lengths": [(b"Content-Length", b"%d" % len(body)), (b"Content-Length", b"%d" % (len(body) + 1))],
                "two-equal-lengths": [(b"Content-Length", b"%d" % len(body))] * 2,
                "bad-length": [(b"Content-Length", b"-%d" % len(body))],
                "length-and-chunked": [(b"Content-Length", b"%d" % len(body)), (b"Transfer-Encoding", b"chunked")],
                "bad-chunk": [(b"Transfer-Encoding", b"chunked")],
            }[self.transport]
            if self.transport == "bad-chunk":
                body = b"zz\r\n" + body + b"\r\n0\r\n\r\n"
        self.wire = request_bytes(self.method, self.path, headers, body, length)

    @property
    def breaks_http(self) -> bool:
        """Built to break HTTP's framing: aiohttp's parser may refuse it before any route sees it."""
        names = [name.lower() for name, _ in self.headers] + [b"host"]
        return self.transport in FRAMING or any(names.count(name) > 1 for name in SINGLETONS)

    @property
    def authorized(self) -> bool:
        """aiohttp's request.headers.get takes the first Authorization header."""
        first = next((value for name, value in self.headers if name == b"Authorization"), b"")
        scheme, _, given = first.partition(b" ")
        return scheme.lower() == b"bearer" and given.strip(b" \t") == KEY.encode()


@st.composite
def wire_cases(draw) -> Case:
    """Anything on every axis: route, headers, body, framing."""
    method, path = draw(st.sampled_from(ROUTES))
    headers = draw(authorizations) + draw(content_types) + draw(extra_headers)
    return Case(method, path, headers, draw(bodies), draw(st.sampled_from(TRANSPORTS)))


@st.composite
def body_cases(draw) -> Case:
    """The body on trial: the right route and key, a body the framing delivers whole."""
    headers = [auth()] + draw(content_types) + draw(extra_headers)
    return Case("POST", "/v1/chat/completions", headers, draw(bodies), draw(st.sampled_from(["length", "chunked",
                                                                                             "gzip"])))


storm_cases = st.one_of(body_cases(), body_cases(), wire_cases())


KNOWN = {"/v1/chat/completions": {"POST"}, "/v1/models": {"GET", "HEAD"}}


def expected_route_status(case: Case) -> int | None:
    """404 or 405 where the route decides, else None."""
    path = case.path
    allowed = KNOWN.get(path) or ({"GET", "HEAD"} if re.fullmatch(r"/v1/models/[^/]+", path) else None)
    if allowed is None:
        return 404
    return None if case.method in allowed else 405


@dataclass
class Tally:
    by_app: int = 0  # answers from bunshin's middleware (every answer under /v1 that aiohttp's parser let through)
    by_app_broken: int = 0  # of them, to requests built to break HTTP: bytes after them may be refused by the parser
    by_parser: int = 0  # aiohttp's own 400 for bytes that are not valid HTTP
    unanswered: int = 0  # connection closed without an answer (a body that never came)
    statuses: dict[int, int] = field(default_factory=dict)


def check_answer(case: Case, answer: Answer | None, tally: Tally) -> None:
    if answer is None:
        assert case.transport == "longer-length-closed", f"no answer to {case.wire[:200]!r}"
        tally.unanswered += 1
        return
    tally.statuses[answer.status] = tally.statuses.get(answer.status, 0) + 1
    assert answer.status < 500, (answer.status, answer.body[:300], case.wire[:300])
    if not answer.is_json and answer.status == 400 and case.breaks_http:
        assert answer.headers["content-type"].startswith("text/plain")  # aiohttp's parser: no route was reached
        tally.by_parser += 1
        return
    tally.by_app += 1
    tally.by_app_broken += case.breaks_http
    assert case.method == "HEAD" or answer.is_json or answer.headers.get("content-type") == "text/event-stream", (
        answer.status, answer.headers, answer.body[:300], case.wire[:300])
    route = expected_route_status(case)
    if route is not None:
        assert answer.status == route, (answer.status, case.method, case.path)
    elif not case.breaks_http:
        # Past the route: the key decides, then the request.
        assert (answer.status == 401) == (not case.authorized), (answer.status, case.headers)
    if case.method == "HEAD":
        assert answer.body == b""
        return
    if answer.status >= 400:
        body = answer.json()
        assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
        assert CANARY not in answer.body.decode() and CANARY_JA not in answer.body.decode()
    elif case.path == "/v1/chat/completions":
        assert answer.is_json and answer.json()["object"] == "chat.completion" or b"data: [DONE]" in answer.body


def api_answers(samples: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in samples.items() if k.startswith("bunshin_api_responses_total")}


def test_a_storm_of_bad_requests_gets_only_4xx_in_openais_shape_all_counted(api):
    url, lines = api
    port = port_of(url)
    before = metric_samples(url)
    first_line = len(lines.records)
    tally = Tally()

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(storm_cases)
    def storm(case: Case) -> None:
        answer = exchange(port, case.wire, half_close=case.transport == "longer-length-closed")
        check_answer(case, answer, tally)

    storm()
    assert tally.by_app > 150 and tally.by_parser > 10, tally  # the storm reached both sides
    assert set(tally.statuses) >= {200, 400, 401, 404, 405}, tally.statuses

    # The daemon is healthy and answers as before.
    assert get_json(url.replace("/v1", "/healthz"))[0] == 200
    reply = client(url).chat.completions.create(model=PERSONA, messages=VALID["messages"])
    assert reply.choices[0].message.content is not None

    # Every answer was counted: by status, and aiohttp's own refusals apart. A body that never came (a
    # Content-Length that lies, then the connection closed) may be counted as a 400 nobody received.
    after = metric_samples(url)
    counted = {k: after[k] - before.get(k, 0) for k in api_answers(after)}
    sent = sum(counted.values()) - 1  # less the check above
    assert tally.by_app <= sent <= tally.by_app + tally.unanswered, (counted, tally)
    assert counted.get('bunshin_api_responses_total{status="500"}', 0) == 0
    for status, seen in tally.statuses.items():
        if status != 400:
            assert counted.get(f'bunshin_api_responses_total{{status="{status}"}}', 0) == seen + (status == 200)
    rejected = after["bunshin_http_rejected_total"] - before.get("bunshin_http_rejected_total", 0)
    assert tally.by_parser <= rejected <= tally.by_parser + tally.by_app_broken, (rejected, tally)

    # The log: no ERROR (aiohttp's tracebacks for bytes that are not HTTP are one WARNING line each), and nowhere
    # the sender's words, tracebacks included.
    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    records = lines.records[first_line:]
    assert [formatter.format(r) for r in records if r.levelno >= logging.ERROR] == []
    logged = "\n".join(formatter.format(r) for r in records)
    assert CANARY not in logged and CANARY_JA not in logged


# --- the parser alone: many more shapes than HTTP can carry in a test's time ---------------------------------------

CONFIG = BotConfig.from_dict({"persona": {"name": PERSONA}, "api": {"enabled": True}}, source="test")


@settings(max_examples=1_000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(bodies)
def test_the_request_parser_gives_turns_or_an_api_error_for_any_body(body):
    try:
        chat = parse_chat_request(body, PERSONA, CONFIG, PERSONA)
    except ApiError as exc:
        assert exc.status in (400, 404), exc.status
        assert exc.message and CANARY not in exc.message and CANARY_JA not in exc.message
        exc.response()  # it can be sent
        return
    assert chat.turns
    for turn in chat.turns:
        (turn.speaker + turn.text).encode("utf-8")  # a tokenizer can take it
        assert "\n" not in turn.speaker and turn.text == turn.text.strip()
