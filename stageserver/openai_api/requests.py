"""What ``/v1/chat/completions`` and ``/v1/responses`` accept, as the pydantic models they
validate with, and the conversation each becomes.

Strict, as OpenAI is: a field stageserver does not know, or knows and does not build
(built-in tools, ``reasoning``, ``include``, images, files and audio, ``conversation``,
``n`` > 1) is refused with a 400 whose ``param`` names it and whose ``code`` is
``unsupported_parameter`` (``unsupported_value`` for a content part or item of a type
it does not take). Fields that change nothing here (``store``, ``metadata``, ``user``,
``service_tier``, ``prompt_cache_key``) are accepted, and echoed where a Response has
them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from ..errors import InvalidRequest
from ..stages.conversation import Conversation

Number = StrictFloat | StrictInt
M = TypeVar("M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- Chat Completions -----------------------------------------------------------------------


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(_Strict):
    name: StrictStr
    arguments: StrictStr


class ToolCall(_Strict):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None
    refusal: StrictStr | None = None


class FunctionDefinition(_Strict):
    name: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class FunctionTool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


Stop = StrictStr | list[StrictStr] | None


class ChatCompletionRequest(_Strict):
    """``POST /v1/chat/completions``."""

    model: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    stop: Stop = None
    seed: StrictInt | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None
    n: Annotated[StrictInt, Field(ge=1, le=1)] | None = None
    # Accepted; they change nothing here.
    store: StrictBool | None = None
    metadata: dict[str, StrictStr] | None = None
    user: StrictStr | None = None
    service_tier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    safety_identifier: StrictStr | None = None

    def conversation(self) -> Conversation:
        sampling = {
            name: getattr(self, name)
            for name in ("temperature", "top_p", "stop", "seed", "presence_penalty")
            if getattr(self, name) is not None
        }
        if self.frequency_penalty is not None:
            sampling["frequency_penalty"] = self.frequency_penalty
        return Conversation(
            messages=[
                m.model_dump(exclude_unset=True) for m in self.messages
            ],  # as given: an explicit null stays
            model=self.model,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            sampling=sampling,
            tools=None
            if self.tools is None
            else [t.model_dump(exclude_unset=True) for t in self.tools],
            tool_choice=self.tool_choice,
            parallel_tool_calls=self.parallel_tool_calls,
            response_format=None
            if self.response_format is None
            else self.response_format.model_dump(exclude_unset=True),
        )


# -- Responses ------------------------------------------------------------------------------


class InputText(_Strict):
    type: Literal["input_text", "output_text", "text"]
    text: StrictStr
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class _Item(_Strict):
    """What every input item may carry back from an earlier Response; nothing uses it."""

    id: StrictStr | None = None
    status: StrictStr | None = None


class InputMessage(_Item):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[InputText]


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: StrictStr
    name: StrictStr
    arguments: StrictStr


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: StrictStr
    output: StrictStr


InputItem = Annotated[
    InputMessage | FunctionCallItem | FunctionCallOutputItem, Field(union_mode="left_to_right")
]


class ResponseFunctionTool(_Strict):
    type: Literal["function"]
    name: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: StrictStr | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    description: StrictStr | None = None
    strict: StrictBool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: StrictStr | None = None


class ResponseRequest(_Strict):
    """``POST /v1/responses``."""

    model: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    input: StrictStr | list[InputItem]
    instructions: StrictStr | None = None
    tools: list[ResponseFunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    max_output_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    text: TextConfig | None = None
    stream: StrictBool = False
    background: StrictBool = False
    previous_response_id: StrictStr | None = None
    # Accepted, and echoed in the Response where it has them; they change nothing here.
    store: StrictBool | None = None
    metadata: dict[str, StrictStr] | None = None
    user: StrictStr | None = None
    service_tier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    truncation: Literal["disabled"] | None = None

    def messages(self) -> list[dict[str, Any]]:
        """This request's own messages (after those of ``previous_response_id``)."""
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
            return messages
        for item in self.input:
            if isinstance(item, InputMessage):
                content = item.content
                text = content if isinstance(content, str) else "".join(p.text for p in content)
                messages.append({"role": item.role, "content": text})
            elif isinstance(item, FunctionCallItem):
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments},
                }
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                    last["tool_calls"].append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                messages.append(
                    {"role": "tool", "tool_call_id": item.call_id, "content": item.output}
                )
        return messages

    def conversation(self, before: list[dict[str, Any]]) -> Conversation:
        """The conversation: ``before`` (that of ``previous_response_id``), then this one."""
        sampling = {
            name: getattr(self, name)
            for name in ("temperature", "top_p")
            if getattr(self, name) is not None
        }
        tools = None
        if self.tools is not None:
            tools = [
                {"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                for t in self.tools
            ]
        tool_choice = self.tool_choice
        if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
            tool_choice = {"type": "function", "function": {"name": tool_choice.get("name")}}
        response_format: dict[str, Any] | None = None
        text_format = self.text.format if self.text is not None else None
        if text_format is not None and text_format.type != "text":
            response_format = {"type": text_format.type}
            if text_format.type == "json_schema":
                schema: dict[str, Any] = {
                    "name": text_format.name or "response",
                    "schema": text_format.schema_,
                }
                if text_format.strict is not None:
                    schema["strict"] = text_format.strict
                response_format["json_schema"] = schema
        return Conversation(
            messages=[*before, *self.messages()],
            model=self.model,
            max_tokens=self.max_output_tokens,
            sampling=sampling,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=self.parallel_tool_calls,
            response_format=response_format,
        )


# -- refusals in OpenAI's words -------------------------------------------------------------


def validated(model: type[M], body: dict[str, Any]) -> M:
    """``body`` as ``model``, or the InvalidRequest (400) OpenAI would give: ``param``
    names the first bad field, ``code`` says whether it is one stageserver does not take
    (``unsupported_parameter``), a value of a kind it does not take
    (``unsupported_value``), or wrong (``invalid_value``)."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _refusal(exc) from None


def _refusal(exc: ValidationError) -> InvalidRequest:
    errors = exc.errors(include_url=False, include_input=False)
    # A union reports once per alternative: a missing field in one and a wrong literal in
    # another. The literal (a part or item type stageserver does not take) says more.
    err = next((e for e in errors if e["type"] == "literal_error"), errors[0])
    loc = list(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        code, message = "unsupported_parameter", "is not supported by this server"
    elif kind == "literal_error" and loc and loc[-1] == "type":
        code, message = "unsupported_value", f"is not a type this server takes: {err['msg']}"
    elif kind == "less_than_equal" and loc == ["n"]:
        code, message = "unsupported_value", "must be 1: this server makes one choice"
    else:
        code, message = "invalid_value", err["msg"]
    param = _param(loc)
    return InvalidRequest(f"{param}: {message}", field=param, code=code)


def _param(loc: list[int | str]) -> str:
    """A location as OpenAI names a parameter: ``messages[0].content``. The model names
    of a union's alternatives (``InputMessage``) are not the caller's; they are left out."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part[:1].isupper() or part.startswith(("str", "list[", "function-")):
            continue
        else:
            param += f".{part}" if param else part
    return param or "body"
