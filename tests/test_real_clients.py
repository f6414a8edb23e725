"""The clients people build agents with, at their newest releases, on ``/v1``: the OpenAI
Agents SDK on both its models (``OpenAIResponsesModel``, its default, and
``OpenAIChatCompletionsModel``), pydantic-ai, LangChain's ``ChatOpenAI`` and LiteLLM,
each on Chat Completions and on Responses, streamed, with a function tool.

Each is a program of ``testing/clients/`` run in the clients' own venv
(``testing/clients/venv.py``: the newest releases from PyPI, brought up to date at each
run; the test's venv keeps the server's pinned ``openai``), against one gunicorn host in
front of a fake upstream of this module's own. The fake answers a tool call until the
conversation holds the tool's result, then the text (``tool_calls_until_result``). So
each run is an agent's whole loop: the model calls ``get_weather``, the client runs it
and sends its result back, and the model's answer streams.

For each client the test checks what the client saw (the tool ran once, with the
arguments the model gave; the text it streamed is the run's final output) and what the
upstream saw (two streamed requests; the second holds the call and the tool's result as
Chat Completions messages, whichever API the client spoke). A field or an item that the
server refused would fail the run with the client's own error, shown here.

Findings so far (openai-agents 0.24, pydantic-ai 2.78, langchain-openai 1.8, litellm
1.110, openai 3.63): nothing any of them sends is refused. LiteLLM's ``responses()``
fakes its stream for a model missing from its catalogue, as a self-hosted model is
(``stream: false`` on the wire, BerriAI/litellm#21090): the program registers the model
as one that streams, as a user must.

The programs run all at once (their imports are most of their time); each is told apart
on the upstream by its model name (``client=<name>``, an option the fake keeps and
ignores). Anything but the server they try to reach is refused at once (the proxy
variables point nowhere), so no run depends on, or reaches, the internet.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest

from testing.clients.report import INSTRUCTIONS, PROMPT
from testing.clients.venv import clients_venv
from testing.fake_upstream import FakeUpstream, UpstreamRequest
from testing.servers import ROOT, Gunicorn, gunicorn_server
from testing.venvs import Venv

pytestmark = pytest.mark.clients

SECRET = "real-clients-key-0123456789"
ANSWER = "It is sunny in Paris."
WEATHER = "sunny in Paris"  # get_weather("Paris"), sent back as the tool's result
#: A model that calls ``get_weather(city="Paris")``, and answers ANSWER once it has the
#: result; its arguments and its text in three chunks each.
OPTIONS = (
    "tool_calls=1&tool_calls_until_result=1&chunks=3"
    f"&tool_args={quote(json.dumps({'city': 'Paris'}))}&text={quote(ANSWER)}"
)
#: What the programs' environment adds: LiteLLM reads its catalogue from its own package
#: instead of GitHub; every proxy is a closed port, and only loopback is reached directly.
ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "ALL_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
}
PROGRAM_TIMEOUT = 300.0


@dataclass(frozen=True)
class Client:
    program: str  # a module of testing/clients/
    api: str  # "chat" or "responses"

    @property
    def name(self) -> str:
        return f"{self.program}-{self.api}"

    @property
    def model(self) -> str:
        return f"fake?{OPTIONS}&client={self.name}"


CLIENTS = [
    Client("agents_sdk", "responses"),
    Client("agents_sdk", "chat"),
    Client("pydantic_ai_agent", "responses"),
    Client("pydantic_ai_agent", "chat"),
    Client("langchain_agent", "chat"),
    Client("langchain_agent", "responses"),
    Client("litellm_agent", "chat"),
    Client("litellm_agent", "responses"),
]


@dataclass(frozen=True)
class Run:
    """One program's run: how it ended, what it printed, what the upstream got from it."""

    client: Client
    returncode: int
    stdout: str
    stderr: str
    upstream: list[UpstreamRequest]

    def report(self) -> dict[str, Any]:
        assert self.returncode == 0, (
            f"{self.client.name} exited with {self.returncode}\n"
            f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
        )
        report: dict[str, Any] = json.loads(self.stdout.splitlines()[-1])
        return report


@pytest.fixture(scope="module")
def venv() -> Iterator[Venv]:
    with clients_venv() as venv:
        yield venv


@pytest.fixture(scope="module")
def fake_upstream() -> Iterator[FakeUpstream]:
    """The module's own: the programs run at once, and other tests reset the shared one."""
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def server(fake_upstream: FakeUpstream) -> Iterator[Gunicorn]:
    env = {
        "STAGESERVER_UPSTREAM_URL": fake_upstream.url,
        "STAGESERVER_API_KEYS": json.dumps({"agents": {"key": SECRET}}),
    }
    with gunicorn_server(env) as server:
        yield server


@pytest.fixture(scope="module")
def runs(venv: Venv, server: Gunicorn, fake_upstream: FakeUpstream) -> dict[Client, Run]:
    """Every program, started at once, each against the server; waited for in turn."""
    started = {
        client: subprocess.Popen(
            [
                str(venv.python),
                "-m",
                f"testing.clients.{client.program}",
                f"{server.url}/v1",
                SECRET,
                client.model,
                client.api,
            ],
            cwd=ROOT,  # where ``testing.clients`` is found; nothing else of it is imported
            env=venv.env(ENV),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for client in CLIENTS
    }
    ended: dict[Client, tuple[int, str, str]] = {}
    for client, proc in started.items():
        try:
            stdout, stderr = proc.communicate(timeout=PROGRAM_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            stderr += f"\n(killed: still running after {PROGRAM_TIMEOUT} s)"
        ended[client] = (proc.returncode, stdout, stderr)
    return {
        client: Run(
            client,
            *ended[client],
            [r for r in fake_upstream.requests if r.options.get("client") == client.name],
        )
        for client in CLIENTS
    }


@pytest.mark.parametrize("client", CLIENTS, ids=lambda c: c.name)
def test_the_client_runs_the_tool_and_streams_the_final_answer(
    runs: dict[Client, Run], client: Client
) -> None:
    report = runs[client].report()
    assert report["tool_calls"] == [{"city": "Paris"}], report
    assert report["streamed"] == ANSWER, report
    assert report["final"] == ANSWER, report


@pytest.mark.parametrize("client", CLIENTS, ids=lambda c: c.name)
def test_the_upstream_gets_the_call_and_the_tools_result_as_chat_messages(
    runs: dict[Client, Run], client: Client
) -> None:
    run = runs[client]
    run.report()  # the run succeeded: else its own failure says why
    assert [r.path for r in run.upstream] == ["/v1/chat/completions"] * 2
    first, second = (r.body for r in run.upstream)
    for body in (first, second):
        assert body["stream"] is True, body  # streamed from the upstream, not made up
        (tool,) = body["tools"]
        assert (tool["type"], tool["function"]["name"]) == ("function", "get_weather")
        assert tool["function"]["parameters"]["properties"]["city"]["type"] == "string"
    asked = [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": PROMPT},
    ]
    assert first["messages"] == asked
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "tool"]
    assert second["messages"][:2] == asked
    assistant, tool = second["messages"][2:]
    (call,) = assistant["tool_calls"]
    call_id = f"call_fake_{run.upstream[0].index}_0"  # the id the fake gave the call
    assert (call["id"], call["type"], call["function"]["name"]) == (
        call_id,
        "function",
        "get_weather",
    )
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert not assistant.get("content")  # a turn of calls only: null, or left out
    assert tool == {"role": "tool", "tool_call_id": call_id, "content": WEATHER}
