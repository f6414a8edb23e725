"""The relay: one stage's upstream request, read to its end and handed to the stage.

``UpstreamRelay.run`` sends the request through the upstream's OpenAI client, reads the
body as it comes (``iter_raw``, so the chunk's bytes reach the client unchanged), splits
it into SSE payloads, has each chunk read (``chunks.py``) and appends it to the stage.
Two deadlines bound a silent upstream: the first-token timeout, from the request to the
first chunk, and the idle timeout between chunks. Each raises its own ``StageFailure``,
as does every other way an upstream can fail (``errors.py``).

After ``[DONE]`` the stage is finished at once and the body is then read to its end, for
at most a second, so that the connection goes back to the pool. However the relay ends,
it closes the upstream response: that close is what tells the upstream to stop.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import httpx2

from .chunks import ChunkRead, read_chunk
from .concurrency import ReadDeadline
from .errors import FirstTokenTimeout, IdleTimeout, UpstreamProtocolError
from .upstream_sse import SSEPayloadSplitter
from .upstreams import Upstream

_DRAIN_SECONDS = 1.0


class ChunkSink(Protocol):
    """What the relay needs of a stage."""

    @property
    def chunk_count(self) -> int: ...

    def append_chunk(self, payload: bytes, read: ChunkRead) -> None: ...

    def finish(self) -> None: ...

    def raise_if_interrupted(self) -> None: ...


class UpstreamRelay:
    def __init__(
        self, upstream: Upstream, body: dict[str, Any], headers: Mapping[str, str]
    ) -> None:
        self.upstream = upstream
        self._body = body
        self._headers = headers
        self._response: httpx2.Response | None = None

    def run(self, stage: ChunkSink) -> None:
        response: httpx2.Response | None = None
        first_token = ReadDeadline(self.upstream.config.first_token_timeout)
        try:
            try:
                with first_token:
                    response = self.upstream.open_stream(self._body, self._headers)
            except BaseException as exc:
                if first_token.fired(exc):
                    raise FirstTokenTimeout(self.upstream.first_token_message()) from None
                raise
            self._response = response
            stage.raise_if_interrupted()
            self._relay(stage, response, first_token)
        finally:
            first_token.close()
            if response is not None:
                # Closing is what tells the upstream to stop generating.
                response.close()
            self._response = None

    def unblock(self) -> None:
        """Threads: shut the socket down under the thread blocked reading it."""
        response = self._response
        if response is None:
            return
        stream = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _relay(
        self, stage: ChunkSink, response: httpx2.Response, first_token: ReadDeadline
    ) -> None:
        if response.headers.get("content-encoding", "identity") != "identity":
            reads = response.iter_bytes()  # decodes what the upstream compressed anyway
        else:
            reads = response.iter_raw()
        idle = ReadDeadline(self.upstream.config.idle_timeout)
        try:
            self._relay_reads(stage, reads, first_token, idle)
        finally:
            idle.close()

    def _relay_reads(
        self,
        stage: ChunkSink,
        reads: Iterator[bytes],
        first_token: ReadDeadline,
        idle: ReadDeadline,
    ) -> None:
        upstream = self.upstream
        name = upstream.name
        deadline = first_token
        splitter = SSEPayloadSplitter()
        finished_by_upstream = False
        while True:
            try:
                with deadline:
                    raw = next(reads, None)
            except BaseException as exc:
                if deadline.fired(exc) or isinstance(exc, httpx2.ReadTimeout):
                    if deadline is first_token:
                        raise FirstTokenTimeout(upstream.first_token_message()) from None
                    raise IdleTimeout(upstream.idle_message()) from None
                if isinstance(exc, httpx2.TransportError):
                    raise UpstreamProtocolError(
                        f"upstream {name!r} dropped the connection mid-stream after "
                        f"{stage.chunk_count} chunks: {exc or type(exc).__name__}"
                    ) from None
                raise
            if raw is None:
                break
            for payload in splitter.feed(raw):
                if payload == b"[DONE]":
                    stage.finish()
                    self._drain(reads)
                    return
                read = read_chunk(payload, name)
                finished_by_upstream = finished_by_upstream or read[1] is not None
                stage.append_chunk(payload, read)
            if deadline is first_token and stage.chunk_count:
                deadline = idle
        if finished_by_upstream and not splitter.pending():
            stage.finish()  # some upstreams end without [DONE]
            return
        raise UpstreamProtocolError(
            f"upstream {name!r} ended the stream after {stage.chunk_count} chunks "
            "without finishing it"
        )

    def _drain(self, reads: Iterator[bytes]) -> None:
        """Read the body to its end after [DONE], so the connection goes back to the pool.

        Bounded and best-effort: the stage has already finished, and an upstream that
        hangs or resets now costs only its connection. Under threads the read cannot be
        bounded, so the connection is closed instead.
        """
        deadline = ReadDeadline(_DRAIN_SECONDS)
        if not deadline.enforced:
            return
        try:
            with deadline:  # one deadline for the whole drain, not one per read
                for _ in reads:
                    pass
        except BaseException as exc:
            if not (deadline.fired(exc) or isinstance(exc, Exception)):
                raise
        finally:
            deadline.close()
