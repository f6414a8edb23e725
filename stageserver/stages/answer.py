"""A stage's answer so far: its text, the chunks that carried it, how it finished, its
usage per segment, and whether it may still be continued. Plain state, which the stage
feeds as its chunks come; no greenlet, no lock.

An answer continued after a failure (``upstream/continuation.py``) is one answer in
several segments, each a request to an upstream. Its usage is summed over the segments:
each is the upstream's own report when it sent one, else an estimate (``usage.py``) from
its prompt, which holds the answer delivered before it, and its content chunks.
"""

from __future__ import annotations

from typing import Any

from .chunk_read import ChunkRead
from .usage import final_usage, sum_usage


class Answer:
    __slots__ = (
        "text_parts", "content_chunks", "chunk_count", "finish_reason", "usage",
        "continuable", "_earlier_usage", "_segment_start",
    )  # fmt: skip

    def __init__(self, text: str = "", content_chunks: int = 0, continuable: bool = True) -> None:
        """An answer that starts from ``text``, delivered in ``content_chunks`` chunks (by
        the worker a stage was taken over from; nothing for a new stage), which that
        worker found ``continuable`` or not."""
        #: The text, in the pieces it came in (the store writes the new ones).
        self.text_parts: list[str] = [text] if text else []
        self.content_chunks = content_chunks
        #: Every chunk, with or without content.
        self.chunk_count = content_chunks
        self.finish_reason: str | None = None
        #: The upstream's report for this segment, while it runs.
        self.usage: dict[str, Any] | None = None
        #: False once it streamed tool calls or reasoning: such an answer is not continued.
        self.continuable = continuable
        self._earlier_usage: dict[str, Any] | None = None  # the segments' before this one
        self._segment_start = 0  # the content chunks before this segment

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def take(self, read: ChunkRead) -> None:
        """What one chunk adds."""
        if read.content:
            self.text_parts.append(read.content)
            self.content_chunks += 1
        if read.finish_reason:
            self.finish_reason = read.finish_reason
        if read.usage:
            self.usage = read.usage
        if not read.continuable:
            self.continuable = False
        self.chunk_count += 1

    def next_segment(self, prompt_tokens: int) -> None:
        """A continuation goes on from here: this segment's usage is counted (what it
        delivered, where the upstream did not say), and the next one's begins."""
        self._earlier_usage = self.total_usage(prompt_tokens)
        self.usage, self._segment_start = None, self.content_chunks

    def total_usage(self, prompt_tokens: int) -> dict[str, Any]:
        """The usage of every segment so far, the current one with its usage as reported
        or estimated; ``prompt_tokens``: the first segment's prompt, as estimated."""
        start = self._segment_start
        segment = final_usage(self.usage, prompt_tokens + start, self.content_chunks - start)
        return sum_usage(self._earlier_usage, segment)

    def settle(self) -> None:
        """The answer is final: its text in one piece, as the stage keeps it."""
        self.text_parts = [self.text]
