"""Every field of OpenAI's two create requests, and what stageserver does with it.

The rule, for each field of the ``openai`` package's ``ChatCompletion`` and ``Response``
create params (``tests/test_openai_fields.py`` holds the tables below to those types, and
tests each row's behaviour; the docs' tables are made from them):

- **built**: what the stage is: its conversation, its token limit, its mode;
- **passed**: sent to the upstream, which can honour it (as Chat Completions names it,
  where Responses names it otherwise: ``reasoning.effort`` is ``reasoning_effort``);
- **ignored**: taken, and it changes nothing here (no prompt cache, no billing tier);
- **refused**: it asks for what no self-hosted upstream can give (OpenAI's hosted tools,
  its stored conversations and prompts, audio output, ``n`` > 1): a 400 whose ``param``
  names it. Some fields are taken with one value and refused with another.

A field the tables do not name is no field of OpenAI's API: refused, as OpenAI refuses
it, unless the upstream the request goes to takes it (its ``extra_fields``:
``config.EXTRA_FIELDS``), which vLLM's ``top_k`` or llama.cpp's ``grammar`` are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..errors import InvalidRequest
from ..fields import (
    MODEL,
    NO_CACHE,
    SAMPLING,
    FieldRule,
    Refuse,
    Treatment,
    by_name,
    refused_unless,
    unsupported,
)


def _unsupported(why: str) -> Refuse:
    """Any value but null, ``[]`` and ``{}`` is refused, with ``why``."""
    return unsupported(why, empty_taken=True)


def only(taken: Callable[[Any], bool], why: str) -> Refuse:
    """A value that ``taken`` does not hold is refused, with ``why``."""
    return refused_unless(taken, why, "unsupported_value")


def each(taken: Callable[[Any], bool], why: Callable[[Any], str]) -> Refuse:
    """Of a list, the first item that ``taken`` does not hold is refused, named by its
    index, with ``why(item)``; anything but a list is left to the request's model."""

    def refuse(name: str, value: Any) -> InvalidRequest | None:
        if not isinstance(value, list):
            return None
        for index, item in enumerate(value):
            if not taken(item):
                param = f"{name}[{index}]"
                return InvalidRequest(
                    f"{param}: {why(item)}", field=param, code="unsupported_value"
                )
        return None

    return refuse


def tools_refused(kinds: Mapping[str, str]) -> Refuse:
    """Of a list of tools, the first whose ``type`` is one of ``kinds`` (OpenAI's hosted
    tools, each with its name in words) is refused, naming its ``type``."""

    def refuse(name: str, value: Any) -> InvalidRequest | None:
        if not isinstance(value, list):
            return None
        for index, tool in enumerate(value):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if isinstance(kind, str) and kind in kinds:
                param = f"{name}[{index}].type"
                return InvalidRequest(
                    f"{param}: {kind!r} is {kinds[kind]}, which OpenAI runs on its side and no "
                    "self-hosted upstream can; function tools run here",
                    field=param,
                    code="unsupported_value",
                )
        return None

    return refuse


#: OpenAI's hosted tools, as a Responses request names them.
HOSTED_TOOLS = {
    "web_search": "OpenAI's web search",
    "web_search_preview": "OpenAI's web search",
    "web_search_2025_08_26": "OpenAI's web search",
    "web_search_preview_2025_03_11": "OpenAI's web search",
    "file_search": "OpenAI's file search",
    "code_interpreter": "OpenAI's code interpreter",
    "computer": "OpenAI's computer use",
    "computer_use": "OpenAI's computer use",
    "computer_use_preview": "OpenAI's computer use",
    "image_generation": "OpenAI's image generation",
    "mcp": "an MCP server that OpenAI calls",
    "local_shell": "OpenAI's local shell tool",
    "shell": "OpenAI's shell tool",
    "apply_patch": "OpenAI's apply-patch tool",
    "custom": "a custom (free-form grammar) tool",
    "tool_search": "OpenAI's tool search",
}
#: ``include`` values that change nothing here, and the one that asks for logprobs.
LOGPROBS_INCLUDE = "message.output_text.logprobs"
INCLUDES_TAKEN = frozenset(
    {LOGPROBS_INCLUDE, "reasoning.encrypted_content", "message.input_image.image_url"}
)

