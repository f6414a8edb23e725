"""An answer cut short after its first chunk is continued (issue 20, sections 3, 6 and 7),
on one host with the in-memory store, against the fake upstream: what each dialect's
client reads, what the upstream was asked, and what the stage's record, the metrics, the
log and the trace say.

The fake places a fault in its scripted answer (``mode=drop&after=K``: after its K-th
piece), and a request that continues a partial answer covering k of the pieces is cut
after K - k pieces of its reply, so the continuation of a cut stream is not cut again.
The default answer is 60 pieces, ``"tok0 "``, ``"tok1 "``, ...: cut after 20, the prefix
sent is ``"tok0 ... tok19"`` (the trailing space held back), with 512 - 20 tokens left.

Usage: the segment that was cut sent none (the fake sends it last), so it is estimated,
5 prompt tokens for ``"hi"`` (``testing.sse.estimated_usage``) and a completion token per
content chunk delivered; the continuation's is the fake's own, a prompt token per word of
its messages and a completion token per piece it sent. The sum says ``estimated``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from hypothesis import given, settings
from hypothesis import strategies as st

from stageserver.manager import manager_of
from testing.apps import app_client, settle
from testing.fake_upstream import FakeUpstream, UpstreamRequest
from testing.metrics import scrape, value
from testing.servers import ROOT, gunicorn_server
from testing.sse import chunk_text, parse_events, stage_status
from testing.sse import post_chat as requests_post_chat

ANSWER = "".join(f"tok{n} " for n in range(60))
PREFIX = "".join(f"tok{n} " for n in range(20)).rstrip()  # what was delivered, held back
CUT = "fake?chunks=60&mode=drop&after=20"  # the 60-piece answer, cut after 20
SHORT = "fake?chunks=6&mode=drop&after=2"  # "tok0 " ... "tok5 ", cut after 2
SHORT_ANSWER = "tok0 tok1 tok2 tok3 tok4 tok5 "
DROPPED = "peer closed connection without sending complete message body"  # httpx's words
HI = [{"role": "user", "content": "hi"}]
HI_ESTIMATE = 5  # "hi": a token, and 4 for its message (stageserver/stages/usage.py)
CHUNK = "chat_completion_chunk"
# Silence past 0.5 s is a failure. (In one process the relay runs in a thread, whose read
# cannot be interrupted: the client's read timeout bounds it instead, the larger of these.)
QUICK = {"idle_timeout": 0.5, "first_token_timeout": 1}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# -- helpers -------------------------------------------------------------------------------


def single(fake: FakeUpstream, mode: str = "trailing", **settings: object) -> dict[str, Any]:
    """An app's config: ``fake`` as the upstream ``default``, continuing in ``mode``, with
    the fake taking a trailing assistant message as a partial answer."""
    fake.defaults["continuation"] = "trailing"
    return {
        "STAGESERVER_UPSTREAM_URL": fake.url,
        "STAGESERVER_UPSTREAM_CONTINUATION": mode,
        **settings,
    }


def upstreams(specs: dict[str, Any], **settings: object) -> dict[str, Any]:
    return {"STAGESERVER_UPSTREAMS": json.dumps(specs), **settings}


def post_chat(client: FlaskClient, stage_id: str, model: str, **fields: Any) -> bytes:
    """A streamed ``POST /chat``: the whole wire."""
    body = {"stage_id": stage_id, "model_name": model, "user_prompt": "hi", "stream": True}
    response = client.post("/chat", json=body | fields)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_data()


def seed_events(wire: bytes) -> list[dict[str, Any]]:
    """The events of a seed stream, heartbeats left out."""
    return [e for e in parse_events(wire) if "comment" not in e]


def names(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events]


def chats(fake: FakeUpstream) -> list[UpstreamRequest]:
    """The chat completions the fake was asked for (not the probes, not /models)."""
    return [r for r in fake.requests if r.path.endswith("/chat/completions")]


def words(body: dict[str, Any]) -> int:
    """The prompt tokens the fake counts: the words of the messages."""
    return sum(len(m["content"].split()) for m in body["messages"])


def fake_usage(request: UpstreamRequest) -> dict[str, int]:
    """The usage the fake sent at the end of a streamed chat completion."""
    prompt, completion = words(request.body), request.chunks_sent
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def summed(delivered: int, continuation: dict[str, int]) -> dict[str, Any]:
    """The usage of an answer cut after ``delivered`` content chunks (estimated), then
    continued by a request that reported ``continuation``."""
    prompt = HI_ESTIMATE + continuation["prompt_tokens"]
    completion = delivered + continuation["completion_tokens"]
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "estimated": True,
    }


def continued_with(first: dict[str, Any], prefix: str, budget: int) -> dict[str, Any]:
    """The body of a ``trailing`` continuation of the chat request ``first``."""
    partial = {"role": "assistant", "content": prefix}
    return {**first, "messages": [*first["messages"], partial], "max_tokens": budget}


def record(**fields: Any) -> dict[str, Any]:
    """A continuation as ``GET /stages/<id>`` lists it: ``fields`` over the empty ones."""
    empty = dict.fromkeys(
        ("model", "upstream", "from_replica", "to_replica", "from_worker", "to_worker"), ""
    )
    return {**empty, "cause": "", "error": "", "reason": "upstream_failed", **fields}


def dropped(upstream: str, chunks: int) -> str:
    """The error of an answer cut by a dropped connection, as it always read."""
    cut = f"upstream {upstream!r} dropped the connection mid-stream after {chunks} chunks"
    return f"{cut}: {DROPPED}"


def status_of(client: FlaskClient, stage_id: str) -> dict[str, Any]:
    """The stage's summary, once its runner has finished with it (listeners included)."""
    settle(client, stage_id)
    response = client.get(f"/stages/{stage_id}")
    assert response.status_code == 200
    summary: dict[str, Any] = response.get_json()
    return summary


