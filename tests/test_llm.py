"""The real model: llama.cpp's server with SmolLM2-135M-Instruct, behind stageserver.

One model server is started for the whole session; stageserver runs under gunicorn in
front of it. The launcher (``stageserver serve``) is tested as a user runs it:
its ready line, its curl line, and that it stops everything it started.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from openai import OpenAI
from openai.types.chat import ChatCompletionTokenLogprob

from stageserver.launcher.model import (
    MODEL_NAME,
    default_model_path,
    model_answers,
    model_server_command,
)
from stageserver.launcher.settings import default_threads
from testing.anthropic_sdk import AnthropicSDK
from testing.fake_upstream import FakeUpstream
from testing.servers import (
    ROOT,
    Gunicorn,
    RedisServer,
    free_port,
    gunicorn_server,
    stop_process,
)
from testing.sse import chunk_text, parse_events, post_chat

#: Every test here runs the embedded model, a process (testing/processes.py).
pytestmark = [pytest.mark.llm, pytest.mark.processes]

# At temperature 0 the model runs to the limit on this prompt rather than stopping early.
LONG_PROMPT = "Write a very long essay about the history of the Roman Empire."
SHORT_PROMPT = "What is the capital of France?"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class ModelServer:
    proc: subprocess.Popen[bytes]
    url: str  # the OpenAI base URL, ending in /v1
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def model_server() -> Iterator[ModelServer]:
    port = free_port()
    log_path = ROOT / ".pytest_cache" / f"llama-{port}.log"
    log_path.parent.mkdir(exist_ok=True)
    argv = model_server_command(default_model_path(), port, context=4096, threads=default_threads())
    with open(log_path, "wb") as log:
        # Unbuffered: the disconnect test reads the server's log while it runs.
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = ModelServer(proc, f"http://127.0.0.1:{port}/v1", log_path)
    try:
        deadline = time.monotonic() + 120
        while not model_answers(server.url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the model server did not start:\n{server.log()}")
            time.sleep(0.1)
        yield server
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def server(model_server: ModelServer) -> Iterator[Gunicorn]:
    env = {"STAGESERVER_UPSTREAM_URL": model_server.url, "STAGESERVER_UPSTREAM_KIND": "llamacpp"}
    with gunicorn_server(env) as gunicorn:
        yield gunicorn


def chat(server: Gunicorn, *, stream: bool = False, **fields: Any) -> requests.Response:
    """A stage of the model at temperature 0; the short prompt unless another is given."""
    body: dict[str, Any] = {
        "model_name": MODEL_NAME,
        "user_prompt": SHORT_PROMPT,
        "temperature": 0,
        **fields,
    }
    return post_chat(server.url, stream=stream, open=False, timeout=60, **body)


def chunks_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["data"]["chunk"] for e in events if e.get("event") == "chat_completion_chunk"]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def test_streamed_stage_relays_the_models_chunks_then_done(server: Gunicorn) -> None:
    response = chat(server, stage_id="llm-stream", stream=True, max_tokens=24)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = parse_events(response.content)
    names = [e["event"] for e in events if "event" in e]
    assert names[-1] == "done"
    assert set(names[:-1]) == {"chat_completion_chunk"}
    chunks = chunks_of(events)
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = chunk_text(events)
    assert text.strip()
    status = requests.get(f"{server.url}/stages/llm-stream", timeout=5).json()
    assert status["status"] == "done"
    assert status["text"] == text


def test_usage_is_estimated_where_the_model_reports_none(server: Gunicorn) -> None:
    """llama-cpp-python ignores stream_options.include_usage: stageserver estimates."""
    events = parse_events(chat(server, stage_id="llm-usage", stream=True, max_tokens=16).content)
    content_chunks = sum(
        bool((chunk["choices"] or [{}])[0].get("delta", {}).get("content"))
        for chunk in chunks_of(events)
    )
    # "What is the capital of France?": 30 characters, 8 tokens, + 4 for the message.
    usage = {
        "prompt_tokens": 12,
        "completion_tokens": content_chunks,
        "total_tokens": 12 + content_chunks,
        "estimated": True,
    }
    assert 0 < content_chunks <= 16
    assert events[-1]["data"] == {"stage_id": "llm-usage", "usage": usage}
    status = requests.get(f"{server.url}/stages/llm-usage", timeout=5).json()
    assert status["usage"] == usage


def test_non_streamed_stage_returns_the_text(server: Gunicorn) -> None:
    response = chat(server, stage_id="llm-plain", max_tokens=24)
    assert response.status_code == 200
    output = response.json()
    assert output["stage_id"] == "llm-plain-chat-final"
    assert output["type"] == "text"
    assert output["text"].strip()


def test_max_tokens_is_honoured(server: Gunicorn, model_server: ModelServer) -> None:
    response = chat(
        server, stage_id="llm-short", stream=True, max_tokens=5, user_prompt=LONG_PROMPT
    )
    events = parse_events(response.content)
    assert events[-1]["event"] == "done"
    chunks = chunks_of(events)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = chunk_text(events)
    assert text
    # The stream carries no usage (llama.cpp ignores stream_options), so count with the
    # model's own tokenizer, on the server that generated the text.
    root = model_server.url.removesuffix("/v1")
    tokens = requests.post(f"{root}/extras/tokenize", json={"input": text}, timeout=10).json()
    assert 1 <= len(tokens["tokens"]) <= 5
    content_chunks = [c for c in chunks if c["choices"][0]["delta"].get("content")]
    assert 1 <= len(content_chunks) <= 5  # a chunk carries at least one token


def test_a_background_response_of_the_model_resumes_exactly_once(server: Gunicorn) -> None:
    """/v1/responses, background and stream, read in two parts: each event once, in
    order, and the deltas make the completed Response's text."""
    client = OpenAI(base_url=f"{server.url}/v1", api_key="none", _strict_response_validation=True)
    first = client.responses.create(
        model=MODEL_NAME, input=SHORT_PROMPT, max_output_tokens=24, temperature=0,
        background=True, stream=True,
    )  # fmt: skip
    seen = []
    for event in first:
        seen.append(event)
        if event.sequence_number == 4:
            break
    first.close()
    response_id = seen[0].response.id  # type: ignore[union-attr]
    rest = client.responses.retrieve(response_id, stream=True, starting_after=4)
    seen += list(rest)
    assert [e.sequence_number for e in seen] == list(range(len(seen)))
    assert seen[0].type == "response.created"
    final = seen[-1]
    assert final.type in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in seen if e.type == "response.output_text.delta")
    assert deltas.strip()
    assert final.response.output_text == deltas
    assert client.responses.retrieve(response_id).output_text == deltas


