"""bot/api_request.py called directly, written against the mutants `make mutants` left alive (docs/mutation.md):
what each refusal says, word for word (a client's value shown only as a short identifier or by its JSON type), and
the key check's tolerance of how clients write the header. Over HTTP these are tests/test_teeth_api.py's and
tests/test_api_bad_input.py's concern."""

from __future__ import annotations

import json

import pytest

from bot.api_request import ApiError, check_key, check_model, parse_chat_request
from bot.config import BotConfig

PERSONA = "美咲"
CONFIG = BotConfig.from_dict({"persona": {"name": PERSONA}, "api": {"enabled": True}}, source="test")
KEY = b"sk-teeth 5d1e"  # a key with a space in it: the header's first space ends the scheme, not the last


def refusal(call) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("model, shown", [
    (17, "a number"), (1.5, "a number"), (True, "a boolean"), ([PERSONA], "an array"), ({"id": PERSONA}, "an object"),
])
def test_a_model_that_is_not_a_string_is_named_by_its_json_type(model, shown):
    error = refusal(lambda: check_model(model, PERSONA))
    assert (error.status, error.param, error.code) == (400, "model", "invalid_value")
    assert error.message == f"model: must be a string, not {shown}"


def test_a_missing_model_is_missing_and_names_the_one_served():
    error = refusal(lambda: check_model(None, PERSONA))
    assert (error.status, error.param, error.code) == (400, "model", "missing_required_parameter")
    assert error.message == f"model: required; this server's model is '{PERSONA}' (listed by GET /v1/models)"


@pytest.mark.parametrize("model, shown", [("gpt-4o", "'gpt-4o'"), ("a b", "a string of 3 characters"),
                                          ("x" * 65, "a string of 65 characters")])
def test_an_unknown_model_is_quoted_only_when_it_is_a_short_identifier(model, shown):
    error = refusal(lambda: check_model(model, PERSONA))
    assert (error.status, error.param, error.code) == (404, "model", "model_not_found")
    assert error.message == f"The model {shown} does not exist; this server has '{PERSONA}' (listed by GET /v1/models)"


@pytest.mark.parametrize("role, shown", [(None, "null"), (3, "a number"), ("wizard", "'wizard'"),
                                         ("魔法使い です", "a string of 7 characters")])
def test_an_unknown_role_is_named_by_its_type_or_as_an_identifier(role, shown):
    body = json.dumps({"model": PERSONA, "messages": [{"role": role, "content": "やあ"}]}).encode()
    error = refusal(lambda: parse_chat_request(body, PERSONA, CONFIG, PERSONA))
    assert error.param == "messages[0].role"
    assert error.message == f"messages[0].role: must be user, assistant, system or developer, not {shown}"


def test_a_content_part_of_another_kind_is_named_by_its_type():
    body = json.dumps({"model": PERSONA, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "見て"}, {"type": "image_url", "image_url": {"url": "data:..."}}]}]}).encode()
    error = refusal(lambda: parse_chat_request(body, PERSONA, CONFIG, PERSONA))
    assert error.param == "messages[0].content[1]"
    assert error.message == ("messages[0].content[1]: only text parts are understood (the persona reads text), "
                             "not 'image_url'")


@pytest.mark.parametrize("header", ["Bearer sk-teeth 5d1e", "bearer sk-teeth 5d1e", "BEARER  sk-teeth 5d1e "])
def test_the_key_is_taken_after_the_first_space_of_a_bearer_header(header):
    check_key(header, KEY)  # no ApiError


@pytest.mark.parametrize("header, message", [
    ("", "no API key: send it as 'Authorization: Bearer KEY' (the value of the variable [api] key_env names)"),
    ("Bearer ", "no API key: send it as 'Authorization: Bearer KEY' (the value of the variable [api] key_env names)"),
    ("Basic sk-teeth 5d1e",
     "no API key: send it as 'Authorization: Bearer KEY' (the value of the variable [api] key_env names)"),
    ("Bearer sk-teeth", "incorrect API key"),
    ("Bearer sk-teeth 5d1e5", "incorrect API key"),
])
def test_a_missing_or_wrong_key_is_401_saying_which(header, message):
    error = refusal(lambda: check_key(header, KEY))
    assert (error.status, error.code, error.kind) == (401, "invalid_api_key", "invalid_request_error")
    assert error.message == message


