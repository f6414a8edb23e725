"""stageserver apps in the test's own process, driven by Flask's test client."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from stageserver import close, create_app
from stageserver.manager import manager_of


class WholeBodyClient(FlaskClient):
    """A test client that reads each answer whole before it returns it, unless asked
    (``buffered=False``): a stream read later, after its app was closed, would meet a
    stage still running against upstream clients that are gone."""

    def open(self, *args: Any, buffered: bool = True, **kwargs: Any) -> TestResponse:
        return super().open(*args, buffered=buffered, **kwargs)


@contextmanager
def app_client(config: dict[str, Any]) -> Iterator[FlaskClient]:
    """A fresh app's test client; the app is closed afterwards (``stageserver.close``:
    its background work ended, its connections closed)."""
    app = create_app(config)
    app.test_client_class = WholeBodyClient
    try:
        yield app.test_client()
    finally:
        close(app)


def settle(flask_client: FlaskClient, stage_id: str, timeout: float = 5) -> None:
    """Until the runner of the app's stage ``stage_id`` has finished with it, listeners
    included (``timeout`` at most, then the test fails): a client may read the terminal
    event before the runner has logged it and run the stage's listeners' ``on_finish``,
    and a stage cancelled in its upstream's prefill runs on, in threads, until its read
    times out."""
    stage = manager_of(flask_client.application.extensions).stages.get(stage_id)
    assert stage is not None, f"no stage {stage_id!r} in this app"
    stage.wait(timeout)
    assert stage.finished, f"stage {stage_id!r} still runs {timeout} s on"
