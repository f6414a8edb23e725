"""Every field of OpenAI's two create requests has a row in ``openai_api/fields.py``, and
does what its row says: the rows are held to the installed ``openai`` package's request
types (a field a newer SDK adds fails here until it has a row), and each row's behaviour
is checked on the wire, in what the upstream was sent."""

from __future__ import annotations

import typing
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient
from openai.types import chat, responses
from openai.types.chat import completion_create_params
from openai.types.responses import response_create_params, response_input_item_param
from pydantic import BaseModel

from stageserver.fields import FieldRule, Treatment
from stageserver.openai_api import requests as models
from stageserver.openai_api.fields import CHAT_FIELDS, RESPONSES_FIELDS
from testing.apps import app_client
from testing.fake_upstream import FakeUpstream
from testing.field_rows import (
    Check,
    Dropped,
    Expect,
    Refused,
    Sent,
    assert_docs_table_has_a_row_per_field,
)

HI = [{"role": "user", "content": "hi"}]
CHAT = {"model": "fake?chunks=2", "messages": HI}
RESPONSE = {"model": "fake?chunks=2", "input": "hi"}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
IMAGE_URL = "https://images.example/cat.png"


def fields_of(typed_dict: Any) -> set[str]:
    return set(typing.get_type_hints(typed_dict))


# -- the rows, and the SDK's request types ---------------------------------------------------


def test_every_chat_completions_field_of_the_sdk_has_a_row_and_no_other() -> None:
    sdk = fields_of(completion_create_params.CompletionCreateParamsBase) | {"stream"}
    assert {rule.name for rule in CHAT_FIELDS} == sdk


def test_every_responses_field_of_the_sdk_has_a_row_and_no_other() -> None:
    sdk = fields_of(response_create_params.ResponseCreateParamsBase) | {"stream"}
    assert {rule.name for rule in RESPONSES_FIELDS} == sdk


def test_a_row_is_one_field_and_every_field_is_in_the_request_model() -> None:
    pairs: list[tuple[tuple[FieldRule, ...], type[BaseModel]]] = [
        (CHAT_FIELDS, models.ChatCompletionRequest),
        (RESPONSES_FIELDS, models.ResponseRequest),
    ]
    for rules, model in pairs:
        names = [rule.name for rule in rules]
        assert len(names) == len(set(names))
        aliases = {field.alias or name for name, field in model.model_fields.items()}
        assert set(names) == aliases


def test_a_refused_field_says_why_and_a_passed_one_reaches_the_request() -> None:
    for rule in (*CHAT_FIELDS, *RESPONSES_FIELDS):
        assert rule.says
        if rule.treatment is Treatment.REFUSED:
            assert rule.refuse is not None, rule.name


# Each content part and input item stageserver takes knows every field the SDK may send
# in it: a client of a newer SDK is never refused for a field of a part it takes.
@pytest.mark.parametrize(
    ("sdk", "model"),
    [
        (chat.ChatCompletionContentPartTextParam, models.TextPart),
        (chat.ChatCompletionContentPartImageParam, models.ImagePart),
        (chat.chat_completion_content_part_image_param.ImageURL, models.ImageURL),
        (chat.ChatCompletionContentPartInputAudioParam, models.AudioPart),
        (chat.chat_completion_content_part_input_audio_param.InputAudio, models.InputAudio),
        (chat.ChatCompletionContentPartRefusalParam, models.RefusalPart),
        (chat.ChatCompletionUserMessageParam, models.ChatMessage),
        (chat.ChatCompletionAssistantMessageParam, models.ChatMessage),
        (chat.ChatCompletionSystemMessageParam, models.ChatMessage),
        (chat.ChatCompletionDeveloperMessageParam, models.ChatMessage),
        (chat.ChatCompletionToolMessageParam, models.ChatMessage),
        (chat.ChatCompletionMessageFunctionToolCallParam, models.ToolCall),
        (chat.ChatCompletionFunctionToolParam, models.FunctionTool),
        (chat.ChatCompletionStreamOptionsParam, models.StreamOptions),
        (responses.ResponseInputTextParam, models.InputText),
        (responses.ResponseInputImageParam, models.InputImage),
        (responses.EasyInputMessageParam, models.InputMessage),
        (response_input_item_param.Message, models.InputMessage),
        (responses.ResponseOutputMessageParam, models.InputMessage),
        (responses.ResponseFunctionToolCallParam, models.FunctionCallItem),
        (response_input_item_param.FunctionCallOutput, models.FunctionCallOutputItem),
        (responses.ResponseReasoningItemParam, models.ReasoningItem),
        (responses.FunctionToolParam, models.ResponseFunctionTool),
        (responses.ResponseTextConfigParam, models.TextConfig),
    ],
)
def test_a_part_or_item_it_takes_knows_every_field_the_sdk_sends(
    sdk: Any, model: type[BaseModel]
) -> None:
    known = {field.alias or name for name, field in model.model_fields.items()}
    assert fields_of(sdk) <= known


