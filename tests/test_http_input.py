"""bot/http_input.py's pure parts, word for word: the bytes a header was sent as, and the reason a body is refused
(it completes "the body is ..." in the API's and the webhook's 400 answers, so its words are the interface)."""

from __future__ import annotations

import pytest

from bot.http_input import BadBody, header_bytes, is_utf8, parse_json


def test_a_header_gives_back_the_bytes_the_client_sent():
    assert header_bytes("abc") == b"abc"
    assert header_bytes("sha256=\udcff\udc80") == b"sha256=\xff\x80"  # aiohttp's surrogateescape for stray bytes
    # a lone surrogate no byte maps to (not from aiohttp, but no exception either): its UTF-8 form, as sent
    assert header_bytes("x\ud800") == b"x\xed\xa0\x80"


def test_a_bad_body_says_its_reason_as_its_text():
    exc = BadBody("empty: it must be JSON")
    assert exc.reason == str(exc) == "empty: it must be JSON"


@pytest.mark.parametrize("body, reason", [
    (b"", "empty: it must be JSON"),
    (b" \n\t", "empty: it must be JSON"),
    (b"\xff{}", "not UTF-8 (invalid byte at offset 0)"),
    (b'{"a": 1', "not JSON (Expecting ',' delimiter at line 1 column 8)"),
    (b"1" * 5000, "not JSON a parser can take (a number with too many digits)"),
    (b"[" * 100_000, "not JSON a parser can take (nested too deeply)"),
])
def test_each_refused_body_gets_its_reason_word_for_word(body, reason):
    with pytest.raises(BadBody) as caught:
        parse_json(body)
    assert caught.value.reason == reason


def test_json_escapes_for_lone_surrogates_parse_but_are_not_utf8():
    value = parse_json(b'{"text": "\\ud800"}')
    assert value == {"text": "\ud800"} and not is_utf8("ok", value["text"]) and is_utf8("ok", "日本語")
