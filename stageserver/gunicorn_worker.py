"""The gunicorn worker stageserver runs in: gunicorn's gevent worker, which reads the
first request of each connection in turn.

gunicorn's gevent worker accepts a connection (one per turn of the loop,
``concurrency.accept_in_turn``) and parks its greenlet until the request's bytes come.
In a burst, many requests become readable in the same turn, and libev wakes their
greenlets last first: the last request's view ran first. Here each connection waits for
its first bytes in turn (``concurrency.readable_in_turn``), ranked as it was accepted:
the views run in the order their connections came. A connection that sends nothing is
closed after ``keepalive`` seconds, as gunicorn bounds a keep-alive connection's wait
for its next request.

``worker_class`` in ``gunicorn_conf.py`` names it; a gunicorn configuration of one's own
may name it too, or keep ``gevent``, which serves the same, in its own order.
"""

from __future__ import annotations

import socket
from typing import Any

from gunicorn.workers.ggevent import GeventWorker

from .concurrency import next_rank, readable_in_turn


class InTurnGeventWorker(GeventWorker):  # type: ignore[misc]  # gunicorn has no types
    def handle(self, listener: socket.socket, client: socket.socket, addr: Any) -> None:
        if not readable_in_turn(client, next_rank(), self.cfg.keepalive or None):
            client.close()
            return
        super().handle(listener, client, addr)
