"""stageserver apps in the test's own process, driven by Flask's test client."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from stageserver import create_app
from stageserver.manager import manager_of


class WholeBodyClient(FlaskClient):
    """A test client that reads each answer whole before it returns it, unless asked
    (``buffered=False``): a stream read later, after its app was closed, would meet a
    stage still running against upstream clients that are gone."""

    def open(self, *args: Any, buffered: bool = True, **kwargs: Any) -> TestResponse:
        return super().open(*args, buffered=buffered, **kwargs)


@contextmanager
def app_client(config: dict[str, Any]) -> Iterator[FlaskClient]:
    """A fresh app's test client; its manager is closed afterwards (its background work
    ended, its upstream connections closed)."""
    app = create_app(config)
    app.test_client_class = WholeBodyClient
    try:
        yield app.test_client()
    finally:
        manager_of(app.extensions).close()