def test_the_models_logprobs_reach_a_chat_completions_client(server: Gunicorn) -> None:
    """llama.cpp's own logprobs, with alternatives, through the official SDK (strict),
    streamed and whole; each token's logprob is its best alternative's."""
    client = OpenAI(base_url=f"{server.url}/v1", api_key="none", _strict_response_validation=True)
    asked: dict[str, Any] = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": SHORT_PROMPT}],
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    tokens: list[ChatCompletionTokenLogprob] = []
    text = ""
    for chunk in client.chat.completions.create(**asked, stream=True):
        if not chunk.choices:
            continue
        text += chunk.choices[0].delta.content or ""
        if chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.content or []
    assert text.strip() and "".join(t.token for t in tokens) == text
    for token in tokens:
        assert token.logprob <= 0 and len(token.top_logprobs) == 2
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob)

    whole = client.chat.completions.create(**asked)
    logprobs = whole.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [t.token for t in logprobs.content] == [t.token for t in tokens]


def test_the_models_logprobs_reach_a_responses_client(server: Gunicorn) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="none", _strict_response_validation=True)
    stream = client.responses.create(
        model=MODEL_NAME, input=SHORT_PROMPT, max_output_tokens=6, temperature=0,
        include=["message.output_text.logprobs"], top_logprobs=2, stream=True,
    )  # fmt: skip
    events = list(stream)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas and all(len(d.logprobs) == 1 for d in deltas)
    assert "".join(d.logprobs[0].token for d in deltas) == "".join(d.delta for d in deltas)
    final = events[-1]
    assert final.type == "response.incomplete"  # at max_output_tokens
    [message] = final.response.output
    assert message.type == "message"
    [part] = message.content
    assert part.type == "output_text" and part.logprobs is not None
    assert [lp.token for lp in part.logprobs] == [d.logprobs[0].token for d in deltas]
    # llama.cpp sends no bytes: each token's are its text's, in UTF-8.
    assert all(lp.bytes == list(lp.token.encode()) for lp in part.logprobs)
    assert all(len(lp.top_logprobs) == 2 for lp in part.logprobs)


