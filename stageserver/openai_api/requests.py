"""What ``/v1/chat/completions`` and ``/v1/responses`` accept, as the pydantic models they
validate with, and the conversation each becomes.

Each field of OpenAI's create requests is built into the stage, passed to the upstream,
ignored, or refused: ``fields.py`` says which, and why. A field OpenAI's API lacks is
kept apart (``extra_fields()``): the manager refuses it unless the upstream the request
goes to takes it. Nested objects are strict, as OpenAI is: a field stageserver does not
know there is refused, a content part or item of a type it does not take too.

A refusal is a 400 in OpenAI's words: ``param`` names the request's own parameter as
OpenAI does (``messages[0].content[1].image_url``, ``input[2].content[0]``), ``code`` is
``unsupported_parameter`` for a field it does not take, ``unsupported_value`` for a value
or a type it does not take, and ``invalid_value`` for a value that is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
)

from ..errors import InvalidRequest
from ..fields import FieldRule, Ignored, Number, Strict, Treatment, check_values
from ..stages.conversation import Conversation
from .fields import CHAT_RULES, LOGPROBS_INCLUDE, RESPONSES_RULES

M = TypeVar("M", bound="OpenAIRequest")


class OpenAIRequest(BaseModel):
    """A create request: its fields are ``RULES``' (``fields.py``); any other is kept
    apart, for an upstream that takes it (``extra_fields``)."""

    model_config = ConfigDict(extra="allow")
    RULES: ClassVar[Mapping[str, FieldRule]] = {}

    def extra_fields(self) -> dict[str, Any]:
        """The fields OpenAI's API lacks, as given."""
        return dict(self.model_extra or {})


# -- Chat Completions -----------------------------------------------------------------------


class TextPart(Strict):
    type: Literal["text"]
    text: StrictStr
    prompt_cache_breakpoint: Ignored


class ImageURL(Strict):
    #: An http(s) URL, which the upstream fetches under its own rules (stageserver does
    #: not), or a ``data:`` URI.
    url: Annotated[StrictStr, Field(min_length=1)]
    detail: StrictStr | None = None


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL
    prompt_cache_breakpoint: Ignored


class InputAudio(Strict):
    data: StrictStr
    format: StrictStr


class AudioPart(Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio
    prompt_cache_breakpoint: Ignored


class RefusalPart(Strict):
    type: Literal["refusal"]
    refusal: StrictStr


ContentPart = Annotated[TextPart | ImagePart | AudioPart | RefusalPart, Field(discriminator="type")]


class FunctionCall(Strict):
    name: StrictStr
    arguments: StrictStr


class ToolCall(Strict):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None
    refusal: StrictStr | None = None
    #: What a reasoning model said before an earlier answer, as some clients send it
    #: back: no template reads it again.
    reasoning_content: Ignored
    #: An assistant's earlier audio answer, and the deprecated function call: refused.
    audio: None = None
    function_call: None = None


class FunctionDefinition(Strict):
    name: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class FunctionTool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class StreamOptions(Strict):
    include_usage: StrictBool = False
    include_obfuscation: Ignored


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


Stop = StrictStr | list[StrictStr] | None
Probability = Annotated[Number, Field(ge=0, le=1)]
Penalty = Annotated[Number, Field(ge=-2, le=2)]


class ChatCompletionRequest(OpenAIRequest):
    """``POST /v1/chat/completions``."""

    RULES = CHAT_RULES

    model: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Probability | None = None
    stop: Stop = None
    seed: StrictInt | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[Number, Field(ge=-100, le=100)]] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    reasoning_effort: StrictStr | None = None
    verbosity: StrictStr | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None
    n: StrictInt | None = None
    modalities: list[StrictStr] | None = None
    store: StrictBool | None = None
    metadata: dict[str, StrictStr] | None = None
    user: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    service_tier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: StrictStr | None = None
    prediction: dict[str, Any] | None = None
    audio: Any = None
    web_search_options: Any = None
    moderation: Any = None
    functions: Any = None
    function_call: Any = None

    def passed(self) -> dict[str, Any]:
        """The given fields that ``RULES`` passes to the upstream, as they are."""
        passed = {
            name: getattr(self, name)
            for name, rule in self.RULES.items()
            if rule.treatment is Treatment.PASSED and getattr(self, name) is not None
        }
        if self.tools is not None:
            passed["tools"] = [tool.model_dump(exclude_unset=True) for tool in self.tools]
        if self.response_format is not None:
            passed["response_format"] = self.response_format.model_dump(exclude_unset=True)
        return passed

    def conversation(self) -> Conversation:
        return Conversation(
            # As given: an explicit null stays.
            messages=[m.model_dump(exclude_unset=True) for m in self.messages],
            model=self.model,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            passed=self.passed(),
            extra=self.extra_fields(),
        )


