"""A checkout is started as every gunicorn tutorial starts an app: ``gunicorn wsgi:app``
(gunicorn reads ``./gunicorn.conf.py`` by itself), or with that file named. Either way it
is stageserver with its own settings and the gevent worker."""

from __future__ import annotations

import pytest

from testing.fake_upstream import FakeUpstream
from testing.servers import Gunicorn
from testing.sse import parse_events, post_chat

#: Every test here starts a process (testing/processes.py).
pytestmark = pytest.mark.processes


@pytest.mark.parametrize(
    "args", [("wsgi:app",), ("-c", "gunicorn.conf.py", "wsgi:app")], ids=["bare", "named"]
)
def test_gunicorn_wsgi_app_in_a_checkout_serves_stageserver_on_gevent(
    fake: FakeUpstream, args: tuple[str, ...]
) -> None:
    server = Gunicorn(
        {"STAGESERVER_UPSTREAM_URL": fake.url, "STAGESERVER_ACCESS_LOG": "-"}, args=args
    )
    try:
        answer = post_chat(server.url, stage_id="card", model_name="fake?chunks=2", stream=True)
        assert [e["event"] for e in parse_events(answer.content)] == [
            "chat_completion_chunk",
            "chat_completion_chunk",
            "chat_completion_chunk",
            "chat_completion_chunk",
            "done",
        ]
    finally:
        server.stop()
    log = server.log()
    assert "Using worker: stageserver.gunicorn_worker.InTurnGeventWorker" in log
    # The package's settings: its access log line ends with the request id.
    assert '"POST /chat HTTP/1.1" 200' in log
    assert "Traceback" not in log