# A value of the wrong type is left to the request's model, which says what is wrong.
_ONE_CHOICE = only(
    lambda n: not isinstance(n, int) or n == 1, "must be 1: this server makes one choice"
)
_TEXT_ONLY = each(
    lambda m: not isinstance(m, str) or m == "text",
    lambda m: f"{m!r}: this server answers in text only (no audio output)",
)
_HOSTED_INCLUDE = each(
    lambda i: not isinstance(i, str) or i in INCLUDES_TAKEN,
    lambda i: f"{i!r} asks for the output of one of OpenAI's hosted tools, which do not run here",
)

CHAT_FIELDS: tuple[FieldRule, ...] = (
    MODEL,
    FieldRule(
        "messages",
        Treatment.BUILT,
        "the conversation: text, `image_url` and `input_audio` parts, tool calls and results",
    ),
    FieldRule("stream", Treatment.BUILT, "streams the answer as `chat.completion.chunk` events"),
    FieldRule(
        "stream_options",
        Treatment.BUILT,
        "`include_usage` adds the usage chunk; `include_obfuscation` is ignored",
    ),
    FieldRule(
        "max_tokens",
        Treatment.BUILT,
        "the answer's token limit (`STAGESERVER_DEFAULT_MAX_TOKENS` when neither is given)",
    ),
    FieldRule(
        "max_completion_tokens", Treatment.BUILT, "the answer's token limit; wins over `max_tokens`"
    ),
    *SAMPLING,
    FieldRule("stop", Treatment.PASSED, "stop sequences"),
    FieldRule("seed", Treatment.PASSED, "sampling"),
    FieldRule("presence_penalty", Treatment.PASSED, "sampling"),
    FieldRule("frequency_penalty", Treatment.PASSED, "sampling"),
    FieldRule("logit_bias", Treatment.PASSED, "sampling"),
    FieldRule(
        "logprobs",
        Treatment.PASSED,
        "the tokens' logprobs, in each chunk's `choices[].logprobs` and the whole answer's",
    ),
    FieldRule("top_logprobs", Treatment.PASSED, "alternatives per token, with `logprobs`"),
    FieldRule("reasoning_effort", Treatment.PASSED, "a reasoning model's effort"),
    FieldRule("verbosity", Treatment.PASSED, "the answer's length, where the model takes it"),
    FieldRule(
        "tools",
        Treatment.PASSED,
        "function tools; a custom (grammar) tool is refused",
        tools_refused({"custom": HOSTED_TOOLS["custom"]}),
    ),
    FieldRule("tool_choice", Treatment.PASSED, "as given"),
    FieldRule("parallel_tool_calls", Treatment.PASSED, "as given"),
    FieldRule("response_format", Treatment.PASSED, "`text`, `json_object` or `json_schema`"),
    FieldRule(
        "n", Treatment.IGNORED, "1 is taken; more is refused: one choice is made", _ONE_CHOICE
    ),
    FieldRule(
        "modalities", Treatment.IGNORED, '`["text"]` is taken; `audio` is refused', _TEXT_ONLY
    ),
    FieldRule("store", Treatment.IGNORED, "nothing is stored for OpenAI's evals or distillation"),
    FieldRule("metadata", Treatment.IGNORED, "not kept"),
    FieldRule("user", Treatment.IGNORED, "stageserver's keys say who calls"),
    FieldRule("safety_identifier", Treatment.IGNORED, "stageserver's keys say who calls"),
    FieldRule("service_tier", Treatment.IGNORED, "there is one tier"),
    FieldRule("prompt_cache_key", Treatment.IGNORED, NO_CACHE),
    FieldRule("prompt_cache_options", Treatment.IGNORED, NO_CACHE),
    FieldRule("prompt_cache_retention", Treatment.IGNORED, NO_CACHE),
    FieldRule("prediction", Treatment.IGNORED, "a speed hint; the answer is the same without it"),
    FieldRule(
        "audio",
        Treatment.REFUSED,
        "audio output",
        _unsupported("this server answers in text only (no audio output)"),
    ),
    FieldRule(
        "web_search_options",
        Treatment.REFUSED,
        "OpenAI's hosted web search",
        _unsupported("is OpenAI's hosted web search, which no self-hosted upstream runs"),
    ),
    FieldRule(
        "moderation",
        Treatment.REFUSED,
        "OpenAI's moderation models",
        _unsupported("OpenAI's moderation does not run here"),
    ),
    FieldRule(
        "functions",
        Treatment.REFUSED,
        "deprecated by OpenAI: send `tools`",
        _unsupported("is deprecated: send tools (type function) instead"),
    ),
    FieldRule(
        "function_call",
        Treatment.REFUSED,
        "deprecated by OpenAI: send `tool_choice`",
        _unsupported("is deprecated: send tool_choice instead"),
    ),
)

