"""What ``POST /v1/messages`` and ``POST /v1/messages/count_tokens`` accept, as the pydantic
models they validate with: the requests, their tools, tool choice, thinking and output.

Each field of the two requests is built into the stage, passed to the upstream, ignored,
or refused: ``fields.py`` says which, and why. Nested objects are strict, as Anthropic's
are: a field stageserver does not know there is refused, a block of a type it does not
take too. A refusal is a 400 ``invalid_request_error`` whose message starts with the path
of what is wrong, in Anthropic's notation (``messages.0.content.1.source.type: ...``).

The blocks a conversation holds are ``blocks.py``'s; the conversation becomes Chat
Completions' messages in ``conversation.py``; a refusal is worded in ``refusals.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
)

from ..errors import InvalidRequest
from ..fields import FieldRule, Ignored, Number, Strict, check_values
from ..stages.conversation import Conversation
from .blocks import Cache, MessageParam, TextBlock
from .conversation import chat_messages
from .fields import COUNT_TOKENS_RULES, MESSAGES_RULES
from .refusals import refusal

M = TypeVar("M", bound="MessagesBase")


class CustomTool(Strict):
    name: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    input_schema: dict[str, Any]
    description: StrictStr | None = None
    type: Literal["custom"] | None = None
    strict: StrictBool | None = None
    cache_control: Cache
    # Anthropic's tool search, examples and callers: every tool is in every prompt here.
    defer_loading: Ignored
    eager_input_streaming: Ignored
    input_examples: Ignored
    allowed_callers: Ignored


class ToolChoiceAuto(Strict):
    type: Literal["auto"]
    disable_parallel_tool_use: StrictBool | None = None


class ToolChoiceAny(Strict):
    type: Literal["any"]
    disable_parallel_tool_use: StrictBool | None = None


class ToolChoiceTool(Strict):
    type: Literal["tool"]
    name: Annotated[StrictStr, Field(min_length=1)]
    disable_parallel_tool_use: StrictBool | None = None


class ToolChoiceNone(Strict):
    type: Literal["none"]


ToolChoice = Annotated[
    ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")
]
Display = Literal["summarized", "omitted"]


class ThinkingEnabled(Strict):
    type: Literal["enabled"]
    budget_tokens: Annotated[StrictInt, Field(ge=1024)]
    display: Display | None = None
    #: The beta API's: how thinking binds to blocks, Anthropic's own business.
    block_binding: Ignored


class ThinkingDisabled(Strict):
    type: Literal["disabled"]


class ThinkingAdaptive(Strict):
    type: Literal["adaptive"]
    display: Display | None = None


class ThinkingBetweenTools(Strict):
    type: Literal["between_tools"]


Thinking = Annotated[
    ThinkingEnabled | ThinkingDisabled | ThinkingAdaptive | ThinkingBetweenTools,
    Field(discriminator="type"),
]
Effort = Literal["low", "medium", "high", "xhigh", "max"]


class JSONOutputFormat(Strict):
    type: Literal["json_schema"]
    schema_: Annotated[dict[str, Any], Field(alias="schema")]


class OutputConfig(Strict):
    effort: Effort | None = None
    format: JSONOutputFormat | None = None
    #: The beta API's task budget: the request's own max_tokens bounds the answer here.
    task_budget: Ignored


class Metadata(Strict):
    user_id: StrictStr | None = None


class Diagnostics(Strict):
    previous_message_id: StrictStr | None = None


#: ``reasoning_effort`` for each of Anthropic's efforts: OpenAI's API has three.
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


def effort_of_budget(budget: int) -> str:
    """``reasoning_effort`` for a thinking budget: under 4096 tokens ``low``, under 16384
    ``medium``, else ``high``."""
    return "low" if budget < 4096 else "medium" if budget < 16384 else "high"


# -- the requests --------------------------------------------------------------------------


class MessagesBase(BaseModel):
    """What both requests have: the conversation, and what is done with it."""

    RULES: ClassVar[Mapping[str, FieldRule]] = {}

    model: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    messages: Annotated[list[MessageParam], Field(min_length=1)]
    system: StrictStr | list[TextBlock] | None = None
    tools: list[CustomTool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    cache_control: Cache
    speed: Literal["standard", "fast"] | None = None
    user_profile_id: StrictStr | None = None
    workspace_id: StrictStr | None = None

    def chat_messages(self) -> list[tuple[dict[str, Any], str]]:
        """The conversation as Chat Completions' messages, each with where it comes
        from in the request (``system``, ``messages.3``)."""
        return chat_messages(self.system, self.messages)

    def chat_tools(self) -> list[dict[str, Any]] | None:
        """The tools as Chat Completions' function tools."""
        if self.tools is None:
            return None
        tools = []
        for tool in self.tools:
            function: dict[str, Any] = {"name": tool.name}
            if tool.description is not None:
                function["description"] = tool.description
            function["parameters"] = tool.input_schema
            if tool.strict is not None:
                function["strict"] = tool.strict
            tools.append({"type": "function", "function": function})
        return tools

    def check(self) -> None:
        """The rules no field's own type holds. Raises InvalidRequest."""

    def counted(self) -> Conversation:
        """What ``count_tokens`` counts: the messages, and the tools (``passed``)."""
        tools = self.chat_tools()
        return Conversation(
            messages=[message for message, _ in self.chat_messages()],
            model=self.model,
            passed={} if tools is None else {"tools": tools},
        )


