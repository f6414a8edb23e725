"""``StageClient`` and ``AsyncStageClient``: the same requests, blocking or for asyncio.

The public methods are written once, in ``_StageRequests``, and build requests; what
is not I/O (reading answers, the resume logic of ``resume.py``) is shared too. Each
client only sends and reads: ``_follow`` a stream, ``_output`` of ``POST /chat``, a
``_json`` answer.

``stream()`` and ``run()`` list the same keyword fields of ``POST /chat`` on purpose:
each is a public signature that ``help()`` and a type checker read, and a ``**kwargs``
shared between them would hide the fields from both. ``_chat_body`` is the one place
the fields become a body.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Coroutine, Generator
from contextlib import aclosing
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import httpx
from httpx_sse import EventSource

from .errors import StageClientError, StageConnectionError, StageHTTPError, http_error, json_or_none
from .events import StageEvent, TextStageOutput
from .resume import SSE_HEADERS, ResumePolicy, StageStream, stage_path

Events = Generator[StageEvent, None, None]
AsyncEvents = AsyncGenerator[StageEvent, None]
Json = dict[str, Any]

HttpT = TypeVar("HttpT", httpx.Client, httpx.AsyncClient)
EventsT = TypeVar("EventsT", Events, AsyncEvents)
OutputT = TypeVar("OutputT", TextStageOutput, Coroutine[Any, Any, TextStageOutput])
JsonT = TypeVar("JsonT", Json, Coroutine[Any, Any, Json])

# Reads wait well beyond the server's heartbeat (15 s by default) before giving up.
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


def _chat_body(stream: bool, **fields: Any) -> dict[str, Any]:
    """The ``POST /chat`` body: the fields given, leaving the server's defaults to it."""
    return {key: value for key, value in fields.items() if value is not None} | {"stream": stream}


def _json_answer(response: httpx.Response, expected: int) -> Json:
    if response.status_code != expected:
        raise http_error(response)
    body = json_or_none(response.content)
    if not isinstance(body, dict):
        raise StageClientError(f"{response.request.url} answered {response.text[:200]!r}")
    return body


def _text_output(response: httpx.Response) -> TextStageOutput:
    # A stage that ran and failed answers its own error status (502, 504, 409 once
    # cancelled) in the TextStageOutput shape: that is the stage's outcome, not a refusal.
    output = TextStageOutput.parse(json_or_none(response.content))
    if output is not None:
        return output
    if response.is_error:
        raise http_error(response)
    raise StageClientError(f"POST /chat answered {response.text[:200]!r}, not a TextStageOutput")