def v1_chunks(wire: bytes) -> list[dict[str, Any]]:
    """The chunks of a streamed Chat Completion: blocks of one ``data:`` line each (after
    any heartbeat comment lines), the last one ``data: [DONE]``."""
    assert wire.endswith(b"data: [DONE]\n\n"), wire[-200:]
    lines = [
        [line for line in block.split("\n") if not line.startswith(":")]
        for block in wire.decode().split("\n\n")[:-1]
    ]
    assert all(len(block) == 1 and block[0].startswith("data: ") for block in lines), lines
    assert lines[-1] == ["data: [DONE]"]
    return [json.loads(block[0].removeprefix("data: ")) for block in lines[:-1]]


@contextmanager
def fakes(*defaults: dict[str, str]) -> Iterator[list[FakeUpstream]]:
    """One more fake upstream per ``defaults``, each on its own port."""
    with ExitStack() as stack:
        yield [stack.enter_context(FakeUpstream(defaults=d)) for d in defaults]


# -- 1. the seed's dialect -----------------------------------------------------------------


def test_a_seed_stream_cut_after_20_chunks_is_continued_once_and_reads_whole(
    upstream: FakeUpstream,
) -> None:
    with app_client(single(upstream)) as client:
        wire = post_chat(client, "cut", CUT)
        status = status_of(client, "cut")
    events = seed_events(wire)

    # 20 chunks, the marker, the 40 chunks left with the finish and the usage, done; the
    # ids one sequence, the marker's among them.
    assert names(events) == [CHUNK] * 20 + ["continued"] + [CHUNK] * 42 + ["done"]
    assert [e["id"] for e in events] == (
        [f"cut-chunk-{n}" for n in range(20)]
        + ["cut-continued-20"]
        + [f"cut-chunk-{n}" for n in range(21, 63)]
        + ["cut-done-63"]
    )
    marker = (
        b'id: cut-continued-20\nevent: continued\ndata: {"stage_id":"cut","after":19,'
        b'"reason":"upstream_failed","mode":"trailing","model":"' + CUT.encode() + b'"}\n\n'
    )
    assert wire.count(b"event: continued") == 1 and marker in wire
    assert chunk_text(events) == ANSWER

    # The upstream: the request, then its continuation, with the prefix and the budget left.
    first, second = chats(upstream)
    assert first.body == {
        "model": CUT,
        "messages": HI,
        "max_tokens": 512,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert second.body == continued_with(first.body, PREFIX, 512 - 20)
    assert (first.chunks_sent, first.done_sent, second.done_sent) == (20, False, True)
    # After the marker, the chunks are the new response's.
    chunk_ids = [e["data"]["chunk"]["id"] for e in events if e["event"] == CHUNK]
    assert (
        chunk_ids == [f"chatcmpl-fake-{first.index}"] * 20 + [f"chatcmpl-fake-{second.index}"] * 42
    )

    # The usage chunk is the continuation's; done sums the segments.
    reported = fake_usage(second)
    assert events[-2]["data"]["chunk"]["usage"] == reported
    assert events[-1]["data"] == {"stage_id": "cut", "usage": summed(20, reported)}

    assert (status["status"], status["text"], status["error"]) == ("done", ANSWER, None)
    assert status["usage"] == summed(20, reported)
    assert status["continuations"] == [
        record(
            after=19,
            mode="trailing",
            outcome="ok",
            model=CUT,
            upstream="default",
            from_replica=upstream.url,
            to_replica=upstream.url,
            cause=dropped("default", 20),
        )
    ]


def test_a_cut_seed_answer_not_streamed_is_whole(upstream: FakeUpstream) -> None:
    with app_client(single(upstream)) as client:
        body = {"stage_id": "whole", "model_name": CUT, "user_prompt": "hi"}
        response = client.post("/chat", json=body)
    assert response.status_code == 200
    answer = response.get_json()
    assert (answer["type"], answer["text"], answer["error"]) == ("text", ANSWER, None)
    assert len(chats(upstream)) == 2


# -- 2. Chat Completions: nothing new on the wire ------------------------------------------


@pytest.mark.parametrize("fault", ["drop", "stall"])
def test_a_cut_chat_completion_stream_shows_no_seam(upstream: FakeUpstream, fault: str) -> None:
    model = f"fake?chunks=60&mode={fault}&after=20"
    config = upstreams({"default": {"url": upstream.url, "continuation": "trailing", **QUICK}})
    upstream.defaults["continuation"] = "trailing"
    request = {
        "model": model,
        "messages": HI,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with app_client(config) as client:
        response = client.post("/v1/chat/completions", json=request)
        assert response.status_code == 200
        status = status_of(client, response.headers["X-Stage-Id"])
    chunks = v1_chunks(response.get_data())

    assert not [c for c in chunks if "error" in c]
    assert {(c["id"], c["created"], c["model"], c["object"]) for c in chunks} == {
        (chunks[0]["id"], chunks[0]["created"], model, "chat.completion.chunk")
    }
    deltas = [choice["delta"] for c in chunks for choice in c["choices"]]
    assert [d for d in deltas if "role" in d] == [{"role": "assistant", "content": "tok0 "}]
    assert "".join(d.get("content") or "" for d in deltas) == ANSWER
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * 60 + ["stop"]

    first, second = chats(upstream)
    assert second.body == continued_with(first.body, PREFIX, 512 - 20)
    usage = summed(20, fake_usage(second))
    del usage["estimated"]  # OpenAI's usage has no such field
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage
    [continuation] = status["continuations"]
    assert (continuation["outcome"], continuation["mode"]) == ("ok", "trailing")
    if fault == "stall":
        assert continuation["cause"] == "upstream 'default' sent nothing for 0.5 s mid-stream"


def test_a_cut_chat_completion_not_streamed_is_whole(upstream: FakeUpstream) -> None:
    with app_client(single(upstream)) as client:
        response = client.post("/v1/chat/completions", json={"model": CUT, "messages": HI})
    assert response.status_code == 200
    completion = response.get_json()
    [choice] = completion["choices"]
    assert choice["message"]["content"] == ANSWER
    assert choice["finish_reason"] == "stop"
    usage = summed(20, fake_usage(chats(upstream)[1]))
    del usage["estimated"]
    assert completion["usage"] == usage


# -- 3. Responses: one response, one item, one content part --------------------------------


def test_a_cut_responses_stream_is_one_response(upstream: FakeUpstream) -> None:
    with app_client(single(upstream)) as client:
        response = client.post("/v1/responses", json={"model": CUT, "input": "hi", "stream": True})
    assert response.status_code == 200
    events = seed_events(response.get_data())
    kinds = [e["event"] for e in events]
    assert [e["data"]["type"] for e in events] == kinds
    assert [e["data"]["sequence_number"] for e in events] == list(range(len(events)))

    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 60,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    [item] = [e["data"]["item"] for e in events if e["event"] == "response.output_item.added"]
    deltas = [e["data"] for e in events if e["event"] == "response.output_text.delta"]
    assert {(d["item_id"], d["output_index"], d["content_index"]) for d in deltas} == {
        (item["id"], 0, 0)
    }
    assert "".join(d["delta"] for d in deltas) == ANSWER
    [done] = [e["data"] for e in events if e["event"] == "response.output_text.done"]
    assert done["text"] == ANSWER

    completed = events[-1]["data"]["response"]
    assert events[0]["data"]["response"]["id"] == completed["id"]
    assert completed["status"] == "completed"
    assert [part["text"] for part in completed["output"][0]["content"]] == [ANSWER]
    first, second = chats(upstream)
    assert second.body == continued_with(first.body, PREFIX, 512 - 20)
    usage = summed(20, fake_usage(second))
    assert completed["usage"]["input_tokens"] == usage["prompt_tokens"]
    assert completed["usage"]["output_tokens"] == usage["completion_tokens"]
    assert completed["usage"]["total_tokens"] == usage["total_tokens"]


# -- 4. each way an answer is cut ----------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "cause"),
    [
        ("drop", dropped("default", 2)),
        ("stall", "upstream 'default' sent nothing for 0.5 s mid-stream"),
        (
            "malformed",
            "upstream 'default' sent a chunk that is not a JSON object: '{\"id\": not json'",
        ),
        (
            "error_object",
            "upstream 'default' reported an error mid-stream: fake upstream error object",
        ),
    ],
)
def test_each_failure_after_the_first_chunk_is_continued(
    upstream: FakeUpstream, fault: str, cause: str
) -> None:
    model = f"fake?chunks=6&mode={fault}&after=2"
    upstream.defaults["continuation"] = "trailing"
    config = upstreams({"default": {"url": upstream.url, "continuation": "trailing", **QUICK}})
    with app_client(config) as client:
        events = seed_events(post_chat(client, "cut", model))
        status = status_of(client, "cut")
    assert names(events) == [CHUNK] * 2 + ["continued"] + [CHUNK] * 6 + ["done"]
    assert chunk_text(events) == SHORT_ANSWER
    first, second = chats(upstream)
    assert second.body == continued_with(first.body, "tok0 tok1", 512 - 2)
    assert [(c["outcome"], c["cause"]) for c in status["continuations"]] == [("ok", cause)]


@pytest.mark.processes
def test_under_gevent_silence_past_idle_timeout_is_continued(upstream: FakeUpstream) -> None:
    """Under gunicorn's gevent worker the relay's own idle deadline fires, at
    ``idle_timeout`` (the first-token timeout stays at its default)."""
    upstream.defaults["continuation"] = "trailing"
    spec = {"url": upstream.url, "continuation": "trailing", "idle_timeout": 0.5}
    with gunicorn_server({"STAGESERVER_UPSTREAMS": json.dumps({"default": spec})}) as gunicorn:
        response = requests_post_chat(
            gunicorn.url, stage_id="silent", model_name="fake?chunks=60&mode=stall&after=20"
        )
        status = stage_status(gunicorn.url, "silent")
    assert response.status_code == 200
    events = seed_events(response.content)
    assert names(events) == [CHUNK] * 20 + ["continued"] + [CHUNK] * 42 + ["done"]
    assert chunk_text(events) == ANSWER
    first, second = chats(upstream)
    assert second.body == continued_with(first.body, PREFIX, 512 - 20)
    assert first.client_closed_at is not None  # the silent stream was let go
    [continuation] = status["continuations"]
    assert (continuation["outcome"], continuation["cause"]) == (
        "ok",
        "upstream 'default' sent nothing for 0.5 s mid-stream",
    )


# -- 5. the request of each mode -----------------------------------------------------------


SYSTEM = {"role": "system", "content": "Be brief."}
RENDERED = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.mark.parametrize(
    ("mode", "behaviour"),
    [("flag", "flag"), ("prefix", "prefix"), ("raw", "restart"), ("raw-rendered", "restart")],
)
def test_each_mode_asks_in_its_own_way(
    upstream: FakeUpstream, tmp_path: Path, mode: str, behaviour: str
) -> None:
    """``behaviour``: how the fake takes a trailing assistant message. ``raw`` renders the
    conversation with a chat template file; ``raw-rendered`` has none and asks the
    upstream's ``/apply-template``."""
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    spec: dict[str, Any] = {"url": upstream.url, "continuation": mode.removesuffix("-rendered")}
    if mode == "raw":
        spec["chat_template"] = str(template)
    upstream.defaults["continuation"] = behaviour
    with app_client(upstreams({"default": spec})) as client:
        wire = post_chat(client, "cut", SHORT, system_prompt="Be brief.")
        status = status_of(client, "cut")
    events = seed_events(wire)

    assert names(events) == [CHUNK] * 2 + ["continued"] + [CHUNK] * 6 + ["done"]
    [marker] = [e["data"] for e in events if e["event"] == "continued"]
    assert marker["mode"] == spec["continuation"]
    assert chunk_text(events) == SHORT_ANSWER  # prefix: the echo of "tok0 tok1" stripped
    chunks = [e["data"]["chunk"] for e in events if e["event"] == CHUNK]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}  # raw: re-shaped
    assert all("delta" in choice for c in chunks for choice in c["choices"])
    assert status["continuations"][0]["outcome"] == "ok"

    first, *asked = upstream.requests
    assert first.body["messages"] == [SYSTEM, *HI]
    paths = [r.path for r in asked]
    if mode == "flag":
        assert paths == ["/v1/chat/completions"]
        expected = continued_with(first.body, "tok0 tok1", 510)
        expected.update(continue_final_message=True, add_generation_prompt=False)
        assert asked[0].body == expected
    elif mode == "prefix":
        assert paths == ["/v1/chat/completions"]
        expected = continued_with(first.body, "tok0 tok1", 510)
        expected["messages"][-1]["prefix"] = True
        assert asked[0].body == expected
    else:
        if mode == "raw":
            assert paths == ["/v1/completions"]
        else:
            assert paths == ["/apply-template", "/v1/completions"]
            assert asked[0].body == {"messages": [SYSTEM, *HI]}
        assert asked[-1].body == {
            "model": SHORT,
            "prompt": RENDERED + "tok0 tok1",
            "max_tokens": 510,
            "stream": True,
            "stream_options": {"include_usage": True},
        }