def test_the_docs_table_has_a_row_per_field() -> None:
    for rules in (CHAT_FIELDS, RESPONSES_FIELDS):
        assert_docs_table_has_a_row_per_field(rules)


# -- each row's behaviour ------------------------------------------------------------------------


def _streamed(answer: Any, body: dict[str, Any]) -> bool:
    return bool(answer.mimetype == "text/event-stream")


CHAT_EXAMPLES: dict[str, tuple[Any, Expect]] = {
    "model": ("fake?chunks=2", Sent({"model": "fake?chunks=2"})),
    "messages": (
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is it?"},
                    {"type": "image_url", "image_url": {"url": IMAGE_URL, "detail": "low"}},
                ],
            }
        ],
        Sent(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is it?"},
                            {"type": "image_url", "image_url": {"url": IMAGE_URL, "detail": "low"}},
                        ],
                    }
                ]
            }
        ),
    ),
    "stream": (True, Check(_streamed)),
    "stream_options": (
        {"include_usage": True, "include_obfuscation": False},
        Check(
            lambda a, b: b'"usage":' in a.data and b["stream_options"] == {"include_usage": True}
        ),
    ),
    "max_tokens": (3, Sent({"max_tokens": 3})),
    "max_completion_tokens": (2, Sent({"max_tokens": 2})),
    "temperature": (0.5, Sent({"temperature": 0.5})),
    "top_p": (0.9, Sent({"top_p": 0.9})),
    "stop": (["\n"], Sent({"stop": ["\n"]})),
    "seed": (7, Sent({"seed": 7})),
    "presence_penalty": (0.1, Sent({"presence_penalty": 0.1})),
    "frequency_penalty": (0.2, Sent({"frequency_penalty": 0.2})),
    "logit_bias": ({"50256": -100}, Sent({"logit_bias": {"50256": -100}})),
    "logprobs": (True, Sent({"logprobs": True})),
    "top_logprobs": (2, Sent({"top_logprobs": 2})),
    "reasoning_effort": ("low", Sent({"reasoning_effort": "low"})),
    "verbosity": ("low", Sent({"verbosity": "low"})),
    "tools": ([TOOL], Sent({"tools": [TOOL]})),
    "tool_choice": ("none", Sent({"tool_choice": "none"})),
    "parallel_tool_calls": (False, Sent({"parallel_tool_calls": False})),
    "response_format": (
        {"type": "json_object"},
        Sent({"response_format": {"type": "json_object"}}),
    ),
    "n": (1, Dropped()),
    "modalities": (["text"], Dropped()),
    "store": (True, Dropped()),
    "metadata": ({"k": "v"}, Dropped()),
    "user": ("user-1", Dropped()),
    "safety_identifier": ("hashed-1", Dropped()),
    "service_tier": ("auto", Dropped()),
    "prompt_cache_key": ("k", Dropped()),
    "prompt_cache_options": ({"mode": "implicit"}, Dropped()),
    "prompt_cache_retention": ("24h", Dropped()),
    "prediction": ({"type": "content", "content": "tok0"}, Dropped()),
    "audio": ({"voice": "alloy", "format": "wav"}, Refused("unsupported_parameter")),
    "web_search_options": ({"search_context_size": "low"}, Refused("unsupported_parameter")),
    "moderation": ({"model": "omni-moderation-latest"}, Refused("unsupported_parameter")),
    "functions": ([{"name": "f", "parameters": {}}], Refused("unsupported_parameter")),
    "function_call": ("auto", Refused("unsupported_parameter")),
}

_PREVIOUS = "previous"  # stands for the id of a response the test makes first

