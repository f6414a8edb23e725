"""The blocks a Messages request's conversation holds (``messages[].content``, ``system``,
a tool result's content), as the pydantic models they validate with. They are strict, as
Anthropic's are: a field stageserver does not know there is refused, a block of a type
it does not take too (``fields.py`` says what each field becomes)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictStr

from ..fields import Ignored, Strict


class CacheControl(Strict):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


#: ``cache_control``: checked, and ignored (there is no prompt cache to control here).
Cache = Annotated[CacheControl | None, Field(default=None, exclude=True)]


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
