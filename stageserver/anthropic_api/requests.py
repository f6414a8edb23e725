"""What ``POST /v1/messages`` and ``POST /v1/messages/count_tokens`` accept, as the pydantic
models they validate with, and the conversation each becomes.

Each field of the two requests is built into the stage, passed to the upstream, ignored,
or refused: ``fields.py`` says which, and why. Nested objects are strict, as Anthropic's
are: a field stageserver does not know there is refused, a block of a type it does not
take too. A refusal is a 400 ``invalid_request_error`` whose message starts with the path
of what is wrong, in Anthropic's notation (``messages.0.content.1.source.type: ...``).

A Messages conversation becomes Chat Completions' messages, as an upstream takes them:

- ``system`` (a string, or text blocks joined by a line break) is a system message first,
  and so is a message of ``role: system``;
- consecutive turns of one role are one turn, as Anthropic combines them;
- a user turn's ``tool_result`` blocks become ``tool`` messages, in order, first; the
  rest of the turn (text, images, documents' text, and the images a tool result held)
  a user message after them;
- an assistant turn's text is its content, its ``tool_use`` blocks its ``tool_calls``
  (``input`` as JSON ``arguments``); its ``thinking`` and ``redacted_thinking`` blocks
  are dropped (no chat template reads earlier reasoning again);
- text blocks are joined by a line break; a message with an image has Chat Completions'
  parts instead (``text``, and ``image_url``: a URL as given, base64 data as a
  ``data:`` URI);
- a ``document`` gives its text (``text`` and ``content`` sources; its title and
  context first): a PDF, by data or URL, and a file of Anthropic's Files API are refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
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
from .fields import COUNT_TOKENS_RULES, MESSAGES_RULES

M = TypeVar("M", bound="MessagesBase")
#: What joins the text blocks of one message, as vLLM joins a message's text parts.
JOIN = "\n"


class CacheControl(Strict):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


#: ``cache_control``: checked, and ignored (there is no prompt cache to control here).
Cache = Annotated[CacheControl | None, Field(default=None, exclude=True)]


# -- content blocks -----------------------------------------------------------------------


class TextBlock(Strict):
    type: Literal["text"]
    text: StrictStr
    cache_control: Cache
    #: The citations of an earlier answer: no template reads them.
    citations: Ignored


class ImageBase64(Strict):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: Annotated[StrictStr, Field(min_length=1)]


class URLSource(Strict):
    type: Literal["url"]
    url: Annotated[StrictStr, Field(min_length=1)]


class FileSource(Strict):
    """A file of Anthropic's Files API: none is kept here (refused)."""

    type: Literal["file"]
    file_id: StrictStr


ImageSource = Annotated[ImageBase64 | URLSource | FileSource, Field(discriminator="type")]


class ImageBlock(Strict):
    type: Literal["image"]
    source: ImageSource
    cache_control: Cache
    #: How Anthropic's servers transform an image: the upstream gets it as it is.
    transformations: Ignored


class PlainTextSource(Strict):
    type: Literal["text"]
    media_type: Literal["text/plain"]
    data: StrictStr


class PDFBase64(Strict):
    """A PDF's data: no upstream here reads PDFs (refused)."""

    type: Literal["base64"]
    media_type: Literal["application/pdf"]
    data: StrictStr


ContentSourceBlock = Annotated[TextBlock | ImageBlock, Field(discriminator="type")]


class ContentSource(Strict):
    type: Literal["content"]
    content: StrictStr | list[ContentSourceBlock]


DocumentSource = Annotated[
    PlainTextSource | ContentSource | PDFBase64 | URLSource | FileSource,
    Field(discriminator="type"),
]


class DocumentBlock(Strict):
    type: Literal["document"]
    source: DocumentSource
    title: StrictStr | None = None
    context: StrictStr | None = None
    cache_control: Cache
    #: No citations are made here; the document is read all the same.
    citations: Ignored


class ThinkingBlock(Strict):
    """A reasoning model's earlier thinking, sent back: taken, and dropped."""

    type: Literal["thinking"]
    thinking: StrictStr
    signature: StrictStr
    cache_control: Cache


class RedactedThinkingBlock(Strict):
    type: Literal["redacted_thinking"]
    data: StrictStr
    cache_control: Cache


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: Annotated[StrictStr, Field(min_length=1)]
    name: Annotated[StrictStr, Field(min_length=1)]
    input: dict[str, Any]
    cache_control: Cache
    caller: Ignored
    toolset_name: Ignored


ToolResultContent = Annotated[TextBlock | ImageBlock | DocumentBlock, Field(discriminator="type")]


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: Annotated[StrictStr, Field(min_length=1)]
    content: StrictStr | list[ToolResultContent] | None = None
    #: Not told to the upstream (a tool message has no such flag): the content says it.
    is_error: StrictBool | None = None
    cache_control: Cache
    toolset_name: Ignored


