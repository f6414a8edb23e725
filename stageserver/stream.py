"""The SSE generator response: one HTTP response following a stage, its events,
heartbeats, and the client going away.

``event_stream`` is the response, ``follow`` the generator it sends. When the client
goes, gunicorn closes the generator (``GeneratorExit``), and its ``finally`` ends that
client's part of the stage: a stage that only it followed is cancelled, a resumable one
waits for a client to come back (``Stage.detach``).

The same loop (``follow``) serves every response: the client that started a stage, a
client that re-attaches, a watcher, whether the stage runs in this worker or elsewhere.
Where the events come from is an ``EventFeed``'s business (``stages/feeds.py``):
``LocalFeed`` reads a stage of this process, ``store.remote_feed.RemoteFeed`` one that
runs in another worker or host.

A WSGI generator hears of a disconnect only when a write fails, and under gunicorn's
gevent worker that is the second write after the client left; during a silent prefill
nothing is written at all. So two things watch for it:

- a heartbeat comment after every ``heartbeat_seconds`` without an event, so a failed
  write comes within two intervals even where nothing else can look;
- under gevent, a read watcher on the client socket that wakes the response the moment
  it reads end-of-file, which takes about a millisecond.

A client that stops reading (a frozen tab, a stuck proxy) is gone too: when one write
has not been taken for ``send_timeout_seconds``, its socket is shut down under gunicorn's
blocked ``sendall`` (which then fails the way a disconnect does, quietly), so the
response, its greenlet and its descriptor are released.

What a disconnect does to the stage is the stage's business (``Stage.detach``). Nothing
is written after the client is gone, and nothing is yielded after ``GeneratorExit``: a
yield there makes the server log "generator ignored GeneratorExit" and skip ``finally``,
leaving the upstream running. A feed that cannot go on (``StageLost``: the store went
away, or the events the client asks for are no longer kept) ends the response with an
id-less ``error`` event that says so: a client never gets a silent gap.

A seed response starts with a ``retry:`` line, so that clients reconnect at the pace the
operator chose (``STAGESERVER_SSE_RETRY_MS``); a ``/v1`` one with nothing; and a
Messages stream's heartbeat is a ``ping`` event (``Framing``).

Writes are coalesced: the response's first yield is empty, so that gunicorn sends the
headers at once, and the preamble goes out with the first events; after that each write
holds every event the stage had when the response woke (``EventFeed.read``). Each write
to a client is a system call that, on loopback or a local proxy, also costs the
receiving side's work, so the bytes of a stream are the same and its writes fewer.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from flask import Response

from .concurrency import SendDeadline, gevent_active, original, read_watcher, real_poll
from .config import FollowSettings
from .errors import ClientGone, StageLost
from .sse import HEARTBEAT
from .stages.feeds import EventFeed
from .stages.stage import Subscriber
from .telemetry.metrics import OPEN_RESPONSES

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event_stream(events: Iterator[bytes], headers: dict[str, str] | None = None) -> Response:
    """The response that sends ``events`` (``follow``'s) as they come."""
    # Passed through: gunicorn iterates and closes our generator itself, without werkzeug's
    # two layers around it (a frame each on every write and on a parked response's stack).
    return Response(
        events,
        mimetype="text/event-stream",
        headers={**SSE_HEADERS, **(headers or {})},
        direct_passthrough=True,
    )


@dataclass(frozen=True)
class Framing:
    """What a response sends besides its stage's events, as its API frames a stream: its
    first bytes (the seed's ``retry:`` line; nothing on ``/v1``), the event that ends a
    response which cannot follow its stage further, from the stage's id and why, and its
    heartbeat (a comment, which every client ignores; the Messages API's ``ping`` event,
    which its clients expect)."""

    preamble: bytes
    lost: Callable[[str, str], bytes]
    heartbeat: bytes = HEARTBEAT


def follow(
    feed: EventFeed,
    *,
    after_seq: int,
    client_socket: Any,
    settings: FollowSettings,
    framing: Framing,
) -> Iterator[bytes]:
    """Yield the feed's events after ``after_seq``, until the stage's terminal event."""
    heartbeat_seconds = settings.heartbeat_seconds
    send_timeout = settings.send_timeout_seconds if client_socket is not None else 0.0
    send = SendDeadline(send_timeout, lambda: _give_up_on(client_socket))
    with _watched(client_socket) as subscriber:
        finished = False
        preamble = framing.preamble
        try:
            feed.open(subscriber)  # attached first: the events are kept while it reads
        except StageLost as exc:
            send.close()
            yield preamble + framing.lost(feed.stage_id, str(exc))
            return
        try:
            # Nothing but the headers, which gunicorn sends before the upstream answers;
            # the preamble goes with the first events (one write, not two).
            yield b""
            cursor = after_seq + 1
            while True:
                try:
                    batch, cursor, finished = feed.read(subscriber, cursor, heartbeat_seconds)
                except StageLost as exc:
                    finished = True  # this response ends; the stage is not its to stop
                    yield framing.lost(feed.stage_id, str(exc))
                    return
                if subscriber.client_gone:
                    finished = False
                    raise ClientGone()
                send.begin()
                # heartbeat_seconds without an event: a comment, which also finds a client
                # that has gone where nothing else can look.
                yield preamble + (batch or (b"" if finished else framing.heartbeat))
                preamble = b""
                send.end()
                if finished:
                    return
        finally:
            send.close()
            feed.close(subscriber, disconnected=not finished)


def _give_up_on(client_socket: Any) -> None:
    """In the hub: the client took nothing for the send timeout. Shut its socket down,
    so that the write gunicorn is blocked in fails with EPIPE, as a disconnect's does.

    Through an unpatched socket on the same descriptor: gevent's own ``shutdown`` would
    instead throw EBADF ("closed in another greenlet") into that write, which gunicorn
    logs as an error with its traceback."""
    raw = original("socket", "socket")(fileno=client_socket.fileno())
    try:
        raw.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        raw.detach()  # the descriptor stays gunicorn's to close


@contextmanager
def _watched(client_socket: Any) -> Iterator[Subscriber]:
    """A subscriber for one response, told when its client goes away."""
    subscriber = Subscriber()
    watcher = DisconnectWatcher.start(client_socket, subscriber)
    OPEN_RESPONSES.inc()
    try:
        yield subscriber
    finally:
        OPEN_RESPONSES.dec()
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
        self._sock = sock
        self._subscriber = subscriber
        self._io: Any = read_watcher(sock.fileno())[0]
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
    poll = real_poll()()
    poll.register(fd, select.POLLIN)
    return bool(poll.poll(0))
