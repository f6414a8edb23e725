"""Every field of Anthropic's two Messages requests, and what stageserver does with it.

The rule, for each field of the ``anthropic`` package's ``MessageCreateParams`` and
``MessageCountTokensParams`` (``tests/test_anthropic_fields.py`` holds the tables below to
the newest SDK's types, and tests each row's behaviour; the docs' tables are made from
them), and for ``temperature``, ``top_p`` and ``top_k``, which that SDK no longer names
but clients still send:

- **built**: what the stage is: its conversation, its token limit, its mode;
- **passed**: sent to the upstream, as Chat Completions names it (``stop_sequences`` is
  ``stop``, ``thinking`` is ``reasoning_effort`` and Qwen3's ``enable_thinking``);
- **ignored**: taken, and it changes nothing here (no prompt cache, one speed, one tier);
- **refused**: it asks for what runs on Anthropic's side only (its code-execution
  containers, its server tools): a 400 ``invalid_request_error`` whose message starts
  with the field's path, as Anthropic's do (``tools.0.type: ...``). Some fields are taken
  with one value and refused with another.

A field the tables do not name is no field of the Messages API: refused as Anthropic
refuses it (``<name>: Extra inputs are not permitted`` for one nested in an object),
unless, at the top of a create request, the upstream the request goes to takes it (its
``extra_fields``: ``config.EXTRA_FIELDS``), as the OpenAI dialects pass vLLM's
``min_p``. ``top_k`` is such a field: sent where the upstream takes it, else refused.

The table machinery (``FieldRule``, ``check_values``, the docs' ``markdown_table``) is
``stageserver/fields.py``, shared with ``openai_api/fields.py``; what a refusal says, and
how it names a path, is this package's own.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequest
from ..fields import MODEL, NO_CACHE, SAMPLING, FieldRule, Treatment, by_name, unsupported


def custom_tools_only(name: str, value: Any) -> InvalidRequest | None:
    """Of a list of tools, the first that is one of Anthropic's own (its ``type`` is not
    ``custom``) is refused, naming its ``type``."""
    if not isinstance(value, list):
        return None
    for index, tool in enumerate(value):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind != "custom":
            param = f"{name}.{index}.type"
            return InvalidRequest(
                f"{param}: {kind!r} is one of Anthropic's own tools, which run on its side "
                "or are built into Claude; this server runs custom tools (a name and an "
                "input_schema), as function tools of the upstream",
                field=param,
                code="unsupported_value",
            )
    return None


_WHO = "a header of the SDK's; stageserver's keys say who calls"

MESSAGES_FIELDS: tuple[FieldRule, ...] = (
    MODEL,
    FieldRule(
        "messages",
        Treatment.BUILT,
        "the conversation: text, `image` (base64 and URL), `document` (text), `tool_use` "
        "and `tool_result` blocks; earlier `thinking` blocks are dropped; consecutive "
        "turns of one role are one turn",
    ),
    FieldRule(
        "max_tokens",
        Treatment.BUILT,
        "the answer's token limit; required, 1 or more (no prompt cache to warm with 0)",
    ),
    FieldRule("stream", Treatment.BUILT, "streams the answer as the Messages API's events"),
    FieldRule("system", Treatment.BUILT, "a system message first (a string, or text blocks)"),
    FieldRule(
        "stop_sequences",
        Treatment.PASSED,
        "as `stop`; `stop_reason: stop_sequence` where the upstream says which one stopped "
        "it (vLLM's `stop_reason`), else `end_turn`",
    ),
    *SAMPLING,
    FieldRule(
        "top_k",
        Treatment.PASSED,
        "sampling, to an upstream whose `extra_fields` takes it (vLLM's and llama.cpp's "
        "do); refused elsewhere",
    ),
    FieldRule(
        "tools",
        Treatment.PASSED,
        "custom tools, as function tools; Anthropic's own (server and built-in) tools are refused",
        custom_tools_only,
    ),
    FieldRule(
        "tool_choice",
        Treatment.PASSED,
        "`auto`, `any`, `tool`, `none` as `auto`, `required`, the function, `none`; "
        "`disable_parallel_tool_use` as `parallel_tool_calls: false`",
    ),
    FieldRule(
        "thinking",
        Treatment.PASSED,
        "`enabled` as `reasoning_effort` by its budget, and `enable_thinking` where the "
        "upstream takes `chat_template_kwargs`; `disabled` as `enable_thinking: false` "
        "there; `adaptive` and `between_tools` as `enable_thinking` alone",
    ),
    FieldRule(
        "output_config",
        Treatment.PASSED,
        "`effort` as `reasoning_effort`; `format` (a JSON schema) as `response_format`",
    ),
    FieldRule("metadata", Treatment.IGNORED, "`user_id` is not kept"),
    FieldRule("cache_control", Treatment.IGNORED, NO_CACHE),
    FieldRule("service_tier", Treatment.IGNORED, "there is one tier"),
    FieldRule("speed", Treatment.IGNORED, "there is one speed: the upstream's"),
    FieldRule("inference_geo", Treatment.IGNORED, "the upstream runs where it runs"),
    FieldRule("diagnostics", Treatment.IGNORED, "no prompt cache to diagnose"),
    FieldRule("user_profile_id", Treatment.IGNORED, _WHO),
    FieldRule("workspace_id", Treatment.IGNORED, _WHO),
    FieldRule(
        "container",
        Treatment.REFUSED,
        "Anthropic's code-execution containers",
        unsupported("Anthropic's code-execution containers do not run here"),
    ),
)

COUNT_TOKENS_FIELDS: tuple[FieldRule, ...] = (
    FieldRule(
        "model",
        Treatment.BUILT,
        "picks the upstream, whose tokenizer counts (vLLM's and llama.cpp's `/tokenize`)",
    ),
    FieldRule("messages", Treatment.BUILT, "counted as `POST /v1/messages` would send them"),
    FieldRule("system", Treatment.BUILT, "counted, a system message first"),
    FieldRule("tools", Treatment.BUILT, "counted, as function tools", custom_tools_only),
    FieldRule("tool_choice", Treatment.IGNORED, "changes no prompt here"),
    FieldRule("thinking", Treatment.IGNORED, "changes no count here"),
    FieldRule("output_config", Treatment.IGNORED, "changes no count here"),
    FieldRule("cache_control", Treatment.IGNORED, NO_CACHE),
    FieldRule("speed", Treatment.IGNORED, "there is one speed: the upstream's"),
    FieldRule("user_profile_id", Treatment.IGNORED, _WHO),
    FieldRule("workspace_id", Treatment.IGNORED, _WHO),
)

#: The fields only the beta Messages API has (``client.beta.messages``, which posts to
#: ``/v1/messages?beta=true`` with the ``anthropic-beta`` names in a header): taken too,
#: since the clients built on the SDKs (Claude Code) call that one.
BETA_FIELDS: tuple[FieldRule, ...] = (
    FieldRule(
        "context_management",
        Treatment.IGNORED,
        "no tool results are cleared on the server: the conversation goes as sent",
    ),
    FieldRule("fallbacks", Treatment.IGNORED, "the operator's fallbacks are the upstreams'"),
    FieldRule("fallback_credit_token", Treatment.IGNORED, "there is no credit to redeem"),
    FieldRule("billing_policy", Treatment.IGNORED, "stageserver's keys say who calls"),
    FieldRule(
        "compaction",
        Treatment.REFUSED,
        "Anthropic's compaction requests",
        unsupported(
            "compaction is Anthropic's; no conversation is compacted here: send the "
            "messages, summarized as you see fit"
        ),
    ),
    FieldRule(
        "mcp_servers",
        Treatment.REFUSED,
        "MCP servers that Anthropic calls",
        unsupported("Anthropic's MCP connector does not run here: call MCP tools as custom tools"),
    ),
    FieldRule(
        "thread",
        Treatment.REFUSED,
        "conversation state held on Anthropic's side",
        unsupported("no conversation state is held here: send the whole conversation"),
    ),
)

MESSAGES_RULES = by_name(MESSAGES_FIELDS, BETA_FIELDS)
COUNT_TOKENS_RULES = by_name(COUNT_TOKENS_FIELDS)
