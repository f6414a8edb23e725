"""Quick tests of the fake OpenAI-compatible upstream, over real sockets."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

import pytest
import requests

from testing.fake_upstream import FakeUpstream
from testing.servers import ROOT


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


def _chat_request(
    model: str, *, stream: bool = True, path: str = "/v1/chat/completions", **extra: Any
) -> bytes:
    body = json.dumps({"model": model, "stream": stream, "messages": [], **extra}).encode()
    head = (
        f"POST {path} HTTP/1.1\r\n"
        "Host: fake\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _read_head(f: BinaryIO) -> tuple[int, dict[str, str]]:
    status_line = f.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


def _read_chunks(f: BinaryIO) -> tuple[list[bytes], bool]:
    """HTTP chunks until the terminating one; the flag says whether it arrived."""
    chunks: list[bytes] = []
    while True:
        size_line = f.readline()
        if not size_line:
            return chunks, False
        size = int(size_line.strip(), 16)
        data = f.read(size + 2)
        if size == 0:
            return chunks, data == b"\r\n"
        if len(data) < size + 2:
            chunks.append(data)
            return chunks, False
        assert data.endswith(b"\r\n")
        chunks.append(data[:-2])


def _stream(
    port: int, model: str, *, path: str = "/v1/chat/completions", **extra: Any
) -> tuple[dict[str, str], list[bytes], bool]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(_chat_request(model, path=path, **extra))
        with sock.makefile("rb") as f:
            status, headers = _read_head(f)
            assert status == 200
            chunks, complete = _read_chunks(f)
    return headers, chunks, complete


def _expected_events(index: int, created: int, pieces: list[str], finish: str) -> list[bytes]:
    prefix = (
        f'{{"id":"chatcmpl-fake-{index}","object":"chat.completion.chunk",'
        f'"created":{created},"model":"fake","choices":'
    )
    events = []
    for i, piece in enumerate(pieces):
        role = '"role":"assistant",' if i == 0 else ""
        content = json.dumps(piece, ensure_ascii=False)
        delta = f'{{{role}"content":{content}}}'
        events.append(f'{prefix}[{{"index":0,"delta":{delta},"finish_reason":null}}]}}')
    events.append(f'{prefix}[{{"index":0,"delta":{{}},"finish_reason":"{finish}"}}]}}')
    events.append("[DONE]")
    return [f"data: {event}\n\n".encode() for event in events]


def _created(event: bytes) -> int:
    obj = json.loads(event.removeprefix(b"data: "))
    assert isinstance(obj, dict)
    return int(obj["created"])


def test_normal_stream_exact_bytes(fake: FakeUpstream) -> None:
    headers, chunks, complete = _stream(fake.port, "fake?chunks=2")
    assert complete
    assert headers["content-type"] == "text/event-stream"
    assert headers["transfer-encoding"] == "chunked"
    rec = fake.requests[0]
    expected = _expected_events(rec.index, _created(chunks[0]), ["tok0 ", "tok1 "], "stop")
    assert chunks == expected  # one SSE event per HTTP chunk
    assert fake.wait_for(lambda: rec.finished_at is not None)
    assert (rec.chunks_sent, rec.done_sent, rec.client_closed_at) == (2, True, None)
    assert rec.model == "fake" and rec.options["chunks"] == 2 and rec.stream


def test_usage_chunk_and_max_tokens(fake: FakeUpstream) -> None:
    messages = [{"role": "user", "content": "three word prompt"}]
    _, chunks, complete = _stream(
        fake.port,
        "fake?chunks=4",
        messages=messages,
        max_tokens=3,
        stream_options={"include_usage": True},
    )
    assert complete
    assert chunks[-1] == b"data: [DONE]\n\n"
    usage = json.loads(chunks[-2].removeprefix(b"data: "))
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    finish = json.loads(chunks[-3].removeprefix(b"data: "))
    assert finish["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}


def test_keep_alive_reuses_connection(fake: FakeUpstream) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    try:
        for _ in range(2):
            conn.request(
                "POST", "/v1/chat/completions", _chat_request("fake").split(b"\r\n\r\n")[1]
            )
            resp = conn.getresponse()
            assert resp.status == 200
            assert b"data: [DONE]\n\n" in resp.read()
        conn.request("GET", "/health")
        resp = conn.getresponse()
        assert (resp.status, json.loads(resp.read())) == (200, {"status": "ok"})
    finally:
        conn.close()
    assert [r.connection_id for r in fake.requests] == [fake.requests[0].connection_id] * 3
    assert fake.connections_opened == 1


def test_open_connections_are_counted_until_closed(fake: FakeUpstream) -> None:
    fake.reset()
    kept = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    asking = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    try:
        kept.request("POST", "/v1/chat/completions", _chat_request("fake").split(b"\r\n\r\n")[1])
        kept.getresponse().read()  # answered; the connection stays open, idle
        assert fake.open_connections == 1
        asking.request("GET", "/_fake/connections")  # the asking connection is not counted
        assert json.loads(asking.getresponse().read()) == {"open": 1, "opened": 2}
    finally:
        kept.close()
        asking.close()
    assert fake.wait_for(lambda: fake.open_connections == 0)


def test_status_mode(fake: FakeUpstream) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    try:
        body = json.dumps({"model": "fake?mode=status&status=503", "stream": True})
        conn.request("POST", "/v1/chat/completions", body)
        resp = conn.getresponse()
        assert resp.status == 503
        assert resp.getheader("Content-Type") == "application/json"
        error = json.loads(resp.read())["error"]
        assert error == {"message": "fake upstream failure", "type": "server_error", "code": 503}
    finally:
        conn.close()


@pytest.mark.parametrize("retry_after", ["2", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_status_mode_sends_retry_after(fake: FakeUpstream, retry_after: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    try:
        options = {"mode": "status", "status": 429, "retry_after": retry_after}
        query = urllib.parse.urlencode(options)
        conn.request("POST", "/v1/chat/completions", json.dumps({"model": f"fake?{query}"}))
        resp = conn.getresponse()
        assert (resp.status, resp.getheader("Retry-After")) == (429, retry_after)
        assert json.loads(resp.read())["error"]["code"] == 429
        # Without the option, no Retry-After; server-wide defaults work the same way.
        fake.defaults.update({"mode": "status", "status": "503"})
        conn.request("POST", "/v1/chat/completions", json.dumps({"model": "fake"}))
        resp = conn.getresponse()
        assert (resp.status, resp.getheader("Retry-After")) == (503, None)
        resp.read()
    finally:
        conn.close()


def test_drop_closes_mid_body(fake: FakeUpstream) -> None:
    _, chunks, complete = _stream(fake.port, "fake?mode=drop&after=1&chunks=3")
    assert not complete
    assert len(chunks) == 1 and b'"content":"tok0 "' in chunks[0]
    rec = fake.requests[0]
    assert fake.wait_for(lambda: rec.finished_at is not None)
    assert (rec.chunks_sent, rec.done_sent, rec.client_closed_at) == (1, False, None)


def test_client_close_during_prefill_is_noticed(fake: FakeUpstream) -> None:
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as sock:
        sock.sendall(_chat_request("fake?prefill=5"))
        with sock.makefile("rb") as f:
            status, _ = _read_head(f)  # headers_first=1: the head comes before the prefill
        assert status == 200
    closed = time.monotonic()
    rec = fake.requests[0]
    assert fake.wait_for(lambda: rec.client_closed_at is not None, timeout=0.5)
    assert rec.client_closed_at is not None and rec.client_closed_at - closed < 0.5
    assert fake.wait_for(lambda: rec.finished_at is not None, timeout=0.5)
    assert rec.chunks_sent == 0 and not rec.done_sent


def test_split_delivers_multibyte_text(fake: FakeUpstream) -> None:
    _, chunks, complete = _stream(fake.port, "fake?text=%C3%A9&split=1&crlf=1")
    assert complete
    assert any(chunk.endswith(b"\xc3") for chunk in chunks)  # cut inside the character
    assert any(chunk.endswith(b"\r") for chunk in chunks)  # cut between CR and LF
    body = b"".join(chunks)
    events = [e for e in body.split(b"\r\n\r\n") if e]
    assert len(chunks) > len(events) == 3
    assert json.loads(events[0].removeprefix(b"data: "))["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "é",
    }
    expected = _expected_events(fake.requests[0].index, _created(events[0]), ["é"], "stop")
    assert body == b"".join(expected).replace(b"\n", b"\r\n")


def test_gzip_body(fake: FakeUpstream) -> None:
    headers, chunks, complete = _stream(fake.port, "fake?gzip=1&chunks=2")
    assert complete
    assert headers["content-encoding"] == "gzip"
    decoder = zlib.decompressobj(wbits=31)
    events = [decoder.decompress(chunk) for chunk in chunks]  # each flush is decodable
    assert decoder.eof
    body = b"".join(events)
    expected = _expected_events(
        fake.requests[0].index, _created(events[0]), ["tok0 ", "tok1 "], "stop"
    )
    assert body == b"".join(expected)
    assert events[:3] == expected[:3]


@pytest.mark.processes
def test_runs_as_a_process() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "testing.fake_upstream", "--port", "0", "--default", "chunks=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY http://127.0.0.1:")
        port = int(line.strip().rsplit(":", 1)[1].removesuffix("/v1"))
        _, chunks, complete = _stream(port, "fake")
        assert complete and len(chunks) == 3
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/_fake/requests")
            records = json.loads(conn.getresponse().read())
            assert [(r["path"], r["chunks_sent"]) for r in records] == [("/v1/chat/completions", 1)]
            conn.request("POST", "/_fake/reset")
            assert conn.getresponse().read() == b'{"status":"ok"}'
            conn.request("GET", "/_fake/requests")
            assert json.loads(conn.getresponse().read()) == []
        finally:
            conn.close()
        proc.terminate()
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_tool_calls_stream_as_deltas_then_whole(fake: FakeUpstream) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    _, chunks, complete = _stream(
        fake.port,
        'fake?tool_calls=2&chunks=2&tool_args={"a":1}',
        tools=tools,
        stream_options={"include_usage": True},
    )
    assert complete
    events = [json.loads(chunk.removeprefix(b"data: ")) for chunk in chunks[:-1]]
    assert chunks[-1] == b"data: [DONE]\n\n"
    index = fake.requests[0].index
    deltas = [e["choices"][0]["delta"] for e in events[:-2]]
    assert deltas == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "index": 0,
                    "id": f"call_fake_{index}_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ],
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"a'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '":1}'}}]},
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": f"call_fake_{index}_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 1, "function": {"arguments": '{"a'}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": '":1}'}}]},
    ]
    assert events[-2]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]
    assert events[-1]["usage"] == {"prompt_tokens": 0, "completion_tokens": 6, "total_tokens": 6}
    assert fake.requests[0].chunks_sent == 6

    # Not streamed, and without tools in the request: the calls whole, named by index.
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    try:
        body = json.dumps({"model": "fake?tool_calls=1", "messages": []})
        conn.request("POST", "/v1/chat/completions", body)
        completion = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    assert completion["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"call_fake_{fake.requests[1].index}_0",
                        "type": "function",
                        "function": {"name": "tool0", "arguments": '{"city":"Paris","call":0}'},
                    }
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ]


def test_tool_calls_until_result_answers_a_tool_result_with_text(fake: FakeUpstream) -> None:
    tools: list[Any] = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    model = "fake?tool_calls=1&tool_calls_until_result=1&chunks=2&text=Sunny."
    asked: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    first = requests.post(
        f"{fake.url}/chat/completions",
        json={"model": model, "messages": asked, "tools": tools},
        timeout=10,
    ).json()["choices"][0]
    call = first["message"]["tool_calls"][0]
    assert (first["finish_reason"], call["function"]["name"]) == ("tool_calls", "get_weather")

    # The call and its result sent back: the answer is the text, streamed as usual.
    answered: list[Any] = [
        *asked,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
    ]
    _, chunks, complete = _stream(fake.port, model, messages=answered, tools=tools)
    assert complete
    created = _created(chunks[0])
    assert chunks == _expected_events(fake.requests[1].index, created, ["Sun", "ny."], "stop")

    # Without the option, a tool's result is answered with calls again (the old behaviour).
    again = requests.post(
        f"{fake.url}/chat/completions",
        json={"model": "fake?tool_calls=1", "messages": answered, "tools": tools},
        timeout=10,
    ).json()["choices"][0]
    assert again["finish_reason"] == "tool_calls"
    assert [r.options["tool_calls_until_result"] for r in fake.requests] == [True, True, False]


# -- continuing a partial answer (how each server takes one) ------------------------------

ANSWER = "The quick brown fox jumps"  # 5 chunks of 5 characters
PARTIAL = "The quick"  # ends inside the second chunk
FLAGS = {"continue_final_message": True, "add_generation_prompt": False}  # vLLM's


def _complete(fake: FakeUpstream, mode: str, last: dict[str, Any], **extra: Any) -> str:
    body = {
        "model": f"fake?chunks=5&text={urllib.parse.quote(ANSWER)}&continuation={mode}",
        "messages": [{"role": "user", "content": "Go on."}, {"role": "assistant", **last}],
        **extra,
    }
    answer = requests.post(f"{fake.url}/chat/completions", json=body, timeout=10)
    assert answer.status_code == 200, answer.text
    # The record is complete (chunks_sent) once the handler returns, just after the send.
    record = fake.requests[-1]
    assert fake.wait_for(lambda: record.finished_at is not None)
    content: str = answer.json()["choices"][0]["message"]["content"]
    return content


@pytest.mark.parametrize(
    ("mode", "last", "extra", "reply"),
    [
        ("flag", {}, FLAGS, " brown fox jumps"),
        ("flag", {}, {"continue_final_message": True}, ANSWER),  # vLLM: 400; here a new answer
        ("flag", {}, {}, ANSWER),
        ("trailing", {}, {}, " brown fox jumps"),
        ("prefix", {"prefix": True}, {}, ANSWER),  # the prefix echoed, then the rest
        ("prefix", {}, {}, ANSWER),
        ("restart", {}, FLAGS, ANSWER),
        ("", {}, {}, ANSWER),
    ],
)  # fmt: skip
def test_each_way_of_continuing_a_partial_answer(
    fake: FakeUpstream, mode: str, last: dict[str, Any], extra: dict[str, Any], reply: str
) -> None:
    assert _complete(fake, mode, {"content": PARTIAL, **last}, **extra) == reply
    assert fake.requests[-1].body["messages"][-1]["content"] == PARTIAL  # recorded as sent


def test_a_continuation_is_cut_at_the_answers_chunks_and_bounded_by_its_budget(
    fake: FakeUpstream,
) -> None:
    assert _complete(fake, "trailing", {"content": "The q"}) == "uick brown fox jumps"
    assert _complete(fake, "trailing", {"content": PARTIAL}, max_tokens=2) == " brown"
    # A partial answer that is not the answer's beginning: the answer, from the start.
    assert _complete(fake, "trailing", {"content": "Once upon"}) == ANSWER
    # Mistral's echo is the partial answer then the rest: 4 chunks, not a restart's 5.
    assert _complete(fake, "prefix", {"content": PARTIAL, "prefix": True}) == ANSWER
    echoed = fake.requests[-1].chunks_sent
    assert _complete(fake, "restart", {"content": PARTIAL}) == ANSWER
    assert (echoed, fake.requests[-1].chunks_sent) == (4, 5)


def test_a_raw_completion_continues_an_open_chatml_turn(fake: FakeUpstream) -> None:
    prompt = f"<|im_start|>user\nGo on.<|im_end|>\n<|im_start|>assistant\n{PARTIAL}"
    body: dict[str, Any] = {
        "model": f"fake?chunks=5&text={urllib.parse.quote(ANSWER)}",
        "prompt": prompt,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    answer = requests.post(f"{fake.url}/completions", json=body, timeout=10)
    assert answer.status_code == 200
    blocks = [b.removeprefix("data: ") for b in answer.text.split("\n\n") if b]
    assert blocks[-1] == "[DONE]"
    chunks = [json.loads(b) for b in blocks[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(texts) == " brown fox jumps"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert fake.requests[-1].body["prompt"] == prompt
    closed = prompt.replace(f"assistant\n{PARTIAL}", "assistant\nDone.<|im_end|>\n")
    refused = requests.post(f"{fake.url}/completions", json={**body, "prompt": closed}, timeout=10)
    assert refused.status_code == 400


def test_stall_goes_silent_after_some_chunks_and_keeps_the_connection(
    fake: FakeUpstream,
) -> None:
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as sock:
        sock.sendall(_chat_request("fake?mode=stall&after=2&chunks=5"))
        f = sock.makefile("rb")
        status, _ = _read_head(f)
        assert status == 200
        sock.settimeout(0.5)
        lines = []
        with pytest.raises(TimeoutError):
            while True:
                lines.append(f.readline())
        data = [line for line in lines if line.startswith(b"data: ")]
        assert len(data) == 2  # two chunks, then nothing, the connection open
    assert fake.requests[-1].chunks_sent == 2


# -- faults at a position in the answer, and a refused continuation ----------------------

SIXTY = [f"tok{i} " for i in range(60)]  # the default answer of chunks=60
QUESTION = {"role": "user", "content": "Go on."}


def _text_of(chunks: list[bytes]) -> str:
    """The content a stream delivered: each chat delta's, or each completion's text."""
    text = ""
    for chunk in chunks:
        payload = chunk.removeprefix(b"data: ").strip()
        if payload in (b"[DONE]", b"") or not payload.startswith(b"{"):
            continue
        for choice in json.loads(payload)["choices"]:
            text += choice.get("delta", {}).get("content") or choice.get("text") or ""
    return text


def _continued(port: int, model: str, partial: str) -> tuple[str, bool]:
    """A chat continuation of ``partial`` (a trailing assistant message): text, complete."""
    messages = [QUESTION, {"role": "assistant", "content": partial}]
    _, chunks, complete = _stream(port, model, messages=messages)
    return _text_of(chunks), complete


def _raw(port: int, model: str, partial: str) -> tuple[str, bool]:
    """A raw completion of an open ChatML turn holding ``partial``: text, complete."""
    prompt = f"<|im_start|>user\nGo on.<|im_end|>\n<|im_start|>assistant\n{partial}"
    _, chunks, complete = _stream(port, model, path="/v1/completions", prompt=prompt)
    return _text_of(chunks), complete


def test_a_fault_comes_at_its_place_in_the_answer_not_in_each_reply(
    fake: FakeUpstream,
) -> None:
    model = "fake?chunks=60&mode=drop&after=20&continuation=trailing"
    _, chunks, complete = _stream(fake.port, model, messages=[QUESTION])
    delivered = _text_of(chunks)
    assert not complete and delivered == "".join(SIXTY[:20])
    # Continued from what was delivered, by chat or raw: the rest, not dropped again.
    assert _continued(fake.port, model, delivered) == ("".join(SIXTY[20:]), True)
    assert _raw(fake.port, "fake?chunks=60&mode=drop&after=20", delivered) == (
        "".join(SIXTY[20:]),
        True,
    )
    assert fake.requests[-1].chunks_sent == 40
    # A fault further on comes after the pieces between: 25 - 20 = 5 of this reply.
    later = "fake?chunks=60&mode=drop&after=25&continuation=trailing"
    assert _continued(fake.port, later, delivered) == ("".join(SIXTY[20:25]), False)
    assert _raw(fake.port, "fake?chunks=60&mode=drop&after=25", delivered) == (
        "".join(SIXTY[20:25]),
        False,
    )
    # A piece cut by the partial answer is not held by it: "tok0 tok1 to" holds 2, so a
    # fault after 3 pieces of the answer comes after 1 of the reply, the rest of "tok2 ".
    cut = "fake?chunks=60&mode=stall&after=3&continuation=trailing"
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as sock:
        messages = [QUESTION, {"role": "assistant", "content": "tok0 tok1 to"}]
        sock.sendall(_chat_request(cut, messages=messages))
        assert fake.wait_for(lambda: fake.requests[-1].chunks_sent == 1)
        time.sleep(0.05)  # stalled: no second chunk comes
        assert fake.requests[-1].chunks_sent == 1
    # A request that continues nothing still counts from its own start.
    _, chunks, complete = _stream(fake.port, later, messages=[QUESTION])
    assert (_text_of(chunks), complete) == ("".join(SIXTY[:25]), False)
    # Without the option, a trailing message is a closed turn: a new answer, cut at 20.
    closed = "fake?chunks=60&mode=drop&after=20"
    assert _continued(fake.port, closed, delivered) == (delivered, False)


def test_continued_status_refuses_only_a_continuation(fake: FakeUpstream) -> None:
    model = "fake?chunks=4&continuation=trailing&continued_status=503&retry_after=1"
    messages = [QUESTION, {"role": "assistant", "content": "tok0 "}]
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
    refused = requests.post(f"{fake.url}/chat/completions", json=body, timeout=10)
    assert (refused.status_code, refused.headers["Retry-After"]) == (503, "1")
    assert refused.json() == {
        "error": {"message": "fake upstream failure", "type": "server_error", "code": 503}
    }
    # The same request without the partial answer continues nothing: answered.
    fresh = requests.post(
        f"{fake.url}/chat/completions", json={**body, "messages": [QUESTION]}, timeout=10
    )
    assert fresh.status_code == 200 and fresh.text.endswith("data: [DONE]\n\n")
    # A raw completion of an open turn is a continuation too, with the server's default.
    fake.defaults["continued_status"] = "502"
    prompt = "<|im_start|>user\nGo on.<|im_end|>\n<|im_start|>assistant\ntok0 "
    raw = requests.post(
        f"{fake.url}/completions", json={"model": "fake", "prompt": prompt}, timeout=10
    )
    assert raw.status_code == 502 and raw.json()["error"]["code"] == 502
    # A server that takes the message as a closed turn continues nothing: answered.
    closed = {**body, "model": "fake?continuation=restart", "stream": False}
    answer = requests.post(f"{fake.url}/chat/completions", json=closed, timeout=10)
    assert answer.status_code == 200
    assert [r.status for r in fake.requests] == [503, 200, 502, 200]
    bad = {**body, "model": "fake?continued_status=99"}
    assert requests.post(f"{fake.url}/chat/completions", json=bad, timeout=10).status_code == 400


# -- the render probes: llama-server, vLLM, Ollama ---------------------------------------

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Count."},
    {"role": "assistant", "content": "one two"},
]
HEAD = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCount.<|im_end|>\n"
OPEN = HEAD + "<|im_start|>assistant\none two"  # the turn left open: a continuation
CLOSED = OPEN + "<|im_end|>\n"  # the turn closed: a new answer follows
GENERATE = "<|im_start|>assistant\n"


def _post(fake: FakeUpstream, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    answer = requests.post(f"{fake.base}{path}", json=body, timeout=10)
    assert answer.headers["Content-Type"] == "application/json"
    return answer.status_code, answer.json()


def test_apply_template_prefills_as_llama_server_does_by_default(fake: FakeUpstream) -> None:
    assert _post(fake, "/apply-template", {"messages": CHAT}) == (
        200,
        {"prompt": CLOSED + GENERATE},
    )
    fake.defaults["continuation"] = "trailing"  # llama-server since PR #13174
    assert _post(fake, "/apply-template", {"messages": CHAT}) == (200, {"prompt": OPEN})
    # Only a final assistant message is prefilled; a model's query wins over the defaults.
    assert _post(fake, "/apply-template", {"messages": CHAT[:2]}) == (
        200,
        {"prompt": HEAD + GENERATE},
    )
    overridden = {"model": "fake?continuation=restart", "messages": CHAT}
    assert _post(fake, "/apply-template", overridden) == (200, {"prompt": CLOSED + GENERATE})
    status, error = _post(fake, "/apply-template", {"messages": "hello"})
    assert status == 400 and error["error"]["message"] == "'messages' must be a list"
    assert [(r.path, r.status) for r in fake.requests] == [("/apply-template", 200)] * 4 + [
        ("/apply-template", 400)
    ]
    assert fake.requests[3].options["continuation"] == "restart"


def test_tokenize_leaves_the_turn_open_only_with_vllms_flags(fake: FakeUpstream) -> None:
    flags = {"continue_final_message": True, "add_generation_prompt": False}

    def rendered(model: str, **extra: Any) -> str:
        status, answer = _post(fake, "/tokenize", {"model": model, "messages": CHAT, **extra})
        assert status == 200, answer
        assert answer["count"] == len(answer["tokens"]) and answer["max_model_len"] == 8192
        return "".join(map(chr, answer["tokens"]))

    assert rendered("fake?continuation=flag", **flags) == OPEN
    assert rendered("fake?continuation=flag") == CLOSED + GENERATE  # vLLM's defaults
    assert rendered("fake?continuation=flag", add_generation_prompt=False) == CLOSED
    assert rendered("fake?continuation=restart", **flags) == CLOSED  # the flags ignored
    assert rendered("fake?continuation=trailing", **flags) == CLOSED
    fake.defaults["continuation"] = "flag"
    assert rendered("fake", **flags) == OPEN
    # Both flags true: vLLM's 400, which is why the flag alone is not enough.
    status, error = _post(
        fake, "/tokenize", {"model": "fake", "messages": CHAT, "continue_final_message": True}
    )
    assert status == 400
    assert error["error"]["message"] == (
        "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
    )
    # A plain prompt, and the way back.
    status, answer = _post(fake, "/tokenize", {"model": "fake", "prompt": "héllo"})
    assert (status, answer["tokens"]) == (200, [104, 233, 108, 108, 111])
    status, answer = _post(fake, "/detokenize", {"model": "fake", "tokens": answer["tokens"]})
    assert (status, answer) == (200, {"prompt": "héllo"})
    assert _post(fake, "/detokenize", {"model": "fake", "tokens": [0xD800]})[0] == 400
    # vLLM serves them at the root, not under /v1.
    assert _post(fake, "/v1/tokenize", {"model": "fake", "prompt": "x"})[0] == 404
    assert [r.path for r in fake.requests][-4:] == [
        "/tokenize",
        "/detokenize",
        "/detokenize",
        "/v1/tokenize",
    ]


def test_ollama_renders_only_and_leaves_a_trailing_answer_open(fake: FakeUpstream) -> None:
    body = {"model": "fake?continuation=trailing", "messages": CHAT, "_debug_render_only": True}
    status, answer = _post(fake, "/api/chat", body)
    assert status == 200
    created = answer.pop("created_at")
    assert answer == {
        "model": "fake?continuation=trailing",
        "message": {"role": "", "content": ""},
        "done": False,
        "_debug_info": {"rendered_template": OPEN},
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z", created), created
    # A template that closes every message: a new answer.
    closing = {**body, "model": "fake"}
    assert _post(fake, "/api/chat", closing)[1]["_debug_info"]["rendered_template"] == (
        CLOSED + GENERATE
    )
    # The fake generates only through the OpenAI endpoints.
    generate = {"model": "fake", "messages": CHAT}
    assert _post(fake, "/api/chat", generate) == (
        400,
        {"error": "only render-only requests are served here"},
    )
    assert [(r.path, r.status) for r in fake.requests] == [
        ("/api/chat", 200),
        ("/api/chat", 200),
        ("/api/chat", 400),
    ]