# -- Responses ------------------------------------------------------------------------------


class _Item(Strict):
    """What every input item may carry back from an earlier Response; nothing uses it."""

    id: StrictStr | None = None
    status: StrictStr | None = None


class InputText(Strict):
    type: Literal["input_text", "output_text", "text"]
    text: StrictStr
    annotations: Ignored
    logprobs: Ignored
    prompt_cache_breakpoint: Ignored


class InputImage(Strict):
    type: Literal["input_image"]
    image_url: Annotated[StrictStr, Field(min_length=1)]
    detail: StrictStr | None = None
    #: An image uploaded to OpenAI's Files API: none is kept here.
    file_id: None = None
    prompt_cache_breakpoint: Ignored


class OutputRefusal(Strict):
    type: Literal["refusal"]
    refusal: StrictStr


InputContent = Annotated[
    InputText | InputImage | OutputRefusal,
    Field(discriminator="type"),
]


class InputMessage(_Item):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[InputContent]
    phase: Ignored


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: StrictStr
    name: StrictStr
    arguments: StrictStr
    namespace: Ignored
    caller: Ignored
    async_: Annotated[Any, Field(default=None, exclude=True, alias="async")]


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: StrictStr
    output: StrictStr | list[InputContent]
    name: Ignored
    namespace: Ignored
    caller: Ignored


class ReasoningItem(_Item):
    """A reasoning model's earlier reasoning, as clients send a Response's output back:
    taken, and not sent on (no chat template reads it again)."""

    type: Literal["reasoning"]
    summary: list[Any] | None = None
    content: list[Any] | None = None
    encrypted_content: StrictStr | None = None


def _item_type(item: Any) -> str | None:
    """The tag of an input item: its ``type``; a message may leave it out."""
    if isinstance(item, dict):
        kind = item.get("type", "message")
        return kind if isinstance(kind, str) else None
    return None


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]


class ResponseFunctionTool(Strict):
    type: Literal["function"]
    name: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None
    async_: Annotated[Any, Field(default=None, exclude=True, alias="async")]
    allowed_callers: Ignored
    defer_loading: Ignored
    output_schema: Ignored


class TextFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: StrictStr | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    description: StrictStr | None = None
    strict: StrictBool | None = None


class TextConfig(Strict):
    format: TextFormat | None = None
    verbosity: StrictStr | None = None


class ReasoningConfig(Strict):
    effort: StrictStr | None = None
    # Echoed, and otherwise ignored: no summary is made (the reasoning itself comes, as
    # text), and the rest is OpenAI's.
    summary: StrictStr | None = None
    generate_summary: StrictStr | None = None
    context: StrictStr | None = None
    mode: StrictStr | None = None