class _StageRequests(Generic[HttpT, EventsT, OutputT, JsonT]):
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        resume_attempts: int = 5,
        resume_delay: float = 0.25,
    ) -> None:
        """``api_key`` goes with every request as ``Authorization: Bearer``. A dropped
        stream is re-attached at most ``resume_attempts`` times in a row, first after
        ``resume_delay`` seconds (or the server's ``retry:``), doubling each time."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http: HttpT = self._pool(base_url=base_url, headers=headers, timeout=timeout)
        self._resume = ResumePolicy(resume_attempts, resume_delay)

    def stream(
        self,
        *,
        stage_id: str,
        model_name: str,
        user_prompt: str,
        system_prompt: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        resumable: bool | None = None,
        **fields: Any,
    ) -> EventsT:
        """Start a stage and yield its events (see ``stageserver.client``); ``fields``
        go into the request as they are (``upstream="local"``)."""
        body = _chat_body(
            True,
            stage_id=stage_id,
            model_name=model_name,
            user_prompt=user_prompt,
            system_prompt=system_prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            resumable=resumable,
            **fields,
        )
        stream = StageStream(stage_id, resumable=resumable, policy=self._resume)
        chat = self._http.build_request("POST", "/chat", json=body, headers=SSE_HEADERS)
        return self._follow(stream, chat)

    def attach(self, stage_id: str, *, last_event_id: str | None = None) -> EventsT:
        """Follow a stage that runs or ran: its events after ``last_event_id`` (all of
        them without it), then the live ones, resuming after drops like ``stream()``."""
        stream = StageStream(
            stage_id, resumable=None, policy=self._resume, last_event_id=last_event_id
        )
        return self._follow(stream, stream.resume_request(self._http))

    def run(
        self,
        *,
        stage_id: str,
        model_name: str,
        user_prompt: str,
        system_prompt: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        **fields: Any,
    ) -> OutputT:
        """Run a stage without streaming: its answer, of type ``text`` or ``error``."""
        body = _chat_body(
            False,
            stage_id=stage_id,
            model_name=model_name,
            user_prompt=user_prompt,
            system_prompt=system_prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            **fields,
        )
        return self._output(self._http.build_request("POST", "/chat", json=body))

    def status(self, stage_id: str) -> JsonT:
        """``GET /stages/<id>``: status, text so far, usage, ..."""
        return self._json(self._http.build_request("GET", stage_path(stage_id)), 200)

    def cancel(self, stage_id: str) -> JsonT:
        """Stop a stage wherever it runs: ``{"stage_id", "status": "cancelling"}``."""
        cancel = self._http.build_request("POST", stage_path(stage_id, "/cancel"))
        return self._json(cancel, 202)

    def _pool(self, **options: Any) -> HttpT:
        raise NotImplementedError

    def _follow(self, stream: StageStream, request: httpx.Request) -> EventsT:
        raise NotImplementedError

    def _output(self, request: httpx.Request) -> OutputT:
        raise NotImplementedError

    def _json(self, request: httpx.Request, expected: int) -> JsonT:
        raise NotImplementedError


class StageClient(_StageRequests[httpx.Client, Events, TextStageOutput, Json]):
    """A client of one stageserver. It owns its connection pool: use it as a context
    manager, or ``close()`` it."""

    def _pool(self, **options: Any) -> httpx.Client:
        return httpx.Client(**options)

    def _follow(self, stream: StageStream, request: httpx.Request) -> Events:
        while not stream.over():
            failure: Exception | None = None
            try:
                response = self._http.send(request, stream=True)
                try:
                    if response.status_code != 200:
                        response.read()
                    if stream.opened(response):
                        for sse in EventSource(response).iter_sse():
                            event = stream.take(sse)
                            if event is not None:
                                yield event
                finally:
                    response.close()
            except (httpx.RequestError, StageHTTPError) as exc:
                failure = exc
            if stream.over():
                return
            time.sleep(stream.delay_after(failure))
            request = stream.resume_request(self._http)

    def _output(self, request: httpx.Request) -> TextStageOutput:
        return _text_output(self._send(request))

    def _json(self, request: httpx.Request, expected: int) -> Json:
        return _json_answer(self._send(request), expected)

    def _send(self, request: httpx.Request) -> httpx.Response:
        try:
            return self._http.send(request)
        except httpx.RequestError as exc:
            raise StageConnectionError(f"no answer from stageserver: {exc}") from exc

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncStageClient(
    _StageRequests[
        httpx.AsyncClient,
        AsyncEvents,
        Coroutine[Any, Any, TextStageOutput],
        Coroutine[Any, Any, Json],
    ]
):
    """``StageClient`` for asyncio: the same methods, awaited, and streams read with
    ``async for``. Use it as an async context manager, or ``await aclose()`` it."""

    def _pool(self, **options: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(**options)

    async def _follow(self, stream: StageStream, request: httpx.Request) -> AsyncEvents:
        while not stream.over():
            failure: Exception | None = None
            try:
                response = await self._http.send(request, stream=True)
                try:
                    if response.status_code != 200:
                        await response.aread()
                    if stream.opened(response):
                        async with aclosing(EventSource(response).aiter_sse()) as events:
                            async for sse in events:
                                event = stream.take(sse)
                                if event is not None:
                                    yield event
                finally:
                    await response.aclose()
            except (httpx.RequestError, StageHTTPError) as exc:
                failure = exc
            if stream.over():
                return
            await asyncio.sleep(stream.delay_after(failure))
            request = stream.resume_request(self._http)

    async def _output(self, request: httpx.Request) -> TextStageOutput:
        return _text_output(await self._send(request))

    async def _json(self, request: httpx.Request, expected: int) -> Json:
        return _json_answer(await self._send(request), expected)

    async def _send(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self._http.send(request)
        except httpx.RequestError as exc:
            raise StageConnectionError(f"no answer from stageserver: {exc}") from exc

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