class MessagesRequest(MessagesBase):
    """``POST /v1/messages``: its fields are ``MESSAGES_RULES``' (``fields.py``); any other
    is kept apart, for an upstream that takes it (``extra_fields``)."""

    model_config = ConfigDict(extra="allow")
    RULES = MESSAGES_RULES

    max_tokens: Annotated[StrictInt, Field(ge=1)]
    stream: StrictBool = False
    stop_sequences: list[StrictStr] | None = None
    temperature: Annotated[Number, Field(ge=0, le=1)] | None = None
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    inference_geo: StrictStr | None = None
    diagnostics: Diagnostics | None = None
    container: Any = None
    # The beta API's (BETA_FIELDS): taken and ignored, or refused by their rule.
    context_management: Ignored
    fallbacks: Ignored
    fallback_credit_token: Ignored
    billing_policy: Ignored
    compaction: Any = None
    mcp_servers: Any = None
    thread: Any = None

    def check(self) -> None:
        thinking = self.thinking
        if isinstance(thinking, ThinkingEnabled) and thinking.budget_tokens >= self.max_tokens:
            raise InvalidRequest(
                f"thinking.budget_tokens: must be less than max_tokens ({self.max_tokens}): "
                "thinking counts toward max_tokens",
                field="thinking.budget_tokens",
            )

    def extra_fields(self) -> dict[str, Any]:
        """The fields the Messages API lacks, as given, and ``top_k`` (vLLM's and
        llama.cpp's own field, which OpenAI's API lacks)."""
        extra = dict(self.model_extra or {})
        if self.top_k is not None:
            extra["top_k"] = self.top_k
        return extra

    def passed(self) -> dict[str, Any]:
        """Its fields as Chat Completions names them, for the upstream."""
        passed: dict[str, Any] = {
            name: getattr(self, name)
            for name in ("temperature", "top_p")
            if getattr(self, name) is not None
        }
        if self.stop_sequences:
            passed["stop"] = list(self.stop_sequences)
        tools = self.chat_tools()
        if tools is not None:
            passed["tools"] = tools
        choice = self.tool_choice
        if choice is not None:
            passed["tool_choice"] = _chat_tool_choice(choice)
            if not isinstance(choice, ToolChoiceNone) and choice.disable_parallel_tool_use:
                passed["parallel_tool_calls"] = False
        effort = self._effort()
        if effort is not None:
            passed["reasoning_effort"] = effort
        output_format = self.output_config.format if self.output_config is not None else None
        if output_format is not None:
            passed["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": output_format.schema_},
            }
        return passed

    def _effort(self) -> str | None:
        """``reasoning_effort``: ``output_config.effort``, else by the thinking budget."""
        config = self.output_config
        if config is not None and config.effort is not None:
            return EFFORTS[config.effort]
        if isinstance(self.thinking, ThinkingEnabled):
            return effort_of_budget(self.thinking.budget_tokens)
        return None

    def hints(self) -> dict[str, Any]:
        """What says ``thinking`` to an upstream whose chat template takes
        ``enable_thinking`` (Qwen3's, on vLLM and llama.cpp): sent where its
        ``extra_fields`` takes ``chat_template_kwargs``."""
        if self.thinking is None:
            return {}
        enabled = not isinstance(self.thinking, ThinkingDisabled)
        return {"chat_template_kwargs": {"enable_thinking": enabled}}

    def omits_thinking(self) -> bool:
        """Whether its thinking is to be shown as empty blocks (``display: omitted``)."""
        thinking = self.thinking
        return isinstance(thinking, ThinkingEnabled | ThinkingAdaptive) and (
            thinking.display == "omitted"
        )

    def params(self) -> dict[str, str]:
        """What the upstream's names of this request's fields stand for here, for an
        upstream's error that names one: its messages' (``messages[2]`` is
        ``messages.1``), and its other fields'."""
        params = {f"messages[{n}]": param for n, (_, param) in enumerate(self.chat_messages())}
        config = self.output_config
        params.update(
            stop="stop_sequences",
            tools="tools",
            tool_choice="tool_choice",
            parallel_tool_calls="tool_choice",
            response_format="output_config.format",
            reasoning_effort="output_config.effort"
            if config is not None and config.effort is not None
            else "thinking",
            max_tokens="max_tokens",
            chat_template_kwargs="thinking",
        )
        return params

    def conversation(self) -> Conversation:
        return Conversation(
            messages=[message for message, _ in self.chat_messages()],
            model=self.model,
            max_tokens=self.max_tokens,
            passed=self.passed(),
            extra=self.extra_fields(),
            hints=self.hints(),
        )


class CountTokensRequest(MessagesBase):
    """``POST /v1/messages/count_tokens``: ``COUNT_TOKENS_RULES``' fields, and no other."""

    model_config = ConfigDict(extra="forbid")
    RULES = COUNT_TOKENS_RULES


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, ToolChoiceAuto):
        return "auto"
    if isinstance(choice, ToolChoiceAny):
        return "required"
    if isinstance(choice, ToolChoiceTool):
        return {"type": "function", "function": {"name": choice.name}}
    return "none"


def validated(model: type[M], body: dict[str, Any]) -> M:
    """``body`` as ``model``, or the InvalidRequest (400) Anthropic would give: its message
    starts with the path of the first bad field as the request spells it
    (``messages.0.content.1.type``), then says what is wrong in pydantic's words, as
    Anthropic's do (``Field required``, ``Extra inputs are not permitted``)."""
    check_values(body, model.RULES)
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        raise refusal(exc, body) from None
    request.check()
    return request