RESPONSE_EXAMPLES: dict[str, tuple[Any, Expect]] = {
    "model": ("fake?chunks=2", Sent({"model": "fake?chunks=2"})),
    "input": (
        [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is it?"},
                    {"type": "input_image", "image_url": IMAGE_URL, "detail": "high"},
                ],
            }
        ],
        Sent(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is it?"},
                            {
                                "type": "image_url",
                                "image_url": {"url": IMAGE_URL, "detail": "high"},
                            },
                        ],
                    }
                ]
            }
        ),
    ),
    "instructions": (
        "Be brief.",
        Sent({"messages": [{"role": "system", "content": "Be brief."}, *HI]}),
    ),
    "previous_response_id": (
        _PREVIOUS,
        Sent({"messages": [*HI, {"role": "assistant", "content": "tok0 tok1 "}, *HI]}),
    ),
    "max_output_tokens": (3, Sent({"max_tokens": 3})),
    "stream": (True, Check(_streamed)),
    "background": (
        True,
        Check(lambda a, b: a.get_json()["status"] in ("queued", "in_progress", "completed")),
    ),
    "text": (
        {"format": {"type": "json_object"}, "verbosity": "low"},
        Sent({"response_format": {"type": "json_object"}, "verbosity": "low"}),
    ),
    "temperature": (0.5, Sent({"temperature": 0.5})),
    "top_p": (0.9, Sent({"top_p": 0.9})),
    "top_logprobs": (2, Sent({"logprobs": True, "top_logprobs": 2})),
    "reasoning": ({"effort": "low", "summary": "auto"}, Sent({"reasoning_effort": "low"})),
    "tools": (
        [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
        Sent({"tools": [TOOL]}),
    ),
    "tool_choice": (
        {"type": "function", "name": "get_weather"},
        Sent({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ),
    "parallel_tool_calls": (False, Sent({"parallel_tool_calls": False})),
    "include": (
        ["message.output_text.logprobs", "reasoning.encrypted_content"],
        Sent({"logprobs": True}),
    ),
    "truncation": ("auto", Dropped()),
    "store": (False, Dropped()),
    "metadata": ({"k": "v"}, Dropped()),
    "user": ("user-1", Dropped()),
    "safety_identifier": ("hashed-1", Dropped()),
    "service_tier": ("auto", Dropped()),
    "prompt_cache_key": ("k", Dropped()),
    "prompt_cache_options": ({"mode": "implicit"}, Dropped()),
    "prompt_cache_retention": ("24h", Dropped()),
    "max_tool_calls": (3, Dropped()),
    # What the upstream gets is stageserver's own, for the usage.
    "stream_options": (
        {"include_obfuscation": False},
        Sent({"stream_options": {"include_usage": True}}),
    ),
    "image": ({"context_compression": "auto"}, Dropped()),
    "access_programs": ({"cyber": "standard"}, Dropped()),
    "conversation": ("conv_1", Refused("unsupported_parameter")),
    "prompt": ({"id": "pmpt_1"}, Refused("unsupported_parameter")),
    "background_options": ({"completion_window": "2h"}, Refused("unsupported_parameter")),
    "context_management": ([{"type": "compaction"}], Refused("unsupported_parameter")),
    "moderation": ({"model": "omni-moderation-latest"}, Refused("unsupported_parameter")),
}

# Fields taken with one value and refused with another: the values refused.
REFUSED_VALUES: list[tuple[str, dict[str, Any], str, str]] = [
    ("/v1/chat/completions", {**CHAT, "n": 2}, "n", "unsupported_value"),
    (
        "/v1/chat/completions",
        {**CHAT, "modalities": ["text", "audio"]},
        "modalities[1]",
        "unsupported_value",
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "tools": [{"type": "custom", "custom": {"name": "x"}}]},
        "tools[0].type",
        "unsupported_value",
    ),
    (
        "/v1/responses",
        {**RESPONSE, "include": ["web_search_call.results"]},
        "include[0]",
        "unsupported_value",
    ),
    (
        "/v1/responses",
        {**RESPONSE, "tools": [{"type": "web_search"}]},
        "tools[0].type",
        "unsupported_value",
    ),
    (
        "/v1/responses",
        {**RESPONSE, "tools": [{"type": "file_search", "vector_store_ids": ["v"]}]},
        "tools[0].type",
        "unsupported_value",
    ),
    (
        "/v1/responses",
        {**RESPONSE, "input": [{"type": "item_reference", "id": "msg_1"}]},
        "input[0].type",
        "unsupported_value",
    ),
    (
        "/v1/responses",
        {
            **RESPONSE,
            "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}],
        },
        "input[0].content[0].type",
        "unsupported_value",
    ),
    (
        "/v1/responses",
        {
            **RESPONSE,
            "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}],
        },
        "input[0].content[0].file_id",
        "unsupported_parameter",
    ),
]


# A value of the wrong type, in a field that refuses some values: what is wrong with it.
WRONG_TYPES: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/chat/completions", {**CHAT, "n": "two"}, "n"),
    ("/v1/chat/completions", {**CHAT, "modalities": [{}]}, "modalities[0]"),
    ("/v1/chat/completions", {**CHAT, "tools": [7]}, "tools[0]"),
    ("/v1/responses", {**RESPONSE, "include": [{}]}, "include[0]"),
    ("/v1/responses", {**RESPONSE, "include": "reasoning.encrypted_content"}, "include"),
    ("/v1/responses", {**RESPONSE, "tools": [[]]}, "tools[0]"),
]