RESPONSES_FIELDS: tuple[FieldRule, ...] = (
    MODEL,
    FieldRule(
        "input",
        Treatment.BUILT,
        "the conversation: text, `input_image`, function calls and their outputs "
        "(earlier `reasoning` items are dropped)",
    ),
    FieldRule("instructions", Treatment.BUILT, "a system message first"),
    FieldRule(
        "previous_response_id",
        Treatment.BUILT,
        "the conversation of a response of the caller's, with its answer, before `input`",
    ),
    FieldRule("max_output_tokens", Treatment.BUILT, "the answer's token limit"),
    FieldRule("stream", Treatment.BUILT, "streams the response's events"),
    FieldRule(
        "background", Treatment.BUILT, "runs it with nobody attached; resumable with `stream`"
    ),
    FieldRule("text", Treatment.BUILT, "`format` becomes `response_format`; `verbosity` is passed"),
    *SAMPLING,
    FieldRule(
        "top_logprobs",
        Treatment.PASSED,
        "alternatives per token (with `logprobs`, which it asks for when above 0)",
    ),
    FieldRule(
        "reasoning",
        Treatment.PASSED,
        "`effort` as `reasoning_effort`; `summary` is ignored: the reasoning comes "
        "as `reasoning_text`",
    ),
    FieldRule(
        "tools",
        Treatment.PASSED,
        "function tools; OpenAI's hosted tools are refused",
        tools_refused(HOSTED_TOOLS),
    ),
    FieldRule("tool_choice", Treatment.PASSED, "as Chat Completions names it"),
    FieldRule("parallel_tool_calls", Treatment.PASSED, "as given"),
    FieldRule(
        "include",
        Treatment.PASSED,
        f"`{LOGPROBS_INCLUDE}` asks for logprobs; `reasoning.encrypted_content` and "
        "`message.input_image.image_url` are ignored; hosted tools' outputs are refused",
        _HOSTED_INCLUDE,
    ),
    FieldRule(
        "truncation",
        Treatment.IGNORED,
        'nothing is dropped from a conversation: with `"auto"`, one larger than the '
        "model's context gets the upstream's error, as with `\"disabled\"`",
    ),
    FieldRule(
        "store",
        Treatment.IGNORED,
        "a response is kept for its API anyway (at least 10 minutes), and echoed",
    ),
    FieldRule("metadata", Treatment.IGNORED, "echoed"),
    FieldRule("user", Treatment.IGNORED, "echoed"),
    FieldRule("safety_identifier", Treatment.IGNORED, "echoed"),
    FieldRule("service_tier", Treatment.IGNORED, "echoed"),
    FieldRule("prompt_cache_key", Treatment.IGNORED, NO_CACHE),
    FieldRule("prompt_cache_options", Treatment.IGNORED, NO_CACHE),
    FieldRule("prompt_cache_retention", Treatment.IGNORED, NO_CACHE),
    FieldRule(
        "max_tool_calls", Treatment.IGNORED, "bounds hosted tools' calls, and none runs here"
    ),
    FieldRule(
        "stream_options", Treatment.IGNORED, "`include_obfuscation`: no obfuscation is added"
    ),
    FieldRule("image", Treatment.IGNORED, "an image-context hint"),
    FieldRule("access_programs", Treatment.IGNORED, "OpenAI's access programs do not apply here"),
    FieldRule(
        "conversation",
        Treatment.REFUSED,
        "OpenAI's stored conversations: use `previous_response_id`",
        _unsupported(
            "OpenAI's stored conversations are not kept here: send previous_response_id, "
            "or the input items"
        ),
    ),
    FieldRule(
        "prompt",
        Treatment.REFUSED,
        "OpenAI's stored prompt templates",
        _unsupported(
            "OpenAI's stored prompt templates are not kept here: send instructions and input"
        ),
    ),
    FieldRule(
        "background_options",
        Treatment.REFUSED,
        "OpenAI's batch completion windows",
        _unsupported("completion windows are OpenAI's; a background response here runs at once"),
    ),
    FieldRule(
        "context_management",
        Treatment.REFUSED,
        "OpenAI's compaction",
        _unsupported("compaction is OpenAI's; no conversation is compacted here"),
    ),
    FieldRule(
        "moderation",
        Treatment.REFUSED,
        "OpenAI's moderation models",
        _unsupported("OpenAI's moderation does not run here"),
    ),
)

CHAT_RULES = by_name(CHAT_FIELDS)
RESPONSES_RULES = by_name(RESPONSES_FIELDS)
