"""What the daemon's HTTP routes take from a request (the API in bot/api.py, LINE's webhook in adapters/line.py),
made safe for whatever a client sends.

Each of these once turned bad input into an HTTP 500:

- aiohttp hands over a header value as a str in which a byte that is not UTF-8 is a lone surrogate
  ("surrogateescape"): `value.encode("utf-8")` raises. `header_bytes` gives the bytes as sent.
- JSON may carry `\\ud800` escapes: valid JSON, but a str that UTF-8 (SQLite, a tokenizer) cannot take.
  `is_utf8` finds them.
- Python's JSON parser recurses once per nesting level (RecursionError for `[[[[...`), refuses integers of
  over 4,300 digits with a ValueError, and guesses UTF-16 and UTF-32 from bytes. `parse_json` takes UTF-8 only
  and turns every refusal into `BadBody`.
- A body cut short (the connection ended first), badly chunked or in a Content-Encoding that does not decode
  fails while it is read. `read_capped` raises `BadBody` for it.

A `BadBody` reason says what is wrong and where (a byte offset, a line and column), never the bytes or the text
sent: it goes into responses and logs.
"""

from __future__ import annotations

import json

from aiohttp import web


class BadBody(Exception):
    """A request body that cannot be taken: `reason` completes "the body is ..." (e.g. "not JSON (...)")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def read_capped(request: web.Request, limit: int) -> bytes | None:
    """The request body, or None once it passes `limit` bytes (checked while reading: a chunked body has no
    Content-Length to check first; a compressed one is counted as it decompresses). BadBody when it cannot be
    read to its end."""
    if request.content_length is not None and request.content_length > limit:
        return None
    body = bytearray()
    try:
        async for chunk in request.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > limit:
                return None
    except web.RequestPayloadError:
        # aiohttp's text for these quotes no bytes, but says little a client can act on.
        raise BadBody("unreadable: cut short before its Content-Length, badly chunked, or in a Content-Encoding "
                      "that does not decode") from None
    except ConnectionError:  # the client stopped sending (and may be gone) before the body's end
        raise BadBody("cut short: the connection ended before the body did") from None
    return bytes(body)


def parse_json(body: bytes):
    """The JSON value in `body`, which must be UTF-8 (RFC 8259 §8.1); BadBody says why not."""
    try:
        text = body.decode("utf-8")  # json.loads(bytes) would also guess UTF-16 and UTF-32
    except UnicodeDecodeError as exc:
        raise BadBody(f"not UTF-8 (invalid byte at offset {exc.start})") from None
    if not text.strip():
        raise BadBody("empty: it must be JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:  # its msg names the position, never the text
        raise BadBody(f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise BadBody("not JSON a parser can take (nested too deeply)") from None
    except ValueError:  # an integer literal past sys.get_int_max_str_digits()
        raise BadBody("not JSON a parser can take (a number with too many digits)") from None


def is_utf8(*texts: str) -> bool:
    """False for a str holding an unpaired surrogate (from a JSON `\\ud800` escape or a header's stray byte): valid
    in Python and JSON, but not text that UTF-8 can encode."""
    try:
        for text in texts:
            text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def header_bytes(value: str) -> bytes:
    """A header value as the client sent it: aiohttp decodes header bytes as UTF-8 with "surrogateescape"."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no byte maps to: not from aiohttp, but never an exception here
        return value.encode("utf-8", "surrogatepass")