def test_the_model_answers_through_the_messages_api_streamed(
    server: Gunicorn, anthropic_sdk: AnthropicSDK
) -> None:
    """/v1/messages, streamed: the model's text in one text block, in Anthropic's events,
    read on the wire and by Anthropic's SDK."""
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "max_tokens": 12,
        "temperature": 0,
        "system": "Answer in one word.",
        "messages": [{"role": "user", "content": SHORT_PROMPT}],
    }
    answer = requests.post(
        f"{server.url}/v1/messages",
        json={**body, "stream": True},
        headers={"anthropic-version": "2023-06-01"},
        timeout=60,
    )
    assert answer.status_code == 200
    events = parse_events(answer.content)
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    text = "".join(e["data"]["delta"]["text"] for e in events[2:-3])
    assert text.strip()
    stop = events[-2]["data"]["delta"]["stop_reason"]
    assert stop in ("end_turn", "max_tokens")
    status = requests.get(f"{server.url}/stages/{answer.headers['X-Stage-Id']}", timeout=5)
    assert status.json()["text"] == text

    # The newest SDK names no temperature: clients send it as its extra_body.
    params = {k: v for k, v in body.items() if k != "temperature"}
    params["extra_body"] = {"temperature": 0}
    *streamed, final = anthropic_sdk.run(server.url, "stream", params)
    [block] = final.value["content"]
    assert block["type"] == "text" and block["text"].strip()
    assert block["text"] == "".join(e.value["text"] for e in streamed if e.value["type"] == "text")
    assert final.value["stop_reason"] in ("end_turn", "max_tokens")


def test_client_disconnect_stops_the_model(server: Gunicorn, model_server: ModelServer) -> None:
    pid = model_server.proc.pid
    stream = post_chat(
        server.url,
        stage_id="llm-leave",
        model_name=MODEL_NAME,
        user_prompt=LONG_PROMPT,
        temperature=0,
        max_tokens=3000,
        open=True,
    )
    stream.read_until(b"event: chat_completion_chunk", count=20)
    busy_from = cpu_seconds(pid)
    stream.read_until(b"event: chat_completion_chunk", count=40)
    assert cpu_seconds(pid) > busy_from  # the model was generating when the client left
    stream.close()

    # The model stops once its server sees stageserver's upstream connection close. At
    # ~60 tokens/s, 3000 tokens would keep it busy for most of a minute; idle means it
    # spent under 10% of one core over a 0.3 s window.
    deadline = time.monotonic() + 5
    idle = False
    while not idle and time.monotonic() < deadline:
        before = cpu_seconds(pid)
        time.sleep(0.3)
        idle = cpu_seconds(pid) - before < 0.03
    assert idle, "the model server still burns CPU 5 s after the client left"

    status = requests.get(f"{server.url}/stages/llm-leave", timeout=5).json()
    assert status["status"] == "cancelled"
    assert "Disconnected from client" in model_server.log()


# -- the launcher ----------------------------------------------------------------------