class ResponseRequest(OpenAIRequest):
    """``POST /v1/responses``."""

    RULES = RESPONSES_RULES

    model: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    input: StrictStr | list[InputItem]
    instructions: StrictStr | None = None
    tools: list[ResponseFunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    max_output_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Probability | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    reasoning: ReasoningConfig | None = None
    include: list[StrictStr] | None = None
    text: TextConfig | None = None
    stream: StrictBool = False
    background: StrictBool = False
    previous_response_id: StrictStr | None = None
    # Taken, and echoed in the Response where it has them; they change nothing here.
    store: StrictBool | None = None
    metadata: dict[str, StrictStr] | None = None
    user: StrictStr | None = None
    service_tier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    truncation: StrictStr | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: StrictStr | None = None
    max_tool_calls: Annotated[StrictInt, Field(ge=0)] | None = None
    stream_options: dict[str, Any] | None = None
    image: dict[str, Any] | None = None
    access_programs: dict[str, Any] | None = None
    conversation_: Annotated[Any, Field(default=None, alias="conversation")]
    prompt: Any = None
    background_options: Any = None
    context_management: Any = None
    moderation: Any = None

    def messages(self) -> list[dict[str, Any]]:
        """This request's own messages (after those of ``previous_response_id``)."""
        return [message for message, _ in self._messages()]

    def message_params(self) -> list[str]:
        """Where each of ``messages()`` comes from, as a ``param`` names it: the upstream's
        error about ``messages[1]`` is one about ``input[0]``, say."""
        return [param for _, param in self._messages()]

    def _messages(self) -> list[tuple[dict[str, Any], str]]:
        messages: list[tuple[dict[str, Any], str]] = []
        if self.instructions:
            messages.append(({"role": "system", "content": self.instructions}, "instructions"))
        if isinstance(self.input, str):
            messages.append(({"role": "user", "content": self.input}, "input"))
            return messages
        for index, item in enumerate(self.input):
            param = f"input[{index}]"
            if isinstance(item, InputMessage):
                messages.append(({"role": item.role, "content": chat_content(item.content)}, param))
            elif isinstance(item, FunctionCallItem):
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments},
                }
                last = messages[-1][0] if messages else None
                if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                    last["tool_calls"].append(call)
                else:
                    assistant = {"role": "assistant", "content": None, "tool_calls": [call]}
                    messages.append((assistant, param))
            elif isinstance(item, FunctionCallOutputItem):
                content = chat_content(item.output)
                tool = {"role": "tool", "tool_call_id": item.call_id, "content": content}
                messages.append((tool, param))
        return messages

    def logprobs(self) -> bool:
        """Whether it asks for the tokens' logprobs: ``include`` names them, or it wants
        alternatives (``top_logprobs`` above 0)."""
        return LOGPROBS_INCLUDE in (self.include or ()) or bool(self.top_logprobs)

    def passed(self) -> dict[str, Any]:
        """Its fields as Chat Completions names them, for the upstream."""
        passed = {
            name: getattr(self, name)
            for name in ("temperature", "top_p", "parallel_tool_calls")
            if getattr(self, name) is not None
        }
        if self.logprobs():
            passed["logprobs"] = True
            if self.top_logprobs is not None:
                passed["top_logprobs"] = self.top_logprobs
        if self.reasoning is not None and self.reasoning.effort is not None:
            passed["reasoning_effort"] = self.reasoning.effort
        if self.tools is not None:
            passed["tools"] = [
                {"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                for t in self.tools
            ]
        tool_choice = self.tool_choice
        if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
            tool_choice = {"type": "function", "function": {"name": tool_choice.get("name")}}
        if tool_choice is not None:
            passed["tool_choice"] = tool_choice
        if self.text is not None and self.text.verbosity is not None:
            passed["verbosity"] = self.text.verbosity
        response_format = self._response_format()
        if response_format is not None:
            passed["response_format"] = response_format
        return passed

    def _response_format(self) -> dict[str, Any] | None:
        text_format = self.text.format if self.text is not None else None
        if text_format is None or text_format.type == "text":
            return None
        response_format: dict[str, Any] = {"type": text_format.type}
        if text_format.type == "json_schema":
            schema: dict[str, Any] = {
                "name": text_format.name or "response",
                "schema": text_format.schema_,
            }
            if text_format.strict is not None:
                schema["strict"] = text_format.strict
            response_format["json_schema"] = schema
        return response_format

    def conversation(self, before: list[dict[str, Any]]) -> Conversation:
        """The conversation: ``before`` (that of ``previous_response_id``), then this one."""
        return Conversation(
            messages=[*before, *self.messages()],
            model=self.model,
            max_tokens=self.max_output_tokens,
            passed=self.passed(),
            extra=self.extra_fields(),
        )


def chat_content(content: str | list[Any]) -> str | list[dict[str, Any]]:
    """A Responses message's content as a chat message carries it: its text, or, with an
    image in it, Chat Completions' parts (``text`` and ``image_url``)."""
    if isinstance(content, str):
        return content
    if not any(isinstance(part, InputImage) for part in content):
        return "".join(part.text if isinstance(part, InputText) else "" for part in content)
    parts: list[dict[str, Any]] = []
    for part in content:
        if isinstance(part, InputText):
            parts.append({"type": "text", "text": part.text})
        elif isinstance(part, InputImage):
            image = {"url": part.image_url}
            if part.detail is not None:
                image["detail"] = part.detail
            parts.append({"type": "image_url", "image_url": image})
    return parts


# -- refusals in OpenAI's words -------------------------------------------------------------


def validated(model: type[M], body: dict[str, Any]) -> M:
    """``body`` as ``model``, or the InvalidRequest (400) OpenAI would give: ``param``
    names the first bad field as the request spells it; ``code`` says whether it is a
    field stageserver does not take (``unsupported_parameter``), a value of a kind it does
    not take (``unsupported_value``), or wrong (``invalid_value``)."""
    check_values(body, model.RULES)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _refusal(exc, body) from None


def _refusal(exc: ValidationError, body: Mapping[str, Any]) -> InvalidRequest:
    # A union reports once per alternative (a string, or a list of parts); the error that
    # reaches deepest into the body is the one about what the caller meant, and what was
    # sent says more than what was not.
    found = [
        (param_of(list(err["loc"]), body, missing=err["type"] == "missing"), err)
        for err in exc.errors(include_url=False, include_input=False)
    ]
    (_, param), err = max(found, key=lambda pair: (pair[0][0], pair[1]["type"] != "missing"))
    loc, kind = list(err["loc"]), err["type"]
    if kind in ("extra_forbidden", "none_required"):
        code, message = "unsupported_parameter", "is not supported by this server"
    elif kind == "union_tag_invalid":
        param += ".type"
        expected = err.get("ctx", {}).get("expected_tags", "")
        code, message = (
            "unsupported_value",
            f"is not a type this server takes (it takes {expected})",
        )
    elif kind == "literal_error" and loc and loc[-1] == "type":
        code, message = "unsupported_value", f"is not a type this server takes: {err['msg']}"
    else:
        code, message = "invalid_value", err["msg"]
    return InvalidRequest(f"{param}: {message}", field=param, code=code)


def param_of(loc: list[int | str], body: Any, *, missing: bool = False) -> tuple[int, str]:
    """A validation error's location as OpenAI names a parameter (``messages[0].content``),
    and how many of its steps are the body's.

    pydantic puts its own names in a location (a union's alternative, ``float``, a tag):
    only the keys and indexes found in the request body are the caller's. A missing
    field is found nowhere, and is the location's last name."""
    param, depth = "", 0
    value = body
    for index, part in enumerate(loc):
        if isinstance(part, int) and isinstance(value, list) and 0 <= part < len(value):
            param += f"[{part}]"
            value = value[part]
        elif isinstance(part, str) and isinstance(value, dict) and part in value:
            param += f".{part}" if param else part
            value = value[part]
        elif missing and index == len(loc) - 1 and isinstance(part, str):
            param += f".{part}" if param else part
        else:
            continue
        depth += 1
    return depth, param or "body"
