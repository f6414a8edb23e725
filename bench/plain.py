"""The fixed design written plainly: what its own parts cost, without stageserver.

Issue 28 fixes the design (a Flask view, the synchronous ``openai`` client inside
gunicorn's gevent worker, an SSE generator response) and asks for targets against nginx.
These two apps are that design and nothing else: no stage, no event log, no limits, no
metrics, no log line. ``bench.run`` runs them as the targets ``plain`` and ``bare``, under
gunicorn's own gevent worker with the settings it gives stageserver, so that what
stageserver adds to its design, and what the design itself costs, are read side by side
in one run:

- ``plain_app`` is the seed's handler ported to the design: the view reads the seed's
  body, and its generator relays ``client.chat.completions.create(stream=True)`` as the
  seed's events (``chat_completion_chunk`` with ``{"stage_id", "chunk"}``, then
  ``done``). One client per process, with the SDK's own httpx client, its limits raised
  as stageserver's are for the benchmark (the seed made a client per request, which
  costs more).
- ``bare_app`` writes the same events from memory, with no upstream, on the clock of the
  stream the fake upstream would have sent (its model string: ``fake?chunks=N&
  interval=S&prefill=P``): what gunicorn, Flask and a generator response cost alone, the
  floor under any relay built on them.

    gunicorn -k gevent 'bench.plain:plain_app'   # BENCH_PLAIN_UPSTREAM: the upstream's /v1
    gunicorn -k gevent 'bench.plain:bare_app'
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx2
import openai
from flask import Flask, Response, request

from testing.fake_upstream.options import resolve_options

#: Connections to the upstream at most: ``STAGESERVER_UPSTREAM_MAX_CONNECTIONS`` of
#: ``bench.procs.Stageserver``.
MAX_CONNECTIONS = 3000


# Not stageserver's encoder (stageserver/sse.py): these apps are the design without it.
def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def create_plain_app(upstream: str) -> Flask:
    """The seed's handler as a Flask view, relaying ``upstream`` (its ``/v1``)."""
    app = Flask("plain")
    limits = httpx2.Limits(
        max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS
    )
    client = openai.OpenAI(
        base_url=upstream,
        api_key="bench",
        max_retries=0,
        http_client=openai.DefaultHttpxClient(limits=limits),
    )

    @app.post("/chat")
    def chat() -> Response:
        body = request.get_json()
        stage_id = body["stage_id"]
        stream = client.chat.completions.create(
            model=body["model_name"],
            messages=[{"role": "user", "content": body["user_prompt"]}],
            stream=True,
            stream_options={"include_usage": True},
        )

        def events() -> Iterator[str]:
            with stream:
                for chunk in stream:
                    data = {"stage_id": stage_id, "chunk": chunk.model_dump(exclude_unset=True)}
                    yield _event("chat_completion_chunk", data)
                yield _event("done", {"stage_id": stage_id})

        return Response(events(), mimetype="text/event-stream")

    return app


def create_bare_app() -> Flask:
    """The same events written from memory, on the clock of the model string's stream."""
    app = Flask("bare")

    @app.post("/chat")
    def chat() -> Response:
        body = request.get_json()
        stage_id, model = body["stage_id"], body["model_name"]
        # The stream the fake upstream would send for this model string: its options.
        shape, _ = resolve_options({}, urlsplit(model).query)
        chunks, interval, prefill = shape.chunks, shape.interval, shape.prefill

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return {"id": "bare", "object": "chat.completion.chunk", "created": 0,
                    "model": model, "choices": [choice]}  # fmt: skip

        def events() -> Iterator[str]:
            time.sleep(prefill)  # gevent's, under gunicorn's gevent worker
            for index in range(chunks):
                if index:
                    time.sleep(interval)
                data = {"stage_id": stage_id, "chunk": chunk({"content": f"t{index}"})}
                yield _event("chat_completion_chunk", data)
            finish = {"stage_id": stage_id, "chunk": chunk({}, "stop")}
            yield _event("chat_completion_chunk", finish)
            usage = {**chunk({}), "choices": [], "usage": {"prompt_tokens": 1,
                     "completion_tokens": chunks, "total_tokens": chunks + 1}}  # fmt: skip
            yield _event("chat_completion_chunk", {"stage_id": stage_id, "chunk": usage})
            yield _event("done", {"stage_id": stage_id})

        return Response(events(), mimetype="text/event-stream")

    return app


def __getattr__(name: str) -> Flask:
    """``plain_app`` and ``bare_app``, made when gunicorn imports the one it serves."""
    if name == "plain_app":
        return create_plain_app(os.environ["BENCH_PLAIN_UPSTREAM"])
    if name == "bare_app":
        return create_bare_app()
    raise AttributeError(name)
