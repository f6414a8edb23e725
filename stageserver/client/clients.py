"""``StageClient`` and ``AsyncStageClient``: the same requests, blocking or for asyncio.

What is not I/O (request bodies, reading answers, the resume logic of ``resume.py``) is
shared; each class only sends and reads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Generator
from contextlib import aclosing
from types import TracebackType
from typing import Any, Self

import httpx
from httpx_sse import EventSource

from .errors import StageClientError, StageConnectionError, StageHTTPError, http_error, json_or_none
from .events import StageEvent, TextStageOutput
from .resume import SSE_HEADERS, ResumePolicy, StageStream, stage_path

Events = Generator[StageEvent, None, None]
AsyncEvents = AsyncGenerator[StageEvent, None]

# Reads wait well beyond the server's heartbeat (15 s by default) before giving up.
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


def _chat_body(stream: bool, **fields: Any) -> dict[str, Any]:
    """The ``POST /chat`` body: the fields given, leaving the server's defaults to it."""
    return {key: value for key, value in fields.items() if value is not None} | {"stream": stream}


def _chat_stream(
    http: httpx.Client | httpx.AsyncClient, body: dict[str, Any], policy: ResumePolicy
) -> tuple[StageStream, httpx.Request]:
    stream = StageStream(body["stage_id"], resumable=body.get("resumable"), policy=policy)
    return stream, http.build_request("POST", "/chat", json=body, headers=SSE_HEADERS)


def _json_answer(response: httpx.Response, expected: int) -> dict[str, Any]:
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


def _http_options(
    base_url: str, api_key: str | None, timeout: float | httpx.Timeout
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return {"base_url": base_url, "headers": headers, "timeout": timeout}


class StageClient:
    """A client of one stageserver. It owns its connection pool: use it as a context
    manager, or ``close()`` it."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        resume_attempts: int = 5,
        resume_delay: float = 0.25,
    ) -> None:
        self._http = httpx.Client(**_http_options(base_url, api_key, timeout))
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
    ) -> Events:
        """Start a stage and yield its events (see the module docstring); ``fields`` go
        into the request as they are (``upstream="local"``)."""
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
        return self._follow(*_chat_stream(self._http, body, self._resume))

    def attach(self, stage_id: str, *, last_event_id: str | None = None) -> Events:
        """Follow a stage that runs or ran: its events after ``last_event_id`` (all of
        them without it), then the live ones, resuming after drops like ``stream()``."""
        follow = StageStream(
            stage_id, resumable=None, policy=self._resume, last_event_id=last_event_id
        )
        return self._follow(follow, follow.resume_request(self._http))

    def _follow(self, follow: StageStream, request: httpx.Request) -> Events:
        while not follow.over():
            failure: Exception | None = None
            try:
                response = self._http.send(request, stream=True)
                try:
                    if response.status_code != 200:
                        response.read()
                    if follow.opened(response):
                        for sse in EventSource(response).iter_sse():
                            event = follow.take(sse)
                            if event is not None:
                                yield event
                finally:
                    response.close()
            except (httpx.RequestError, StageHTTPError) as exc:
                failure = exc
            if follow.over():
                return
            time.sleep(follow.delay_after(failure))
            request = follow.resume_request(self._http)

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
    ) -> TextStageOutput:
        """Run a stage without streaming and return its answer, of type ``text`` or
        ``error``."""
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
        return _text_output(self._send("POST", "/chat", body))

    def status(self, stage_id: str) -> dict[str, Any]:
        """``GET /stages/<id>``: status, text so far, usage, ..."""
        return _json_answer(self._send("GET", stage_path(stage_id)), 200)

    def cancel(self, stage_id: str) -> dict[str, Any]:
        """Stop a stage wherever it runs: ``{"stage_id", "status": "cancelling"}``."""
        return _json_answer(self._send("POST", stage_path(stage_id, "/cancel")), 202)

    def _send(self, method: str, path: str, body: Any = None) -> httpx.Response:
        try:
            return self._http.request(method, path, json=body)
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


class AsyncStageClient:
    """``StageClient`` for asyncio: the same methods, awaited or iterated with
    ``async for``."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        resume_attempts: int = 5,
        resume_delay: float = 0.25,
    ) -> None:
        self._http = httpx.AsyncClient(**_http_options(base_url, api_key, timeout))
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
    ) -> AsyncEvents:
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
        return self._follow(*_chat_stream(self._http, body, self._resume))

    def attach(
        self, stage_id: str, *, last_event_id: str | None = None
    ) -> AsyncEvents:
        follow = StageStream(
            stage_id, resumable=None, policy=self._resume, last_event_id=last_event_id
        )
        return self._follow(follow, follow.resume_request(self._http))

    async def _follow(
        self, follow: StageStream, request: httpx.Request
    ) -> AsyncEvents:
        while not follow.over():
            failure: Exception | None = None
            try:
                response = await self._http.send(request, stream=True)
                try:
                    if response.status_code != 200:
                        await response.aread()
                    if follow.opened(response):
                        async with aclosing(EventSource(response).aiter_sse()) as events:
                            async for sse in events:
                                event = follow.take(sse)
                                if event is not None:
                                    yield event
                finally:
                    await response.aclose()
            except (httpx.RequestError, StageHTTPError) as exc:
                failure = exc
            if follow.over():
                return
            await asyncio.sleep(follow.delay_after(failure))
            request = follow.resume_request(self._http)

    async def run(
        self,
        *,
        stage_id: str,
        model_name: str,
        user_prompt: str,
        system_prompt: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        **fields: Any,
    ) -> TextStageOutput:
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
        return _text_output(await self._send("POST", "/chat", body))

    async def status(self, stage_id: str) -> dict[str, Any]:
        return _json_answer(await self._send("GET", stage_path(stage_id)), 200)

    async def cancel(self, stage_id: str) -> dict[str, Any]:
        return _json_answer(await self._send("POST", stage_path(stage_id, "/cancel")), 202)

    async def _send(self, method: str, path: str, body: Any = None) -> httpx.Response:
        try:
            return await self._http.request(method, path, json=body)
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
