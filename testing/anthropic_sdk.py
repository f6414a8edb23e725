"""Anthropic's official Python SDK, in a venv of its own: the newest release of
``anthropic`` from the package index, brought up to date each time a test session first
needs it (``tests/conftest.py``'s ``anthropic_sdk``, through ``venvs.cached_venv``: kept
in ``~/.cache/stageserver/anthropic-sdk-py3.x`` between runs, so a run after the first
only asks the index whether anything is newer). It is not a dependency of stageserver's,
and its own dependencies stay out of the tests' venv.

``AnthropicSDK.run`` runs ``testing/anthropic_client.py`` in that venv with a plan, and
gives back what it printed.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from typing import Any

import requests

from .servers import ROOT
from .sse import parse_events
from .venvs import Venv

CLIENT = ROOT / "testing" / "anthropic_client.py"

# What the tests of Anthropic's two SDKs (tests/test_anthropic_sdk.py, _js.py) ask for.
#: Heartbeats every 0.2 s (the tests' setting): 1 s before the first chunk, 0.3 s between.
SLOW = "fake?chunks=3&interval=0.3&prefill=1&created=1700000000"
HI = [{"role": "user", "content": "hi"}]
PNG = "iVBORw0KGgo="
TOOL = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
#: Prints what the SDK's types name: every field of the two requests, of the blocks a
#: request may hold, and of the answers' types (``tests/test_anthropic_fields.py``).
TYPES_SCRIPT = """
import importlib, json, sys, typing
def find(name):
    module, _, attr = name.rpartition(".")
    path = ".".join(filter(None, ["anthropic.types", module]))
    return getattr(importlib.import_module(path), attr)
print(json.dumps({name: sorted(typing.get_type_hints(find(name))) for name in sys.argv[1:]}))
"""


@dataclass(frozen=True)
class Received:
    kind: str
    value: Any


class AnthropicSDK:
    def __init__(self, venv: Venv) -> None:
        self.venv = venv
        self.version = self._python(
            "-c", "import anthropic; print(anthropic.__version__)"
        ).stdout.strip()

    def env(self) -> dict[str, str]:
        """The venv's environment, without any ``ANTHROPIC_*`` of the test's own (which
        the SDK would read: a base URL, a key)."""
        env = self.venv.env()
        return {k: v for k, v in env.items() if not k.startswith("ANTHROPIC_")}

    def run(self, base_url: str, call: str, params: dict[str, Any], **plan: Any) -> list[Received]:
        """What ``anthropic_client.py`` received for ``call`` with ``params`` against
        ``base_url``; ``plan``: ``api_key`` (``"sk-test"`` unless given), ``auth_token``,
        ``async``."""
        done = self._python(str(CLIENT), _plan(base_url, call, params, plan))
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        assert lines and lines[-1] == {"kind": "end", "value": None}, done.stdout
        return [Received(line["kind"], line["value"]) for line in lines[:-1]]

    def start(
        self, base_url: str, call: str, params: dict[str, Any], **plan: Any
    ) -> subprocess.Popen[str]:
        """``run``'s client, started: its output is read a line at a time (``received``)
        while the test acts on the server; wait for it, and close its stdout."""
        return subprocess.Popen(
            [str(self.venv.python), str(CLIENT), _plan(base_url, call, params, plan)],
            cwd=self.venv.path,
            env=self.env(),
            stdout=subprocess.PIPE,
            text=True,
        )

    def fields(self, *names: str) -> dict[str, list[str]]:
        """The fields of each of the SDK's types ``names``, under ``anthropic.types``
        (``text_block_param.TextBlockParam``, or ``TextBlockParam``)."""
        done = self._python("-c", TYPES_SCRIPT, *names)
        found: dict[str, list[str]] = json.loads(done.stdout)
        return found

    def _python(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(self.venv.python), *args],
            cwd=self.venv.path,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"python {args[0]} failed:\n{done.stderr}\n{done.stdout}"
        return done


def _plan(base_url: str, call: str, params: dict[str, Any], plan: dict[str, Any]) -> str:
    if "auth_token" not in plan:
        plan.setdefault("api_key", "sk-test")
    return json.dumps({**plan, "base_url": base_url, "call": call, "params": params})


def received(line: str) -> Received:
    """One line of a started client's output."""
    found = json.loads(line)
    return Received(found["kind"], found["value"])


# -- what the tests of both SDKs compare ----------------------------------------------------

MESSAGE_ID = re.compile(r"msg_[0-9a-f]{32}")


def same_id(value: Any) -> Any:
    """``value`` (JSON) with every message id as ``ID``: the same in every run."""
    return json.loads(MESSAGE_ID.sub("ID", json.dumps(value)))


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def wire_events(answer: requests.Response) -> list[dict[str, Any]]:
    """The data of each event of a Messages stream but its pings, which it must have,
    each event carrying its id, ``<message id>-<type>-<n>``, ``n`` from 0."""
    assert answer.status_code == 200, answer.text
    events = parse_events(answer.content)
    pings = [e for e in events if e["event"] == "ping"]
    assert pings and all(e["data"] == {"type": "ping"} and "id" not in e for e in pings)
    events = [e for e in events if e["event"] != "ping"]
    message_id = answer.headers["X-Stage-Id"]
    for n, event in enumerate(events):
        assert event["id"] == f"{message_id}-{event['event']}-{n}"
        assert event["data"]["type"] == event["event"]
    return [e["data"] for e in events]


def raw_event(event: dict[str, Any]) -> dict[str, Any]:
    """An event of ``messages.stream()`` as it came: without the block the SDKs add to a
    ``content_block_stop``."""
    if event["type"] == "content_block_stop":
        return {k: v for k, v in event.items() if k != "content_block"}
    return event
