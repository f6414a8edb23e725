"""How long from a client's disconnect to the upstream seeing its connection closed.

    .venv/bin/python -m bench.disconnect [--runs 20]

Runs stageserver under gunicorn (1 gevent worker) against the loopback fake upstream and,
for each phase, opens a stream, closes the client socket, and reads the fake upstream's
own timestamp of the close. Prints milliseconds: median, p95 and max.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time

from testing.fake_upstream import FakeUpstream
from testing.servers import Gunicorn

PHASES = {
    "mid-stream (chunks every 20 ms)": (
        "fake?chunks=10000&interval=0.02",
        b"chat_completion_chunk",
    ),
    "prefill (no token yet)": ("fake?prefill=600", b"\r\n\r\n"),
    "prefill, upstream headers not sent": ("fake?prefill=600&headers_first=0", b"\r\n\r\n"),
}


def one_disconnect(
    server: Gunicorn, fake: FakeUpstream, stage_id: str, model: str, marker: bytes
) -> float:
    fake.reset()
    body = json.dumps(
        {"stage_id": stage_id, "model_name": model, "user_prompt": "hi", "stream": True}
    ).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /chat HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    wire = b""
    while marker not in wire:
        wire += sock.recv(65536)
    if not fake.wait_for(lambda: len(fake.requests) == 1):
        raise RuntimeError("the upstream never saw the request")
    time.sleep(0.1)  # mid-prefill / mid-stream, not at its start
    closed = time.monotonic()
    sock.close()
    if not fake.wait_for(lambda: fake.requests[0].client_closed_at is not None, timeout=60):
        raise RuntimeError("the upstream connection was never closed")
    seen = fake.requests[0].client_closed_at
    assert seen is not None
    return (seen - closed) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with FakeUpstream() as fake:
        server = Gunicorn({"STAGESERVER_UPSTREAM_URL": fake.url, "STAGESERVER_ACCESS_LOG": ""})
        try:
            print(f"{'phase':<40} {'median ms':>10} {'p95 ms':>8} {'max ms':>8}")
            for phase, (model, marker) in PHASES.items():
                samples = sorted(
                    one_disconnect(server, fake, f"d{n}", model, marker) for n in range(args.runs)
                )
                p95 = samples[min(len(samples) - 1, int(len(samples) * 0.95))]
                print(
                    f"{phase:<40} {statistics.median(samples):>10.2f} {p95:>8.2f} "
                    f"{samples[-1]:>8.2f}"
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