# -- 6. auto: a probe decides --------------------------------------------------------------


OPEN = "a trailing answer is left open"
CLOSED = "the server closes a trailing assistant message: it would start a new answer"
NO_OPENAI = "OpenAI's API continues no answer"
OLLAMA = (
    "the probe failed: ValueError: Ollama renders a prompt only for a model: list it in `models`"
)


@pytest.mark.processes
def test_auto_probes_each_kind_and_continues_only_where_a_turn_is_left_open(
    upstream: FakeUpstream,
) -> None:
    upstream.defaults["continuation"] = "trailing"  # llama-server and Ollama
    # llama-cpp-python (a trailing message is a closed turn), vLLM, and OpenAI.
    with fakes({"continuation": "restart"}, {"continuation": "flag"}, {}) as (
        restart,
        flag,
        openai,
    ):
        specs = {
            "restart": {"url": restart.url, "kind": "llamacpp"},
            "llama": {"url": upstream.url, "kind": "llamacpp"},
            "ollama": {"url": upstream.url, "kind": "ollama", "models": ["fake-ollama"]},
            "ollama-unnamed": {"url": upstream.url, "kind": "ollama"},
            "vllm": {"url": flag.url, "kind": "vllm"},
            "vllm-closed": {"url": upstream.url, "kind": "vllm"},
            "openai": {"url": openai.url, "kind": "openai"},
        }
        expected = {
            "restart": {"mode": "none", "source": "probed", "detail": CLOSED},
            "llama": {"mode": "trailing", "source": "probed", "detail": OPEN},
            "ollama": {"mode": "trailing", "source": "probed", "detail": OPEN},
            "ollama-unnamed": {"mode": "none", "source": "probed", "detail": OLLAMA},
            "vllm": {"mode": "flag", "source": "probed", "detail": OPEN},
            "vllm-closed": {"mode": "none", "source": "probed", "detail": CLOSED},
            "openai": {"mode": "none", "source": "default", "detail": NO_OPENAI},
        }
        with app_client(upstreams(specs)) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 200
            reports = ready.get_json()["upstreams"]
            assert {name: reports[name]["continuation"] for name in specs} == expected
            # Probed at start and by /readyz, in either order; each once.
            assert [r.path for r in openai.requests] == ["/v1/models"]  # no probe
            assert sorted(r.path for r in restart.requests) == ["/apply-template", "/v1/models"]
            assert sorted(r.path for r in flag.requests) == [
                "/detokenize",
                "/tokenize",
                "/v1/models",
            ]
            [ollama] = [r for r in upstream.requests if r.path == "/api/chat"]
            assert ollama.body["model"] == "fake-ollama"

            # Probed none: a cut answer ends as it did before continuations.
            wire = post_chat(client, "restart", CUT, upstream="restart")
            events = seed_events(wire)
            assert names(events) == [CHUNK] * 20 + ["error"]
            assert events[-1]["id"] == "restart-error-20"
            assert events[-1]["data"] == {"stage_id": "restart", "error": dropped("restart", 20)}
            assert len(chats(restart)) == 1
            assert status_of(client, "restart")["continuations"] == [
                record(
                    after=19,
                    mode="none",
                    outcome="refused",
                    cause=dropped("restart", 20),
                    error="upstream 'restart' cannot continue an answer (none)",
                )
            ]

            # Probed trailing: continued.
            events = seed_events(post_chat(client, "llama", CUT, upstream="llama"))
            assert names(events).count("continued") == 1 and names(events)[-1] == "done"
            assert chunk_text(events) == ANSWER
            [marker] = [e["data"] for e in events if e["event"] == "continued"]
            assert marker["mode"] == "trailing"
            assert chats(upstream)[-1].body["messages"][-1] == {
                "role": "assistant",
                "content": PREFIX,
            }

        # `stageserver check` says the same, from its own probes.
        env = {k: v for k, v in os.environ.items() if not k.startswith("STAGESERVER_")}
        env["STAGESERVER_UPSTREAMS"] = json.dumps(specs)
        check = subprocess.run(
            [sys.executable, "-m", "stageserver", "check"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert check.returncode == 0, check.stderr
    lines = [line for line in check.stdout.splitlines() if " continues answers in mode " in line]
    assert lines == [
        f"  {name} continues answers in mode {m['mode']} ({m['source']}: {m['detail']})"
        for name, m in expected.items()
    ]


@pytest.mark.parametrize(
    ("settings", "refused"),
    [
        (
            {"STAGESERVER_UPSTREAM_CONTINUATION": "none"},
            "upstream 'default' cannot continue an answer (none)",
        ),
        (
            {"STAGESERVER_MAX_CONTINUATIONS": 0},
            "it was continued 0 times already (STAGESERVER_MAX_CONTINUATIONS)",
        ),
    ],
)
def test_an_answer_that_may_not_be_continued_ends_with_its_error(
    upstream: FakeUpstream, settings: dict[str, Any], refused: str
) -> None:
    with app_client(single(upstream) | settings) as client:
        wire = post_chat(client, "cut", CUT)
        status = status_of(client, "cut")
    events = seed_events(wire)
    assert names(events) == [CHUNK] * 20 + ["error"]
    assert wire.endswith(
        b'id: cut-error-20\nevent: error\ndata: {"stage_id":"cut","error":'
        + json.dumps(dropped("default", 20)).encode()
        + b"}\n\n"
    )
    assert len(chats(upstream)) == 1
    assert status["error"] == dropped("default", 20)
    assert status["continuations"] == [
        record(
            after=19, mode="none", outcome="refused", cause=dropped("default", 20), error=refused
        )
    ]


# -- 7. limits -----------------------------------------------------------------------------


def test_no_token_left_ends_the_answer_at_its_length(upstream: FakeUpstream) -> None:
    with app_client(single(upstream)) as client:
        events = seed_events(post_chat(client, "spent", CUT, max_tokens=20))
        status = status_of(client, "spent")
    assert names(events) == [CHUNK] * 21 + ["done"]
    assert chunk_text(events) == PREFIX + " "
    assert events[-2]["data"]["chunk"] == {
        "id": "spent",
        "object": "chat.completion.chunk",
        "created": int(status["created_at"]),
        "model": CUT,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
    }
    assert len(chats(upstream)) == 1
    assert (status["status"], status["finish_reason"]) == ("done", "length")
    # The record names the mode it would have been asked in.
    assert status["continuations"] == [record(after=19, mode="trailing", outcome="length")]


@pytest.mark.parametrize("answer", ["tool_calls=2", "reasoning=3"])
def test_an_answer_of_tool_calls_or_reasoning_is_not_continued(
    upstream: FakeUpstream, answer: str
) -> None:
    with app_client(single(upstream)) as client:
        events = seed_events(post_chat(client, "tools", f"fake?{answer}&mode=drop&after=1"))
        status = status_of(client, "tools")
    assert names(events) == [CHUNK, "error"]
    assert events[-1]["data"]["error"] == dropped("default", 1)
    assert len(chats(upstream)) == 1
    assert status["continuations"] == [
        record(
            after=0,
            mode="none",
            outcome="refused",
            cause=dropped("default", 1),
            error="it streamed tool calls or reasoning, which a continuation cannot extend",
        )
    ]


def test_a_continuation_refused_by_the_upstream_ends_the_stage_naming_both(
    upstream: FakeUpstream,
) -> None:
    with app_client(single(upstream)) as client:
        events = seed_events(post_chat(client, "refused", SHORT + "&continued_status=500"))
        status = status_of(client, "refused")
    refusal = "upstream 'default' answered HTTP 500: fake upstream failure"
    error = f"{dropped('default', 2)}; its continuation failed: {refusal}"
    assert names(events) == [CHUNK, CHUNK, "error"]
    assert events[-1]["data"] == {"stage_id": "refused", "error": error}
    assert [r.status for r in chats(upstream)] == [200, 500]
    assert status["continuations"] == [
        record(
            after=1, mode="trailing", outcome="failed", cause=dropped("default", 2), error=refusal
        )
    ]


@pytest.mark.parametrize("limit", [1, 2])
def test_at_most_max_continuations_per_stage(limit: int) -> None:
    """Upstream ``a`` cuts the answer after 2 pieces; its fallback ``b``, with the fault
    after 4 pieces of the answer, continues it (the failed replica is avoided) and is cut
    after "tok3 " (its reply: the space held back, "tok2 ", "tok3 "). ``a`` continues it
    in turn only if the limit allows."""
    with fakes(
        {"continuation": "trailing", "mode": "drop", "after": "2"},
        {"continuation": "trailing", "mode": "drop", "after": "4"},
    ) as (a, b):
        specs = {
            "a": {"url": a.url, "continuation": "trailing", "fallbacks": ["b"]},
            "b": {"url": b.url, "continuation": "trailing"},
        }
        with app_client(upstreams(specs, STAGESERVER_MAX_CONTINUATIONS=limit)) as client:
            events = seed_events(post_chat(client, "twice", "fake?chunks=6", upstream="a"))
            status = status_of(client, "twice")
        assert [len(chats(a)), len(chats(b))] == [1 + (limit > 1), 1]
        assert chats(b)[0].body["messages"][-1] == {"role": "assistant", "content": "tok0 tok1"}
    second_cut = "upstream 'b' dropped the connection mid-stream after 4 chunks: " + DROPPED
    on_b = record(
        after=1,
        mode="trailing",
        outcome="ok",
        model="fake?chunks=6",
        upstream="b",
        from_replica=a.url,
        to_replica=b.url,
        cause=dropped("a", 2),
    )
    if limit == 1:
        assert names(events) == [CHUNK] * 2 + ["continued"] + [CHUNK] * 2 + ["error"]
        assert chunk_text(events) == "tok0 tok1 tok2 tok3 "
        assert events[-1]["data"] == {"stage_id": "twice", "error": second_cut}
        refused = "it was continued 1 times already (STAGESERVER_MAX_CONTINUATIONS)"
        assert status["continuations"] == [
            on_b,
            record(after=4, mode="none", outcome="refused", cause=second_cut, error=refused),
        ]
    else:
        assert names(events) == (
            [CHUNK] * 2 + ["continued"] + [CHUNK] * 2 + ["continued"] + [CHUNK] * 4 + ["done"]
        )
        assert chunk_text(events) == SHORT_ANSWER
        assert status["continuations"] == [
            on_b,
            record(
                after=4,
                mode="trailing",
                outcome="ok",
                model="fake?chunks=6",
                upstream="a",
                from_replica=b.url,
                to_replica=a.url,
                cause=second_cut,
            ),
        ]
        assert chats(a)[1].body["messages"][-1] == {
            "role": "assistant",
            "content": "tok0 tok1 tok2 tok3",
        }


# -- 8. another replica, and 9. a fallback -------------------------------------------------


def test_a_continuation_goes_to_another_replica_and_the_failed_one_is_counted() -> None:
    with fakes({"continuation": "trailing"}, {"continuation": "trailing"}) as pair:
        specs = {"default": {"urls": [f.url for f in pair], "continuation": "trailing"}}
        with app_client(upstreams(specs)) as client:

            def failures(fake: FakeUpstream) -> float:
                metrics = scrape(client.get("/metrics").get_data(as_text=True))
                labels = {"upstream": "default", "replica": fake.url, "kind": "reset"}
                return value(metrics, "stageserver_replica_failures_total", **labels)

            before = [failures(f) for f in pair]
            events = seed_events(post_chat(client, "moved", CUT))
            status = status_of(client, "moved")
            after = [failures(f) for f in pair]
        [cut] = [f for f in pair if chats(f)[0].body["messages"] == HI]
        [other] = [f for f in pair if f is not cut]
    assert chunk_text(events) == ANSWER and names(events).count("continued") == 1
    assert [len(chats(cut)), len(chats(other))] == [1, 1]
    assert chats(other)[0].body == continued_with(chats(cut)[0].body, PREFIX, 492)
    [continuation] = status["continuations"]
    assert (continuation["from_replica"], continuation["to_replica"]) == (cut.url, other.url)
    assert [a - b for a, b in zip(after, before, strict=True)] == [
        1 if f is cut else 0 for f in pair
    ]


def test_a_fallback_with_a_mode_of_its_own_continues_under_its_model(
    upstream: FakeUpstream,
) -> None:
    upstream.defaults.update(continuation="trailing", chunks="60")
    specs = {
        "default": {"url": upstream.url, "kind": "openai", "fallbacks": ["b"]},
        "b": {"url": upstream.url, "models": ["fake-b"], "continuation": "trailing"},
    }
    with app_client(upstreams(specs)) as client:
        wire = post_chat(client, "fell", CUT)
        status = status_of(client, "fell")
    events = seed_events(wire)
    assert chunk_text(events) == ANSWER
    [marker] = [e for e in events if e["event"] == "continued"]
    assert marker["data"] == {
        "stage_id": "fell",
        "after": 19,
        "reason": "upstream_failed",
        "mode": "trailing",
        "model": "fake-b",
    }
    first, second = chats(upstream)
    assert first.body["model"] == CUT
    assert second.body == {**continued_with(first.body, PREFIX, 492), "model": "fake-b"}
    [continuation] = status["continuations"]
    assert (continuation["upstream"], continuation["model"]) == ("b", "fake-b")


# -- 10. wherever the answer is cut --------------------------------------------------------


@st.composite
def cut_answers(draw: st.DrawFn) -> tuple[str, int, int]:
    """A scripted answer of spaces, newlines, tabs and multi-byte UTF-8, its number of
    pieces, and the piece after which it is cut."""
    parts = st.sampled_from(["a", "b", "é", "日本", "🙂", " ", "  ", "\n", "\t", "\r\n", "x y"])
    text = "".join(draw(st.lists(parts, min_size=2, max_size=40)))
    chunks = draw(st.integers(2, min(40, len(text))))
    return text, chunks, draw(st.integers(1, chunks - 1))


def test_the_text_is_whole_wherever_the_answer_is_cut() -> None:
    """Upstream ``default`` cuts; its fallback ``b``, with the same script, continues. (On
    one fake, a delivered text ending in pieces that are whitespace alone would be cut
    again: its continuation, asked from the text without that whitespace, re-sends those
    pieces and meets the fault at the same place in the answer.)"""
    stage_ids = (f"prop-{n}" for n in itertools.count())
    with fakes({}, {}) as (cutting, sound):
        specs = {
            "default": {"url": cutting.url, "continuation": "trailing", "fallbacks": ["b"]},
            "b": {"url": sound.url, "continuation": "trailing"},
        }
        with app_client(upstreams(specs)) as client:

            @settings(max_examples=30, deadline=None, database=None)
            @given(cut_answers())
            def check(case: tuple[str, int, int]) -> None:
                text, chunks, after = case
                script = {"continuation": "trailing", "text": text, "chunks": str(chunks)}
                sound.defaults.update(script)
                cutting.defaults.update(script, mode="drop", after=str(after))
                stage_id = next(stage_ids)
                events = seed_events(post_chat(client, stage_id, "fake"))
                assert names(events).count("continued") == 1, events
                assert names(events)[-1] == "done", events
                assert chunk_text(events) == text
                delivered = chunk_text(events[: names(events).index("continued")])
                assert chats(sound)[-1].body["messages"][-1] == {
                    "role": "assistant",
                    "content": delivered.rstrip(),
                }

            check()


# -- 11. the record: metrics, the log line, the span event ---------------------------------


def test_a_continuation_is_counted_logged_and_traced(
    upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="stageserver.stage")
    config = single(upstream, STAGESERVER_TRACING="memory")
    with app_client(config) as client:

        def continuations(**labels: str) -> float:
            metrics = scrape(client.get("/metrics").get_data(as_text=True))
            return value(metrics, "stageserver_stage_continuations_total", **labels)

        ok = {"mode": "trailing", "reason": "upstream_failed", "outcome": "ok"}
        refused = {"mode": "none", "reason": "upstream_failed", "outcome": "refused"}
        before = continuations(**ok), continuations(**refused)
        post_chat(client, "told", CUT)
        post_chat(client, "told-tools", "fake?tool_calls=1&mode=drop&after=1")
        status_of(client, "told")
        status_of(client, "told-tools")
        assert (continuations(**ok) - before[0], continuations(**refused) - before[1]) == (1, 1)
        tracing = manager_of(client.application.extensions).tracing
        assert tracing is not None and tracing.exporter is not None
        spans = tracing.exporter.get_finished_spans()

    # One warning for each continuation, made or refused.
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "stageserver.stage" and r.levelno == logging.WARNING
    ]
    [line] = [m for m in lines if m.startswith("stage_id=told ")]
    assert line.startswith(
        "stage_id=told continuation=ok reason=upstream_failed mode=trailing after=19 "
    )
    assert f" from_replica={upstream.url} to_replica={upstream.url} " in line
    [tools] = [m for m in lines if m.startswith("stage_id=told-tools ")]
    assert tools.startswith("stage_id=told-tools continuation=refused ")

    [stage_span] = [s for s in spans if (s.attributes or {}).get("stageserver.stage_id") == "told"]
    [event] = [e for e in stage_span.events if e.name == "stageserver.continuation"]
    assert dict(event.attributes or {}) == {
        "stageserver.continuation.after": 19,
        "stageserver.continuation.reason": "upstream_failed",
        "stageserver.continuation.mode": "trailing",
        "stageserver.continuation.outcome": "ok",
        "stageserver.continuation.model": CUT,
        "stageserver.continuation.upstream": "default",
        "stageserver.continuation.from_replica": upstream.url,
        "stageserver.continuation.to_replica": upstream.url,
        "stageserver.continuation.cause": dropped("default", 20),
    }
