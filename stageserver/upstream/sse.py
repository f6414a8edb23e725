"""Split an upstream's SSE body, as it arrives in arbitrary reads, into ``data`` payloads.

Works on bytes and cuts only at line breaks, so a UTF-8 character split across two reads
is never split in a payload. A CRLF split across reads is held back until its ``\\n``
arrives. A payload spread over several ``data:`` lines is joined with a space, not the
spec's newline: the payloads are JSON, where a line break can only stand between tokens,
and a single line can be spliced into our own ``data:`` line as it is.
"""

from __future__ import annotations


class SSEPayloadSplitter:
    def __init__(self) -> None:
        self._partial_line = b""
        self._data_lines: list[bytes] = []

    def feed(self, raw: bytes) -> list[bytes]:
        """Return the payloads completed by ``raw``, in order."""
        if (
            # The usual read, one whole single-line event: no need to split it into lines.
            raw.startswith(b"data: ")
            and raw.endswith(b"\n\n")
            and raw.find(b"\n") == len(raw) - 2
            and b"\r" not in raw
            and not self._partial_line
            and not self._data_lines
        ):
            return [raw[6:-2]]
        text = self._partial_line + raw
        if b"\r" in text:
            held_cr = text.endswith(b"\r")
            if held_cr:
                text = text[:-1]
            text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if held_cr:
                text += b"\r"
        *lines, partial = text.split(b"\n")
        self._partial_line = partial
        payloads: list[bytes] = []
        data_lines = self._data_lines
        for line in lines:
            if not line:
                if data_lines:
                    payloads.append(b" ".join(data_lines) if len(data_lines) > 1 else data_lines[0])
                    data_lines.clear()
            elif line.startswith(b"data:"):
                value = line[5:]
                data_lines.append(value[1:] if value.startswith(b" ") else value)
            # Comments (":...") and the fields event/id/retry carry nothing we relay.
        return payloads

    def pending(self) -> bool:
        """Whether the body ended inside an event: a truncated stream."""
        return bool(self._data_lines or self._partial_line.strip(b"\r"))
