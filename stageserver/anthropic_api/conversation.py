"""A Messages conversation becomes Chat Completions' messages, as an upstream takes them:

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
from typing import Any

from ..errors import InvalidRequest
from .blocks import (
    ContentSource,
    DocumentBlock,
    FileSource,
    ImageBase64,
    ImageBlock,
    MessageParam,
    PlainTextSource,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
    URLSource,
)

#: What joins the text blocks of one message, as vLLM joins a message's text parts.
JOIN = "\n"


def chat_messages(
    system: str | Sequence[TextBlock] | None, messages: Sequence[MessageParam]
) -> list[tuple[dict[str, Any], str]]:
    """The conversation as Chat Completions' messages, each with where it comes from in
    the request (``system``, ``messages.3``)."""
    chat: list[tuple[dict[str, Any], str]] = []
    if system:
        text = system if isinstance(system, str) else JOIN.join(b.text for b in system)
        chat.append(({"role": "system", "content": text}, "system"))
    for turn in _turns(messages):
        chat += turn.chat_messages()
    return chat


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
