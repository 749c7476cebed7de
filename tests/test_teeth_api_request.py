"""bot/api_request.py called directly, written against the mutants `make mutants` left alive (docs/mutation.md):
what each refusal says, word for word (a client's value shown only as a short identifier or by its JSON type), and
the key check's tolerance of how clients write the header. Over HTTP these are tests/test_teeth_api.py's and
tests/test_api_bad_input.py's concern."""

from __future__ import annotations

import json

import pytest

from bot.api_request import ApiError, check_key, check_model, parse_chat_request
from finetune.config import BotConfig

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


FIELD_REFUSALS = [  # (fields, param, message)
    ({"n": 2}, "n", "n: bunshin generates one reply per request; leave n out or set it to 1"),
    ({"n": "1"}, "n", "n: bunshin generates one reply per request; leave n out or set it to 1"),
    ({"stream": "yes"}, "stream", "stream: must be true or false"),
    ({"stream_options": []}, "stream_options", "stream_options: must be an object"),
    ({"max_tokens": "5"}, "max_tokens", "max_tokens: must be an integer"),
    ({"seed": 1.5}, "seed", "seed: must be an integer"),
    ({"temperature": "hot"}, "temperature", "temperature: must be a number"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens: must be at least 1"),
    ({"temperature": 2.5}, "temperature", "temperature: must be between 0 and 2"),
    ({"presence_penalty": -3}, "presence_penalty", "presence_penalty: must be between -2 and 2"),
]


@pytest.mark.parametrize("fields, param, message", FIELD_REFUSALS)
def test_each_refusal_of_a_field_names_it_and_says_what_it_must_be(fields, param, message):
    error = refusal(lambda: parse_chat_request(body([{"role": "user", "content": "やあ"}], **fields), PERSONA, CONFIG,
                                               PERSONA))
    assert (error.status, error.param, error.code, error.message) == (400, param, "invalid_value", message)


def test_n_of_one_is_accepted_the_sampling_fields_applied_and_the_others_listed():
    chat = parse_chat_request(body([{"role": "user", "content": "やあ"}], n=1, temperature=0.7, stop=["\n"],
                                   tools=None, stream=True, stream_options={"include_usage": True}, top_p=0.9,
                                   seed=-3, frequency_penalty=0.1, logit_bias={}),
                              PERSONA, CONFIG, PERSONA)
    assert (chat.stream, chat.include_usage, chat.ignored) == (True, True, ["frequency_penalty", "logit_bias"])
    assert chat.sampling == {"temperature": 0.7, "top_p": 0.9, "seed": -3, "stop": ("\n",)}


@pytest.mark.parametrize("fields, sampling", [
    ({"max_tokens": 5}, {"max_tokens": 5}),
    ({"max_tokens": 5, "max_completion_tokens": 7}, {"max_tokens": 7}),  # the newer name wins
    ({"temperature": 1}, {"temperature": 1.0}),
    ({"top_p": 0}, {"top_p": 1e-9}),  # OpenAI's 0: only the most likely token
    ({"stop": "。"}, {"stop": ("。",)}),
    ({"stop": None, "seed": None}, {}),
])
def test_the_sampling_fields_become_the_requests_own_values(fields, sampling):
    assert parse_chat_request(body([{"role": "user", "content": "やあ"}], **fields), PERSONA, CONFIG,
                              PERSONA).sampling == sampling


@pytest.mark.parametrize("stop, param, message", [
    (["a", "b", "c", "d", "e"], "stop", "stop: must be a string or an array of at most 4 strings, not an array of 5"),
    (5, "stop", "stop: must be a string or an array of at most 4 strings, not a number"),
    ([""], "stop[0]", "stop[0]: must be a non-empty string of at most 256 characters, not a string of 0 characters"),
    (["。", 3], "stop[1]", "stop[1]: must be a non-empty string of at most 256 characters, not a number"),
    ("x" * 257, "stop", "stop: must be a non-empty string of at most 256 characters, not a string of 257 characters"),
])
def test_a_stop_that_is_not_up_to_four_strings_is_refused_naming_it(stop, param, message):
    error = refusal(lambda: parse_chat_request(body([{"role": "user", "content": "やあ"}], stop=stop), PERSONA, CONFIG,
                                               PERSONA))
    assert (error.status, error.param, error.message) == (400, param, message)


@pytest.mark.parametrize("part, shown", [("見て", "'見て'"), (5, "a number"), (None, "null"),
                                         ({"type": "image_url", "text": "x"}, "'image_url'")])
def test_a_content_part_that_is_not_a_text_part_is_refused_by_its_type(part, shown):
    messages = [{"role": "user", "content": [{"type": "text", "text": "これ"}, part]}]
    error = refusal(lambda: parse_chat_request(body(messages), PERSONA, CONFIG, PERSONA))
    assert (error.param, error.message) == ("messages[0].content[1]", (
        f"messages[0].content[1]: only text parts are understood (the persona reads text), not {shown}"))


def test_text_parts_are_joined_by_newlines():
    messages = [{"role": "user", "content": [{"type": "text", "text": "一行目"}, {"type": "text", "text": "二行目"}]}]
    [turn] = parse_chat_request(body(messages), PERSONA, CONFIG, PERSONA).turns
    assert turn.text == "一行目\n二行目"


def test_a_client_named_like_the_persona_is_told_apart_from_it():
    """Whether by `name` or by [api] user_name, a person called 美咲 is not the persona's own turns."""
    config = BotConfig.from_dict({"persona": {"name": PERSONA}, "api": {"enabled": True, "user_name": PERSONA}},
                                 source="test")
    messages = [{"role": "user", "content": "一"}, {"role": "user", "content": "二", "name": PERSONA},
                {"role": "assistant", "content": "三", "name": "誰か"}]
    speakers = [t.speaker for t in parse_chat_request(body(messages), PERSONA, config, PERSONA).turns]
    assert speakers[2] == PERSONA and speakers[0] != PERSONA and speakers[1] != PERSONA
    assert PERSONA in speakers[0] and speakers[0] == speakers[1]


@pytest.mark.parametrize("name, ok", [("Xavier", True), ("x" * 64, True), ("x" * 65, False), ("a\rb", False)])
def test_a_name_is_one_line_of_at_most_64_characters(name, ok):
    raw = body([{"role": "user", "content": "やあ", "name": name}])
    if ok:
        [turn] = parse_chat_request(raw, PERSONA, CONFIG, PERSONA).turns
        assert turn.speaker == name
    else:
        assert refusal(lambda: parse_chat_request(raw, PERSONA, CONFIG, PERSONA)).param == "messages[0].name"


@pytest.mark.parametrize("max_turns", [1, 2, 3, 5])
def test_the_window_of_a_long_conversation_is_a_platform_chats(max_turns):
    """The last max_turns turns, or up to WINDOW_SLACK fewer (never all of them gone), from a start that holds while
    the client's history grows: with max_turns 1 exactly the last turn."""
    from bot.memory import window_start
    from bot.router import WINDOW_SLACK

    config = BotConfig.from_dict({"persona": {"name": PERSONA}, "api": {"enabled": True},
                                  "memory": {"max_turns": max_turns}}, source="test")
    for n in range(1, 12):
        messages = [{"role": "user", "content": f"発言{i}"} for i in range(n)]
        turns = parse_chat_request(body(messages), PERSONA, config, PERSONA).turns
        assert turns[-1].text == f"発言{n - 1}"
        assert max(1, min(n, max_turns - min(WINDOW_SLACK, max_turns - 1))) <= len(turns) <= min(n, max_turns)
        # ConversationMemory.recent's rule, the request's positions standing in for the memory's ids
        start = window_start(list(range(n)), max_turns, min(WINDOW_SLACK, max_turns - 1))
        assert [t.text for t in turns] == [f"発言{i}" for i in range(start, n)]
    if max_turns == 1:
        assert len(turns) == 1


def test_stop_at_its_limits_is_taken_and_a_temperature_given_as_an_integer_is_a_float():
    """Four stop strings and one of 256 characters are allowed (OpenAI's limits: refused one past them, above);
    JSON's `1` reaches the sampler as the float 1.0."""
    four = ["a", "b", "c", "x" * 256]
    chat = parse_chat_request(body([{"role": "user", "content": "やあ"}], stop=four, temperature=1), PERSONA, CONFIG,
                              PERSONA)
    assert chat.sampling["stop"] == tuple(four)
    assert type(chat.sampling["temperature"]) is float


def test_a_stop_string_with_an_unpaired_surrogate_is_refused_naming_its_place():
    # As JSON carries it: a \ud800 escape (ASCII), which json.loads turns into a lone surrogate.
    escaped = json.dumps({"model": PERSONA, "messages": [{"role": "user", "content": "やあ"}], "stop": ["。", "a\ud800"]})
    error = refusal(lambda: parse_chat_request(escaped.encode(), PERSONA, CONFIG, PERSONA))
    assert (error.status, error.param) == (400, "stop[1]")
    assert error.message.startswith("stop[1]: is not valid Unicode text")
