"""Reading an OpenAI chunk: what the stage records, and what ends a stage."""

from __future__ import annotations

import pytest

from stageserver.errors import UpstreamErrorObject, UpstreamProtocolError
from stageserver.stages.chunk_read import ChunkRead
from stageserver.upstream.chunks import read_chunk


@pytest.mark.parametrize(
    ("payload", "read"),
    [
        (
            b'{"choices":[{"index":0,"delta":{"content":"h\xc3\xa9"}}]}',
            ChunkRead("h\u00e9", delta={"content": "h\u00e9"}),
        ),
        (
            b'{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}',
            ChunkRead(finish_reason="stop", delta={}),
        ),
        (
            b'{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}',
            ChunkRead(usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}),
        ),
        (b'{"choices":[{"index":1,"delta":{"content":"other"}}]}', ChunkRead()),
        (
            b'{"choices":[{"delta":{"content":"no index"}}]}',
            ChunkRead("no index", delta={"content": "no index"}),
        ),
        (
            b'{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1"}]}}]}',
            ChunkRead(delta={"tool_calls": [{"index": 0, "id": "c1"}]}, continuable=False),
        ),
        (
            b'{"choices":[{"index":0,"delta":{"reasoning_content":"Hm."}}]}',
            ChunkRead(delta={"reasoning_content": "Hm."}, reasoning="Hm.", continuable=False),
        ),
        (
            b'{"choices":[{"index":0,"delta":{"reasoning":"Hm.","content":null}}]}',
            ChunkRead(
                delta={"reasoning": "Hm.", "content": None}, reasoning="Hm.", continuable=False
            ),
        ),
        (
            b'{"choices":[{"index":0,"delta":{"reasoning_content":null,"content":"A"}}]}',
            ChunkRead("A", delta={"reasoning_content": None, "content": "A"}),
        ),
        (
            b'{"choices":[{"index":0,"delta":{"content":"A"},"logprobs":{"content":'
            b'[{"token":"A","logprob":-0.5,"bytes":[65],"top_logprobs":[]}]}}]}',
            ChunkRead(
                "A",
                delta={"content": "A"},
                logprobs={
                    "content": [{"token": "A", "logprob": -0.5, "bytes": [65], "top_logprobs": []}]
                },
            ),
        ),
        (
            b'{"choices":[{"index":0,"delta":{"content":"A"},"logprobs":null}]}',
            ChunkRead("A", delta={"content": "A"}),
        ),
        (b'{"choices":[{"index":0,"delta":{"content":7}}]}', ChunkRead(delta={"content": 7})),
        (b'{"choices":null,"usage":null}', ChunkRead()),
        (b'{"choices":[],"usage":"x"}', ChunkRead()),
        (b'{"choices":[],"usage":[1]}', ChunkRead()),
        (b'  {"choices":[]}  ', ChunkRead()),
    ],
)
def test_what_a_chunk_says(payload: bytes, read: ChunkRead) -> None:
    assert read_chunk(payload, "up") == read


@pytest.mark.parametrize("payload", [b'{"id": not json', b"[1]", b'{"a":1} x', b"", b'"text"'])
def test_a_chunk_that_is_not_a_json_object(payload: bytes) -> None:
    with pytest.raises(UpstreamProtocolError, match="upstream 'up' sent a chunk that is not a"):
        read_chunk(payload, "up")


def test_an_error_object() -> None:
    with pytest.raises(
        UpstreamErrorObject, match="upstream 'up' reported an error mid-stream: model overloaded"
    ):
        read_chunk(b'{"error":{"message":"model overloaded","type":"server_error"}}', "up")