def body(messages, **fields) -> bytes:
    return json.dumps({"model": PERSONA, "messages": messages, **fields}, ensure_ascii=False).encode()


TOOL_REFUSAL = "is not supported: bunshin does not call tools"
REFUSALS = [  # (messages, param, code, message)
    (None, "messages", "missing_required_parameter", "messages: required (the conversation, oldest first)"),
    ([], "messages", "invalid_value", "messages: must be a non-empty array of messages"),
    ({"role": "user"}, "messages", "invalid_value", "messages: must be a non-empty array of messages"),
    (["やあ"], "messages[0]", "invalid_value", "messages[0]: must be an object with role and content"),
    ([{"role": "tool", "content": "42"}], "messages[0].role", "invalid_value", f"messages[0].role: 'tool' {TOOL_REFUSAL}"),
    ([{"role": "function", "content": "42"}], "messages[0].role", "invalid_value",
     f"messages[0].role: 'function' {TOOL_REFUSAL}"),
    ([{"role": "assistant", "content": "  "}, {"role": "user", "content": None}], "messages", "invalid_value",
     "messages: no user or assistant message has text"),
    ([{"role": "user", "content": 5}], "messages[0].content", "invalid_value",
     "messages[0].content: must be a string or an array of text parts, not a number"),
    ([{"role": "user", "content": "やあ", "name": "a\nb"}], "messages[0].name", "invalid_value",
     "messages[0].name: must be one line of at most 64 characters"),
]


@pytest.mark.parametrize("messages, param, code, message", REFUSALS)
def test_each_refusal_of_the_messages_names_its_field_and_says_why(messages, param, code, message):
    error = refusal(lambda: parse_chat_request(body(messages), PERSONA, CONFIG, PERSONA))
    assert (error.status, error.param, error.code, error.message) == (400, param, code, message)
    assert str(error) == message


def test_a_system_message_refused_by_config_says_why():
    config = BotConfig.from_dict({"persona": {"name": PERSONA}, "api": {"enabled": True, "system_messages": "reject"}},
                                 source="test")
    messages = [{"role": "user", "content": "やあ"}, {"role": "developer", "content": "be brief"}]
    error = refusal(lambda: parse_chat_request(body(messages), PERSONA, config, PERSONA))
    assert (error.param, error.message) == ("messages[1].role", (
        'messages[1]: developer messages are refused ([api] system_messages = "reject"): the persona was trained on '
        "conversations only, never with a system prompt"))


def test_messages_without_text_are_passed_over_and_the_rest_kept_in_order():
    """An assistant turn that only called tools (content null or empty) said nothing: the turns after it count."""
    messages = [{"role": "user", "content": "一つ目"}, {"role": "assistant", "content": None},
                {"role": "assistant", "content": ""}, {"role": "user", "content": "二つ目"}]
    turns = parse_chat_request(body(messages), PERSONA, CONFIG, PERSONA).turns
    assert [t.text for t in turns] == ["一つ目", "二つ目"]


def test_a_message_longer_than_max_message_chars_is_cut_as_a_platforms_is():
    limit = CONFIG.limits.max_message_chars
    turns = parse_chat_request(body([{"role": "user", "content": "あ" * (limit + 50)}]), PERSONA, CONFIG, PERSONA).turns
    assert [len(t.text) for t in turns] == [limit]


def test_an_error_response_is_openais_json_in_utf8_and_escapes_a_lone_surrogate():
    error = ApiError(400, f"model: {PERSONA} はない", param="model", code="invalid_value")
    response = error.response()
    assert f"{PERSONA} はない".encode() in response.body  # readable in curl, not \\u escapes
    assert json.loads(response.body) == {"error": {"message": f"model: {PERSONA} はない", "type": "invalid_request_error",
                                                   "param": "model", "code": "invalid_value"}}
    lone = ApiError(400, "messages[0].name: \ud800", param="messages[0].name").response()
    assert json.loads(lone.body)["error"]["message"] == "messages[0].name: \ud800"  # sent as \\ud800, never a 500
    assert ApiError(429, "busy", retry_after=1.2).response().headers["Retry-After"] == "2"