Block = Annotated[
    TextBlock
    | ImageBlock
    | DocumentBlock
    | ThinkingBlock
    | RedactedThinkingBlock
    | ToolUseBlock
    | ToolResultBlock,
    Field(discriminator="type"),
]


class MessageParam(Strict):
    role: Literal["user", "assistant", "system"]
    content: StrictStr | list[Block]


# -- tools and the rest ------------------------------------------------------------------------


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
        messages: list[tuple[dict[str, Any], str]] = []
        if self.system:
            system = self.system
            text = system if isinstance(system, str) else JOIN.join(b.text for b in system)
            messages.append(({"role": "system", "content": text}, "system"))
        for turn in _turns(self.messages):
            messages += turn.chat_messages()
        return messages

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


# -- the conversation ----------------------------------------------------------------------


class _Turn:
    """Consecutive messages of one role: one turn, as Anthropic combines them. ``param``:
    where its first message is in the request (``messages.3``)."""

    def __init__(self, role: str, param: str) -> None:
        self.role = role
        self.param = param
        self.blocks: list[tuple[Any, str]] = []  # each block, and its path

    def chat_messages(self) -> list[tuple[dict[str, Any], str]]:
        if self.role == "system":
            text = JOIN.join(block.text for block, _ in self.blocks)
            return [({"role": "system", "content": text}, self.param)]
        if self.role == "assistant":
            return [(self._assistant(), self.param)]
        return self._user()

    def _assistant(self) -> dict[str, Any]:
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for block, path in self.blocks:
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolUseBlock):
                arguments = json.dumps(block.input, separators=(",", ":"), ensure_ascii=False)
                calls.append(
                    {
                        "id": block.id,
                        "type": "function",
                        "function": {"name": block.name, "arguments": arguments},
                    }
                )
            elif not isinstance(block, ThinkingBlock | RedactedThinkingBlock):
                raise _misplaced(block, path, "an assistant")
        message: dict[str, Any] = {"role": "assistant", "content": JOIN.join(texts)}
        if calls:
            message["tool_calls"] = calls
            if not texts:
                message["content"] = None
        return message

    def _user(self) -> list[tuple[dict[str, Any], str]]:
        tools: list[tuple[dict[str, Any], str]] = []
        parts: list[dict[str, Any]] = []  # Chat Completions' parts of the user message
        for block, path in self.blocks:
            if isinstance(block, ToolResultBlock):
                result_parts = _parts(block.content or [], f"{path}.content")
                text = block.content if isinstance(block.content, str) else _text_of(result_parts)
                message = {"role": "tool", "tool_call_id": block.tool_use_id, "content": text}
                tools.append((message, path))
                parts += [part for part in result_parts if part["type"] != "text"]
            elif isinstance(block, TextBlock | ImageBlock | DocumentBlock):
                parts += _parts([block], path, at=path)
            else:
                raise _misplaced(block, path, "a user")
        if not parts and tools:
            return tools
        content = _text_of(parts) if all(p["type"] == "text" for p in parts) else parts
        return [*tools, ({"role": "user", "content": content}, self.param)]


def _turns(messages: Sequence[MessageParam]) -> list[_Turn]:
    turns: list[_Turn] = []
    for index, message in enumerate(messages):
        param = f"messages.{index}"
        if not turns or turns[-1].role != message.role or message.role == "system":
            turns.append(_Turn(message.role, param))
        turn = turns[-1]
        content = message.content
        if isinstance(content, str):
            text = TextBlock(type="text", text=content, cache_control=None, citations=None)
            turn.blocks.append((text, f"{param}.content"))
            continue
        for number, block in enumerate(content):
            path = f"{param}.content.{number}"
            if message.role == "system" and not isinstance(block, TextBlock):
                raise _misplaced(block, path, "a system")
            turn.blocks.append((block, path))
    return turns


def _misplaced(block: Any, path: str, role: str) -> InvalidRequest:
    return InvalidRequest(
        f"{path}.type: a {block.type} block cannot be in {role} message",
        field=f"{path}.type",
        code="unsupported_value",
    )


def _parts(
    blocks: str | Sequence[Any], path: str, *, at: str | None = None
) -> list[dict[str, Any]]:
    """Chat Completions' parts of ``blocks`` (a string is one text part). ``path``: where
    the list is; ``at``: where the one block is, when ``blocks`` is one block."""
    if isinstance(blocks, str):
        return [{"type": "text", "text": blocks}]
    parts: list[dict[str, Any]] = []
    for number, block in enumerate(blocks):
        where = at if at is not None else f"{path}.{number}"
        if isinstance(block, TextBlock):
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ImageBlock):
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, where)}})
        elif isinstance(block, DocumentBlock):
            parts += _document(block, where)
    return parts


