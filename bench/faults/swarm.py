"""Many streams from one asyncio loop, some of them dropped by their client on purpose.

Cheap on the client side, as ``bench/load.py`` is: a stream's bytes are kept whole (a few
KB) and its events counted with ``bytes.count``, nothing parsed as JSON. Each of
``concurrency`` clients runs streams back to back on one kept-alive connection; a client
that drops a stream closes its connection at a random point of it (after 0 to all of its
chunk events) and opens a new one for its next stream, as a closed tab does.

A stream that was not dropped must end with ``done`` after every chunk, and once; the
kinds of anything else are counted in ``problems``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

_CHUNK = b"event: chat_completion_chunk\n"
_DONE = b"event: done\n"
_OTHER_ENDS = (b"event: error\n", b"event: cancel\n")
_END = b"\r\n0\r\n\r\n"  # the last data chunk's CRLF, then the zero-length chunk


@dataclass
class SwarmResult:
    streams: int = 0
    done: int = 0
    dropped: int = 0
    problems: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    last_end: float = 0.0  # monotonic: when the last stream ended

    def summary(self) -> str:
        return f"{self.done}/{self.streams - self.dropped} done, {self.dropped} dropped"


class _Swarm:
    def __init__(
        self, port: int, *, streams: int, chunks: int, interval: float, drop_fraction: float,
        seed: int, prefix: str,
    ) -> None:  # fmt: skip
        self.port = port
        self.total = streams
        self.events = chunks + 2  # content, then the finish_reason and usage chunks
        self.model = f"fake?chunks={chunks}&interval={interval:g}"
        self.drop_fraction = drop_fraction
        self.rng = random.Random(seed)
        self.prefix = prefix
        self.next = 0
        self.result = SwarmResult()

    def request(self, n: int) -> bytes:
        body = (
            f'{{"stage_id":"{self.prefix}-{n}","model_name":"{self.model}",'
            '"user_prompt":"hi","stream":true}'
        ).encode()
        return (
            b"POST /chat HTTP/1.1\r\nHost: f\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    async def client(self) -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while self.next < self.total:
            n, self.next = self.next, self.next + 1
            drop_at = None
            if self.rng.random() < self.drop_fraction:
                drop_at = self.rng.randrange(self.events + 1)
            self.result.streams += 1
            try:
                if conn is None:
                    conn = await asyncio.open_connection("127.0.0.1", self.port)
                conn[1].write(self.request(n))
                kept = await self.one(conn[0], drop_at)
            except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
                self.result.problems[f"connection: {type(exc).__name__}"] += 1
                kept = False
            self.result.last_end = time.monotonic()
            if not kept and conn is not None:
                conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()

    async def one(self, reader: asyncio.StreamReader, drop_at: int | None) -> bool:
        """Read one stream; whether its connection may carry the next one."""
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") or b"chunked" not in head.lower():
            self.result.problems[head.split(b"\r\n", 1)[0].decode(errors="replace")] += 1
            return False
        buf = bytearray()
        while True:
            data = await reader.read(65536)
            if not data:
                self.result.problems["the server closed the stream without its end"] += 1
                return False
            buf += data
            if drop_at is not None and buf.count(_CHUNK) >= drop_at:
                self.result.dropped += 1
                return False  # the caller closes the connection: the drop
            if buf.endswith(_END):
                break
        chunks, dones = buf.count(_CHUNK), buf.count(_DONE)
        if dones == 1 and chunks == self.events and not any(e in buf for e in _OTHER_ENDS):
            self.result.done += 1
            return True
        ends = [e.decode().strip() for e in (_DONE, *_OTHER_ENDS) if e in buf]
        self.result.problems[f"ended with {ends or 'nothing'} after {chunks} chunks"] += 1
        return False


async def _run(swarm: _Swarm, concurrency: int) -> SwarmResult:
    start = time.monotonic()
    await asyncio.gather(*(swarm.client() for _ in range(concurrency)))
    swarm.result.seconds = time.monotonic() - start
    return swarm.result


def run_swarm(
    port: int, *, streams: int, concurrency: int, chunks: int, interval: float,
    drop_fraction: float = 0.0, seed: int = 1, prefix: str = "s",
) -> SwarmResult:  # fmt: skip
    """``streams`` streams, ``concurrency`` at a time; ``drop_fraction`` of them dropped."""
    swarm = _Swarm(
        port, streams=streams, chunks=chunks, interval=interval,
        drop_fraction=drop_fraction, seed=seed, prefix=prefix,
    )  # fmt: skip
    return asyncio.run(_run(swarm, concurrency))