class Serve:
    """``python -m stageserver serve`` as a user runs it; stdout and stderr go to files."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.port = free_port()
        logs = ROOT / ".pytest_cache"
        logs.mkdir(exist_ok=True)
        self.out_path = logs / f"serve-{self.port}.out"
        self.err_path = logs / f"serve-{self.port}.err"
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("STAGESERVER_")},
            "STAGESERVER_BIND": f"127.0.0.1:{self.port}",
            **env,
        }
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stageserver", "serve"],
                cwd=ROOT,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_ready(self) -> tuple[str, str]:
        """The URL and the curl line from the ready message."""
        deadline = time.monotonic() + 120
        while "Ctrl-C stops everything." not in self.out():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"serve did not get ready:\n{self.out()}\n{self.err()}")
            time.sleep(0.1)
        lines = self.out().splitlines()
        url = next(line for line in lines if line.startswith("stageserver is ready: "))
        curl = next(line.strip() for line in lines if line.strip().startswith("curl "))
        return url.removeprefix("stageserver is ready: "), curl

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"serve did not exit:\n{self.err()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # its children get SIGTERM from the kernel (PR_SET_PDEATHSIG)
            self.proc.wait()


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every process below ``pid``."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rpartition(")")[2].split()[1])
            except OSError:
                continue
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                found[child] = cmdline(child)
                frontier.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def model_servers(processes: Mapping[int, str]) -> list[int]:
    return [pid for pid, cmd in processes.items() if "llama_cpp.server" in cmd]


def send_curl_line(curl: str) -> requests.Response:
    """Do what the printed curl line does."""
    argv = shlex.split(curl)
    assert argv[:2] == ["curl", "-N"]
    url = next(arg for arg in argv if arg.startswith("http://"))
    header = argv[argv.index("-H") + 1]
    name, _, value = header.partition(": ")
    data = argv[argv.index("-d") + 1]
    return requests.post(url, data=data.encode(), headers={name: value}, timeout=60)


def test_serve_starts_the_model_and_stageserver_and_sigterm_stops_both() -> None:
    model_port = free_port()
    serve = Serve({"STAGESERVER_EMBEDDED_MODEL_PORT": str(model_port)})
    try:
        url, curl = serve.wait_ready()
        assert url == f"http://127.0.0.1:{serve.port}"
        processes = descendants(serve.proc.pid)
        (model_pid,) = model_servers(processes)
        assert f"--port {model_port}" in processes[model_pid]
        assert any("gunicorn" in cmd for cmd in processes.values())

        response = send_curl_line(curl)
        assert response.status_code == 200
        events = parse_events(response.content)
        assert events[-1]["event"] == "done"
        assert chunk_text(events).strip()

        # The openai SDK line it prints, run as printed: the model answers through /v1.
        sdk = next(line.strip() for line in serve.out().splitlines() if "OpenAI(" in line)
        completion = eval(sdk, {"OpenAI": OpenAI})  # noqa: S307 - our own printed line
        assert completion.object == "chat.completion"
        assert completion.choices[0].message.content.strip()

        serve.proc.send_signal(signal.SIGTERM)
        assert serve.wait() == 0
    finally:
        serve.stop()
    assert not [pid for pid in processes if alive(pid)], processes
    assert "stageserver: stopped" in serve.err()


def test_serve_stops_stageserver_when_the_model_server_dies() -> None:
    serve = Serve({"STAGESERVER_EMBEDDED_MODEL_PORT": str(free_port())})
    try:
        serve.wait_ready()
        processes = descendants(serve.proc.pid)
        (model_pid,) = model_servers(processes)
        os.kill(model_pid, signal.SIGKILL)
        assert serve.wait() == 1
    finally:
        serve.stop()
    assert not [pid for pid in processes if alive(pid)], processes
    assert f"the embedded model server (pid {model_pid}) was killed by signal 9" in serve.err()


@pytest.mark.parametrize("which", ["STAGESERVER_BIND", "STAGESERVER_EMBEDDED_MODEL_PORT"])
def test_serve_says_which_port_is_taken(which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"STAGESERVER_EMBEDDED_MODEL_PORT": str(free_port())}
        env[which] = f"127.0.0.1:{port}" if which == "STAGESERVER_BIND" else str(port)
        serve = Serve(env)
        try:
            assert serve.wait() == 1
        finally:
            serve.stop()
    assert (
        f"stageserver: port {port} on 127.0.0.1 is already in use ({which}); stop what is "
        f"listening there or set {which} to another port\n"
    ) == serve.err()


def test_serve_reports_a_missing_model_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    serve = Serve(
        {
            "STAGESERVER_EMBEDDED_MODEL_PATH": str(missing),
            "STAGESERVER_EMBEDDED_MODEL_PORT": str(free_port()),
        }
    )
    try:
        assert serve.wait() == 1
    finally:
        serve.stop()
    assert f"the embedded model file {missing} is missing" in serve.err()
    assert "starting" not in serve.err()


def test_serve_with_a_configured_upstream_starts_no_model(upstream: FakeUpstream) -> None:
    fake = upstream
    # The model's port is taken: had serve tried to start the model, it would have failed.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        serve = Serve(
            {
                "STAGESERVER_UPSTREAM_URL": fake.url,
                "STAGESERVER_EMBEDDED_MODEL_PORT": str(taken.getsockname()[1]),
            }
        )
        try:
            url, curl = serve.wait_ready()
            processes = descendants(serve.proc.pid)
            assert processes and not model_servers(processes)
            assert "MODEL" in curl
            response = post_chat(url, stage_id="via-fake", stream=False)
            assert response.json()["text"] == "tok0 tok1 tok2 tok3 tok4 "
            assert len(fake.requests) == 1
            serve.proc.send_signal(signal.SIGTERM)
            assert serve.wait() == 0
        finally:
            serve.stop()
    assert not [pid for pid in processes if alive(pid)], processes
    assert "embedded model" not in serve.err()
    assert f"upstream: 'default' at {fake.url}" in serve.out()


def test_auto_finds_that_the_embedded_server_cannot_continue_a_chat_message(
    server: Gunicorn, model_server: ModelServer
) -> None:
    """llama-cpp-python answers a trailing assistant message, with or without vLLM's
    flags, by closing the turn and starting a new answer (continuation.md, b1/b2). A
    kind-``llamacpp`` upstream in ``auto`` probes ``/apply-template``, which it lacks: its
    mode is ``none``. Should an upgrade teach it prefill, this contract breaks loudly."""
    report = requests.get(f"{server.url}/readyz", timeout=10).json()["upstreams"]["default"]
    assert report["continuation"]["mode"] == "none"
    assert report["continuation"]["source"] == "probed"
    client = OpenAI(base_url=model_server.url, api_key="none")
    messages: list[Any] = [
        {"role": "user", "content": "Count from one to twenty in words."},
        {"role": "assistant", "content": "123456789012"},
    ]
    plain = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, temperature=0, max_tokens=24
    )
    flagged = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, temperature=0, max_tokens=24,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )  # fmt: skip
    assert flagged.choices[0].message.content == plain.choices[0].message.content
    assert flagged.usage is not None and plain.usage is not None
    assert flagged.usage.prompt_tokens == plain.usage.prompt_tokens  # the turn is closed


def test_a_host_killed_mid_answer_is_continued_raw_from_the_durable_prefix(
    model_server: ModelServer,
) -> None:
    """Two hosts on one Redis, the embedded model in ``raw`` mode (the GGUF's template,
    ``/v1/completions``). The host that runs the stage is killed after some chunks: the
    other takes the stage over and continues it. The answer is not compared with an
    uninterrupted one: a cold prefill may branch at a near-tie (continuation.md, C)."""
    redis = RedisServer()
    env = {
        "STAGESERVER_UPSTREAM_URL": model_server.url,
        "STAGESERVER_UPSTREAM_KIND": "llamacpp",
        "STAGESERVER_UPSTREAM_CONTINUATION": "raw",
        "STAGESERVER_UPSTREAM_CHAT_TEMPLATE": str(default_model_path()),
        "STAGESERVER_STORE_URL": redis.url,
        "STAGESERVER_OWNER_LEASE_SECONDS": "2",
    }
    try:
        with gunicorn_server(env) as survivor:
            doomed = Gunicorn(env)
            try:
                stream = post_chat(
                    doomed.url, stage_id="llm-raw", model_name=MODEL_NAME,
                    user_prompt=LONG_PROMPT, temperature=0, max_tokens=80, resumable=True,
                    open=True, timeout=60,
                )  # fmt: skip
                stream.read_until(b"event: chat_completion_chunk", 12)
                for pid in [*doomed.worker_pids(), doomed.proc.pid]:
                    os.kill(pid, signal.SIGKILL)
            finally:
                doomed.stop()
            seen = stream.events()
            stream.close()  # its host is gone: drop the connection, rather than leave it
            last_id = [e for e in seen if "id" in e][-1]["id"]
            rest = parse_events(
                requests.get(
                    f"{survivor.url}/stages/llm-raw/events",
                    headers={"Last-Event-ID": last_id},
                    timeout=120,
                ).content
            )
            status = requests.get(f"{survivor.url}/stages/llm-raw", timeout=10).json()
    finally:
        redis.stop()
    before, after = chunk_text(seen), chunk_text(rest)
    continued = [e for e in rest if e.get("event") == "continued"]
    assert [e["data"]["reason"] for e in continued] == ["owner_lost"]
    assert continued[0]["data"]["mode"] == "raw"
    assert rest[-1]["event"] == "done"
    text = before + after
    assert before.strip() and after.strip()
    assert "\ufffd" not in text
    # The continuation went on from the prefix, rather than starting the answer again.
    assert not after.lstrip().startswith(before.lstrip()[:20])
    assert status["status"] == "done"
    assert status["text"] == text  # the durable prefix, then the continuation
    [record] = status["continuations"]
    assert record["mode"] == "raw" and record["outcome"] == "ok"
    assert record["after"] >= int(last_id.rpartition("-")[2])  # the client was not ahead