def test_every_row_has_an_example() -> None:
    assert set(CHAT_EXAMPLES) == {rule.name for rule in CHAT_FIELDS}
    assert set(RESPONSE_EXAMPLES) == {rule.name for rule in RESPONSES_FIELDS}


@pytest.fixture(scope="module")
def module_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def flask_client(module_upstream: FakeUpstream) -> Iterator[FlaskClient]:
    with app_client({"STAGESERVER_UPSTREAM_URL": module_upstream.url}) as test_client:
        yield test_client


def _check(
    client: FlaskClient,
    upstream: FakeUpstream,
    path: str,
    base: dict[str, Any],
    rule: FieldRule,
    value: Any,
    expect: Expect,
) -> None:
    upstream.reset()
    answer = client.post(path, json={**base, rule.name: value})
    if isinstance(expect, Refused):
        param = expect.param or rule.name
        assert answer.status_code == 400, answer.data
        error = answer.get_json()["error"]
        assert (error["param"], error["code"], error["type"]) == (
            param,
            expect.code,
            "invalid_request_error",
        )
        assert error["message"].startswith(f"{param}: ")
        assert upstream.requests == []
        return
    assert answer.status_code == 200, answer.data
    upstream.wait_for(
        lambda: len(upstream.requests) == 1 and upstream.requests[0].finished_at is not None
    )
    sent = upstream.requests[0].body
    if isinstance(expect, Sent):
        assert {name: sent.get(name) for name in expect.fields} == expect.fields
    elif isinstance(expect, Dropped):
        assert rule.name not in sent
    else:
        assert expect.check(answer, sent)


@pytest.mark.parametrize("rule", CHAT_FIELDS, ids=lambda rule: rule.name)
def test_a_chat_completions_field_does_what_its_row_says(
    flask_client: FlaskClient, module_upstream: FakeUpstream, rule: FieldRule
) -> None:
    value, expect = CHAT_EXAMPLES[rule.name]
    _check(flask_client, module_upstream, "/v1/chat/completions", CHAT, rule, value, expect)


@pytest.mark.parametrize("rule", RESPONSES_FIELDS, ids=lambda rule: rule.name)
def test_a_responses_field_does_what_its_row_says(
    flask_client: FlaskClient, module_upstream: FakeUpstream, rule: FieldRule
) -> None:
    value, expect = RESPONSE_EXAMPLES[rule.name]
    if value == _PREVIOUS:
        value = flask_client.post("/v1/responses", json=RESPONSE).get_json()["id"]
    _check(flask_client, module_upstream, "/v1/responses", RESPONSE, rule, value, expect)


@pytest.mark.parametrize(("path", "body", "param", "code"), REFUSED_VALUES)
def test_a_value_no_self_hosted_upstream_can_give_is_refused_by_name(
    flask_client: FlaskClient,
    module_upstream: FakeUpstream,
    path: str,
    body: dict[str, Any],
    param: str,
    code: str,
) -> None:
    module_upstream.reset()
    answer = flask_client.post(path, json=body)
    assert answer.status_code == 400
    error = answer.get_json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert error["message"].startswith(f"{param}: ")
    assert module_upstream.requests == []


@pytest.mark.parametrize(("path", "body", "param"), WRONG_TYPES)
def test_a_value_of_the_wrong_type_is_an_invalid_value_naming_it(
    flask_client: FlaskClient,
    module_upstream: FakeUpstream,
    path: str,
    body: dict[str, Any],
    param: str,
) -> None:
    module_upstream.reset()
    answer = flask_client.post(path, json=body)
    assert answer.status_code == 400
    error = answer.get_json()["error"]
    assert (error["param"], error["code"]) == (param, "invalid_value")
    assert module_upstream.requests == []
