"""Every field of Anthropic's two Messages requests has a row in ``anthropic_api/fields.py``,
and does what its row says: the rows are held to the newest ``anthropic`` package's
request types (read in its own venv: a field a newer SDK adds fails here until it has a
row), every block a request may hold knows each field the SDK may send in it, and each
row's behaviour is checked on the wire, in what the upstream was sent."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient
from pydantic import BaseModel

from stageserver.anthropic_api import blocks
from stageserver.anthropic_api import requests as models
from stageserver.anthropic_api.fields import BETA_FIELDS, COUNT_TOKENS_FIELDS, MESSAGES_FIELDS
from stageserver.fields import Treatment
from testing.anthropic_sdk import AnthropicSDK
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
ASK = {"model": "fake?chunks=2", "max_tokens": 64, "messages": HI}
#: What clients still send that the newest SDK no longer names.
SAMPLING = {"temperature", "top_p", "top_k"}


# -- the rows, and the SDK's request types ---------------------------------------------------


def test_every_field_of_the_sdks_two_requests_has_a_row_and_no_other(
    anthropic_sdk: AnthropicSDK,
) -> None:
    sdk = anthropic_sdk.fields(
        "message_create_params.MessageCreateParamsBase",
        "message_count_tokens_params.MessageCountTokensParams",
    )
    messages = set(sdk["message_create_params.MessageCreateParamsBase"]) | {"stream"}
    assert {rule.name for rule in MESSAGES_FIELDS} == messages | SAMPLING
    counting = set(sdk["message_count_tokens_params.MessageCountTokensParams"])
    assert {rule.name for rule in COUNT_TOKENS_FIELDS} == counting


def test_every_field_only_the_beta_api_has_has_a_row(anthropic_sdk: AnthropicSDK) -> None:
    """``client.beta.messages.create`` sends these too (``betas`` goes in a header)."""
    beta = "beta.message_create_params.MessageCreateParamsBase"
    sdk = set(anthropic_sdk.fields(beta)[beta]) | {"stream"}
    assert {rule.name for rule in BETA_FIELDS} == sdk - {"betas"} - {
        rule.name for rule in MESSAGES_FIELDS
    }


def test_a_row_is_one_field_and_every_field_is_in_the_request_model() -> None:
    pairs: list[tuple[Any, type[BaseModel]]] = [
        ((*MESSAGES_FIELDS, *BETA_FIELDS), models.MessagesRequest),
        (COUNT_TOKENS_FIELDS, models.CountTokensRequest),
    ]
    for rules, model in pairs:
        names = [rule.name for rule in rules]
        assert len(names) == len(set(names))
        assert set(names) == {field.alias or name for name, field in model.model_fields.items()}
    for rule in (*MESSAGES_FIELDS, *BETA_FIELDS, *COUNT_TOKENS_FIELDS):
        assert rule.says
        if rule.treatment is Treatment.REFUSED:
            assert rule.refuse is not None, rule.name


# Each block stageserver takes knows every field the SDK may send in it: a client of a
# newer SDK is never refused for a field of a block it takes.
PARTS: list[tuple[str, type[BaseModel]]] = [
    ("TextBlockParam", blocks.TextBlock),
    ("ImageBlockParam", blocks.ImageBlock),
    ("Base64ImageSourceParam", blocks.ImageBase64),
    ("URLImageSourceParam", blocks.URLSource),
    ("FileImageSourceParam", blocks.FileSource),
    ("DocumentBlockParam", blocks.DocumentBlock),
    ("PlainTextSourceParam", blocks.PlainTextSource),
    ("ContentBlockSourceParam", blocks.ContentSource),
    ("Base64PDFSourceParam", blocks.PDFBase64),
    ("URLPDFSourceParam", blocks.URLSource),
    ("file_document_source_param.FileDocumentSourceParam", blocks.FileSource),
    ("ThinkingBlockParam", blocks.ThinkingBlock),
    ("RedactedThinkingBlockParam", blocks.RedactedThinkingBlock),
    ("ToolUseBlockParam", blocks.ToolUseBlock),
    ("ToolResultBlockParam", blocks.ToolResultBlock),
    ("UserMessageParam", blocks.MessageParam),
    ("AssistantMessageParam", blocks.MessageParam),
    ("system_message_param.SystemMessageParam", blocks.MessageParam),
    ("ToolParam", models.CustomTool),
    ("ToolChoiceAutoParam", models.ToolChoiceAuto),
    ("ToolChoiceAnyParam", models.ToolChoiceAny),
    ("ToolChoiceToolParam", models.ToolChoiceTool),
    ("ToolChoiceNoneParam", models.ToolChoiceNone),
    ("ThinkingConfigEnabledParam", models.ThinkingEnabled),
    ("ThinkingConfigDisabledParam", models.ThinkingDisabled),
    ("ThinkingConfigAdaptiveParam", models.ThinkingAdaptive),
    ("thinking_config_between_tools_param.ThinkingConfigBetweenToolsParam",
     models.ThinkingBetweenTools),
    ("OutputConfigParam", models.OutputConfig),
    ("JSONOutputFormatParam", models.JSONOutputFormat),
    ("MetadataParam", models.Metadata),
    ("CacheControlEphemeralParam", blocks.CacheControl),
    ("diagnostics_param.DiagnosticsParam", models.Diagnostics),
    # What the beta API's client (client.beta.messages) sends.
    ("beta.BetaTextBlockParam", blocks.TextBlock),
    ("beta.BetaImageBlockParam", blocks.ImageBlock),
    ("beta.BetaToolUseBlockParam", blocks.ToolUseBlock),
    ("beta.BetaToolResultBlockParam", blocks.ToolResultBlock),
    ("beta.BetaThinkingBlockParam", blocks.ThinkingBlock),
    ("beta.BetaRedactedThinkingBlockParam", blocks.RedactedThinkingBlock),
    ("beta.BetaToolParam", models.CustomTool),
    ("beta.BetaToolChoiceAutoParam", models.ToolChoiceAuto),
    ("beta.BetaThinkingConfigEnabledParam", models.ThinkingEnabled),
    ("beta.BetaOutputConfigParam", models.OutputConfig),
    ("beta.BetaMetadataParam", models.Metadata),
    ("beta.BetaCacheControlEphemeralParam", blocks.CacheControl),
]  # fmt: skip


def test_a_block_it_takes_knows_every_field_the_sdk_sends(anthropic_sdk: AnthropicSDK) -> None:
    sdk = anthropic_sdk.fields(*(name for name, _ in PARTS))
    for name, model in PARTS:
        known = {field.alias or key for key, field in model.model_fields.items()}
        assert set(sdk[name]) <= known, (name, set(sdk[name]) - known)


def test_the_docs_tables_have_a_row_per_field() -> None:
    for rules in (MESSAGES_FIELDS, BETA_FIELDS, COUNT_TOKENS_FIELDS):
        assert_docs_table_has_a_row_per_field(rules)


# -- each row's behaviour ------------------------------------------------------------------------


TOOL = {"name": "get_weather", "input_schema": {"type": "object"}}
FUNCTION = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object"}},
}

EXAMPLES: dict[str, tuple[Any, Expect]] = {
    "model": ("fake?chunks=3", Sent({"model": "fake?chunks=3"})),
    "messages": (
        [{"role": "user", "content": [{"type": "text", "text": "What?"}]}],
        Sent({"messages": [{"role": "user", "content": "What?"}]}),
    ),
    "max_tokens": (3, Sent({"max_tokens": 3})),
    "stream": (True, Check(lambda a, b: bool(a.mimetype == "text/event-stream"))),
    "system": ("Be brief.", Sent({"messages": [{"role": "system", "content": "Be brief."}, *HI]})),
    "stop_sequences": (["\n\n"], Sent({"stop": ["\n\n"]})),
    "temperature": (0.5, Sent({"temperature": 0.5})),
    "top_p": (0.9, Sent({"top_p": 0.9})),
    # The fake's kind (openai) takes no top_k: refused, as any field it does not take.
    "top_k": (5, Refused(says="top_k: is not supported by this server")),
    "tools": ([TOOL], Sent({"tools": [FUNCTION]})),
    "tool_choice": ({"type": "any"}, Sent({"tool_choice": "required"})),
    "thinking": ({"type": "enabled", "budget_tokens": 1024}, Sent({"reasoning_effort": "low"})),
    "output_config": ({"effort": "medium"}, Sent({"reasoning_effort": "medium"})),
    "metadata": ({"user_id": "u-1"}, Dropped()),
    "cache_control": ({"type": "ephemeral"}, Dropped()),
    "service_tier": ("auto", Dropped()),
    "speed": ("fast", Dropped()),
    "inference_geo": ("eu", Dropped()),
    "diagnostics": ({"previous_message_id": "msg_1"}, Dropped()),
    "user_profile_id": ("up_1", Dropped()),
    "workspace_id": ("wrkspc_1", Dropped()),
    "container": ("container_1", Refused(says="container: ")),
    "context_management": ({"edits": [{"type": "clear_tool_uses_20250919"}]}, Dropped()),
    "fallbacks": (["default"], Dropped()),
    "fallback_credit_token": ("fct_1", Dropped()),
    "billing_policy": ({"type": "billing_policy", "bill_to": "self"}, Dropped()),
    "compaction": ({"type": "enabled"}, Refused(says="compaction: ")),
    "mcp_servers": ([{"type": "url", "url": "https://mcp.example", "name": "x"}],
                    Refused(says="mcp_servers: ")),
    "thread": ({"type": "create"}, Refused(says="thread: ")),
}  # fmt: skip


@pytest.fixture
def flask_client(upstream: FakeUpstream) -> Iterator[FlaskClient]:
    with app_client({"STAGESERVER_UPSTREAM_URL": upstream.url}) as test_client:
        yield test_client


def test_every_row_has_an_example() -> None:
    assert set(EXAMPLES) == {rule.name for rule in (*MESSAGES_FIELDS, *BETA_FIELDS)}


@pytest.mark.parametrize("name", [rule.name for rule in (*MESSAGES_FIELDS, *BETA_FIELDS)])
def test_each_field_does_what_its_row_says(
    flask_client: FlaskClient, upstream: FakeUpstream, name: str
) -> None:
    value, expect = EXAMPLES[name]
    body = {**ASK, name: value}
    if name == "thinking":
        body["max_tokens"] = 2048
    answer = flask_client.post("/v1/messages", json=body)
    chats = [r for r in upstream.requests if r.path.endswith("/chat/completions")]
    if isinstance(expect, Refused):
        assert answer.status_code == 400
        assert answer.get_json()["error"]["message"].startswith(expect.says)
        assert chats == []
        return
    assert answer.status_code == 200, answer.get_json()
    [request] = chats
    sent = request.body
    if isinstance(expect, Sent):
        assert {k: sent.get(k) for k in expect.fields} == expect.fields
    elif isinstance(expect, Dropped):
        assert set(sent) == {"model", "messages", "max_tokens", "stream", "stream_options"}
    else:
        assert expect.check(answer, sent)


def test_count_tokens_takes_every_field_of_its_row(flask_client: FlaskClient) -> None:
    body = {
        "model": "fake",
        "messages": HI,
        "system": "Be brief.",
        "tools": [TOOL],
        "tool_choice": {"type": "auto"},
        "thinking": {"type": "adaptive"},
        "output_config": {"effort": "low"},
        "cache_control": {"type": "ephemeral"},
        "speed": "standard",
        "user_profile_id": "up_1",
        "workspace_id": "wrkspc_1",
    }
    assert set(body) == {rule.name for rule in COUNT_TOKENS_FIELDS}
    answer = flask_client.post("/v1/messages/count_tokens", json=body)
    assert answer.status_code == 200
    without = flask_client.post(
        "/v1/messages/count_tokens", json={"model": "fake", "messages": HI, "system": "Be brief."}
    )
    assert answer.get_json()["input_tokens"] > without.get_json()["input_tokens"]