def _image_url(block: ImageBlock, path: str) -> str:
    source = block.source
    if isinstance(source, ImageBase64):
        return f"data:{source.media_type};base64,{source.data}"
    if isinstance(source, URLSource):
        return source.url
    raise InvalidRequest(
        f"{path}.source.type: 'file' names a file of Anthropic's Files API, which this server "
        "does not keep: send the image as base64 data or by URL",
        field=f"{path}.source.type",
        code="unsupported_value",
    )


def _document(block: DocumentBlock, path: str) -> list[dict[str, Any]]:
    source = block.source
    heading = [{"type": "text", "text": t} for t in (block.title, block.context) if t]
    if isinstance(source, PlainTextSource):
        return [*heading, {"type": "text", "text": source.data}]
    if isinstance(source, ContentSource):
        return [*heading, *_parts(source.content, f"{path}.source.content")]
    if isinstance(source, FileSource):
        why = "names a file of Anthropic's Files API, which this server does not keep"
    else:
        why = "is a PDF, which no upstream here reads"
    raise InvalidRequest(
        f"{path}.source.type: {source.type!r} {why}: send the document's text (a source of "
        "type 'text' or 'content')",
        field=f"{path}.source.type",
        code="unsupported_value",
    )


def _text_of(parts: Sequence[Mapping[str, Any]]) -> str:
    return JOIN.join(part["text"] for part in parts if part["type"] == "text")


# -- refusals in Anthropic's words ----------------------------------------------------------


def validated(model: type[M], body: dict[str, Any]) -> M:
    """``body`` as ``model``, or the InvalidRequest (400) Anthropic would give: its message
    starts with the path of the first bad field as the request spells it
    (``messages.0.content.1.type``), then says what is wrong in pydantic's words, as
    Anthropic's do (``Field required``, ``Extra inputs are not permitted``)."""
    check_values(body, model.RULES)
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        raise _refusal(exc, body) from None
    request.check()
    return request


def _refusal(exc: ValidationError, body: Mapping[str, Any]) -> InvalidRequest:
    # A union reports once per alternative (a string, or a list of blocks); the error that
    # reaches deepest into the body is the one about what the caller meant, and what was
    # sent says more than what was not.
    found = [
        (path_of(list(err["loc"]), body, missing=err["type"] == "missing"), err)
        for err in exc.errors(include_url=False, include_input=False)
    ]
    (_, path), err = max(found, key=lambda pair: (pair[0][0], pair[1]["type"] != "missing"))
    kind = err["type"]
    if kind == "union_tag_invalid":
        path += ".type"
        expected = err.get("ctx", {}).get("expected_tags", "")
        message = f"is not a type this server takes (it takes {expected})"
        code = "unsupported_value"
    elif kind == "extra_forbidden":
        message, code = err["msg"], "unsupported_parameter"
    else:
        message, code = err["msg"], "invalid_value"
    return InvalidRequest(f"{path}: {message}", field=path, code=code)


def path_of(loc: list[int | str], body: Any, *, missing: bool = False) -> tuple[int, str]:
    """A validation error's location as Anthropic names a field (``messages.0.content``),
    and how many of its steps are the body's.

    pydantic puts its own names in a location (a union's alternative, a tagged union's
    tag), and a tag may be a key of the body too (a text block's tag is ``text``, and so
    is its field): only keys and indexes found in the body are the caller's, and of the
    ways to read the location so, the one with the most steps, then the one that ends at
    the location's end (the field the error is about). A missing field is found nowhere,
    and is the location's last name."""
    steps, _ = _walk(loc, 0, body, missing)
    return len(steps), ".".join(steps) or "body"


_ABSENT = object()


def _walk(loc: list[int | str], at: int, value: Any, missing: bool) -> tuple[list[str], bool]:
    """The best reading of ``loc[at:]`` in ``value``: its steps, and whether its last step
    is the location's last part."""
    if at == len(loc):
        return [], False
    part = loc[at]
    last = at == len(loc) - 1
    best = _walk(loc, at + 1, value, missing)  # the part skipped
    child: Any = _ABSENT
    if isinstance(part, int) and isinstance(value, list) and 0 <= part < len(value):
        child = value[part]
    elif isinstance(part, str) and isinstance(value, dict) and part in value:
        child = value[part]
    elif missing and last and isinstance(part, str):
        return [part], True
    if child is not _ABSENT:
        rest, ends = _walk(loc, at + 1, child, missing)
        taken = ([str(part), *rest], ends or last)
        if (len(taken[0]), taken[1]) >= (len(best[0]), best[1]):
            best = taken
    return best
