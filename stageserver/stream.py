"""One HTTP response following a stage: its events, heartbeats, and the client going away.

A WSGI generator hears of a disconnect only when a write fails, and under gunicorn's
gevent worker that is the second write after the client left; during a silent prefill
nothing is written at all. So two things watch for it:

- a heartbeat comment after every ``heartbeat_seconds`` without an event, so a failed
  write comes within two intervals even where nothing else can look;
- under gevent, a greenlet that peeks at the client socket and wakes the response the
  moment it reads end-of-file, which takes about a millisecond.

What happens to the stage is the stage's business (``Stage.detach``): a disconnect of its
own client cancels it unless it is resumable. Nothing is written after the client is
gone, and nothing is yielded after ``GeneratorExit``: a yield there makes the server log
"generator ignored GeneratorExit" and skip ``finally``, leaving the upstream running.
"""

from __future__ import annotations

import errno
import select
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .concurrency import gevent_active
from .sse import HEARTBEAT
from .stages import Stage, Subscriber

if TYPE_CHECKING:
    from .redis_store import RedisStageStore



class ClientGone(ConnectionResetError):
    """Raised out of the response so that gunicorn drops the connection without writing
    (it ignores ECONNRESET quietly)."""

    def __init__(self) -> None:
        super().__init__(errno.ECONNRESET, "client disconnected")


def follow_stage(
    stage: Stage,
    *,
    after_seq: int,
    heartbeat_seconds: float,
    client_socket: Any,
    owner: bool,
) -> Iterator[bytes]:
    """Yield the stage's events after ``after_seq``, until its terminal event."""
    with _watched(client_socket) as subscriber:
        stage.attach(subscriber, owner=owner)
        finished = False
        try:
            yield b""  # gunicorn sends the headers now, before the upstream has answered
            cursor = after_seq + 1
            while True:
                subscriber.wake.clear()
                batch, cursor, finished = stage.read(cursor)
                if subscriber.client_gone:
                    finished = False
                    raise ClientGone()
                if batch:
                    yield batch
                if finished:
                    return
                if not subscriber.wake.wait(heartbeat_seconds):
                    yield HEARTBEAT
        finally:
            stage.detach(subscriber, owner=owner, disconnected=not finished)


def follow_remote_stage(
    store: RedisStageStore,
    stage_id: str,
    *,
    after_seq: int,
    heartbeat_seconds: float,
    client_socket: Any,
) -> Iterator[bytes]:
    """The same as ``follow_stage``, for a stage that runs in another worker or host."""
    with _watched(client_socket) as subscriber:
        yield b""
        yield from store.follow(
            stage_id,
            after_seq=after_seq,
            heartbeat_seconds=heartbeat_seconds,
            client_gone=lambda: subscriber.client_gone,
        )
        if subscriber.client_gone:
            raise ClientGone()


@contextmanager
def _watched(client_socket: Any) -> Iterator[Subscriber]:
    """A subscriber for one response, told when its client goes away."""
    subscriber = Subscriber()
    watcher = DisconnectWatcher.start(client_socket, subscriber)
    try:
        yield subscriber
    finally:
        if watcher is not None:
            watcher.stop()
        subscriber.wake.close()


class DisconnectWatcher:
    """Under gevent, wakes a subscriber when its client's socket reads end-of-file.

    A read watcher on the socket in gevent's loop, not a greenlet parked in a peek: no
    greenlet to spawn and kill for each response, and no stack to keep for each open
    stream.
    """

    def __init__(self, sock: socket.socket, subscriber: Subscriber) -> None:
        import gevent

        self._sock = sock
        self._subscriber = subscriber
        self._io: Any = gevent.get_hub().loop.io(sock.fileno(), 1)  # 1: readable
        self._io.start(self._readable)

    @classmethod
    def start(cls, sock: Any, subscriber: Subscriber) -> DisconnectWatcher | None:
        # A TLS socket cannot be peeked at; without gevent a blocked peek would hold a
        # thread. Both fall back to heartbeats.
        if sock is None or not gevent_active() or type(sock).__name__ == "SSLSocket":
            return None
        return cls(sock, subscriber)

    def _readable(self) -> None:
        # Runs in gevent's hub, which must never wait: peek only once the real poll says
        # the peek will not block (the watcher can fire spuriously).
        if not _poll_readable(self._sock.fileno()):
            return
        try:
            peeked = self._sock.recv(1, socket.MSG_PEEK)
        except OSError:
            peeked = b""
        self._io.stop()
        if peeked:
            return  # the client sent more (a pipelined request): it is still there
        self._subscriber.client_gone = True
        self._subscriber.wake.set()

    def stop(self) -> None:
        # Must be gone before gunicorn reads the next request on this connection.
        self._io.stop()
        self._io.close()


def _poll_readable(fd: int) -> bool:
    from gevent import monkey

    poll = monkey.get_original("select", "poll")()
    poll.register(fd, select.POLLIN)
    return bool(poll.poll(0))
