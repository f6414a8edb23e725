"""The configured upstreams: one OpenAI client per replica per process, how a stage calls
one, and which upstream a request asks for (``UpstreamRegistry.resolve``).

An upstream is a pool of replicas (``urls``; one ``url`` is a pool of one). Each replica
has a ``ReplicaClient`` of its own, named after its upstream: one OpenAI client, and how a
stage calls it. Choosing among them is ``replicas.py``'s business. A client is built
lazily in the process that uses it (gunicorn forks workers after the app module is
imported by none of them, but a mounted app may be created earlier), so each worker owns
its connection pools and connections are reused across stages.

A stage's request is built from what the SDK rendered once for each path of each replica
(``RequestTemplate``: its URL, its headers, its timeouts), with only the body and the
stage's own headers added, and sent through the client's ``http_client``: the SDK's
request build (its options copied, merged and validated, its URL parsed again, its
headers rendered again) cost about 0.65 ms of every stream, more than the rest of
opening it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import httpx2
import openai
from openai._models import FinalRequestOptions

from ..concurrency import gevent_active
from ..config import UpstreamConfig
from ..errors import (
    ConnectTimeout,
    FirstTokenTimeout,
    InvalidRequest,
    UpstreamStatusError,
    UpstreamUnavailable,
)
from ..retry_after import retry_after_seconds
from .transport.httptools import HttpToolsTransport
from .transport.sharded import ShardedTransport, unpatch_idle_check


class ReplicaClient:
    """One replica's client, built lazily in the process that uses it."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.name = config.name
        self._client: openai.OpenAI | None = None
        self._http: httpx2.Client | None = None  # the client's http_client
        self._templates: dict[str, RequestTemplate] = {}
        self._client_pid = 0
        self._lock = threading.Lock()

    @property
    def client(self) -> openai.OpenAI:
        if self._client is None or self._client_pid != os.getpid():
            with self._lock:
                if self._client is None or self._client_pid != os.getpid():
                    self._templates = {}
                    self._client = self._build_client()
                    self._client_pid = os.getpid()
        return self._client

    def template(self, path: str) -> RequestTemplate:
        """What every request of this process to ``path`` shares, rendered once."""
        client = self.client  # first: a new client (a new process) drops the templates
        template = self._templates.get(path)
        if template is None:
            assert self._http is not None
            template = self._templates[path] = RequestTemplate(client, self._http, path)
        return template

    def _build_client(self) -> openai.OpenAI:
        unpatch_idle_check()
        cfg = self.config
        # Under gevent the stage runner enforces the first-token and idle timeouts itself,
        # each with its own message, and a socket timeout would cost a timer on every
        # read; under threads the read timeout is what bounds a silent upstream.
        timeout = httpx2.Timeout(
            connect=cfg.connect_timeout,
            read=None if gevent_active() else max(cfg.first_token_timeout, cfg.idle_timeout),
            write=cfg.connect_timeout,
            pool=cfg.connect_timeout,
        )
        self._http = httpx2.Client(timeout=timeout, transport=self._transport())
        return openai.OpenAI(
            base_url=cfg.url,
            api_key=cfg.api_key or "not-needed",
            max_retries=0,
            timeout=timeout,
            # iter_raw() hands over the bytes as they came: ask for them uncompressed.
            default_headers={"Accept-Encoding": "identity"},
            http_client=self._http,
        )

    def _transport(self) -> httpx2.BaseTransport:
        cfg = self.config
        # TLS stays with httpx2: see the docstring of transport/httptools.py.
        if cfg.transport == "httptools" and cfg.url.startswith("http:"):
            return HttpToolsTransport(cfg.max_connections)
        return ShardedTransport(cfg.max_connections)

    def open_stream(
        self, body: dict[str, Any], headers: Mapping[str, str], path: str = "/chat/completions"
    ) -> httpx2.Response:
        """Send the request (to ``path``: a continuation in ``raw`` mode goes to
        ``/completions``); return the response with its body still unread."""
        try:
            return self.template(path).send(body, headers)
        except openai.APIStatusError as exc:
            raise UpstreamStatusError(
                f"upstream {self.name!r} answered HTTP {exc.status_code}: {_detail(exc)}",
                exc.status_code,
                retry_after_seconds(exc.response.headers.get("retry-after")),
                param=_given(exc, "param"),
                code=_given(exc, "code"),
            ) from None
        except openai.APITimeoutError as exc:
            if isinstance(exc.__cause__, httpx2.ConnectTimeout):
                raise ConnectTimeout(
                    f"upstream {self.name!r} at {self.config.url} did not accept a connection "
                    f"within {self.config.connect_timeout:g} s"
                ) from None
            raise FirstTokenTimeout(self.first_token_message()) from None
        except openai.APIConnectionError as exc:
            raise UpstreamUnavailable(
                f"could not reach upstream {self.name!r} at {self.config.url}: "
                f"{_cause(exc)}; is it running?"
            ) from None

    def first_token_message(self) -> str:
        return (
            f"upstream {self.name!r} sent no first token within "
            f"{self.config.first_token_timeout:g} s"
        )

    def idle_message(self) -> str:
        return f"upstream {self.name!r} sent nothing for {self.config.idle_timeout:g} s mid-stream"

    def close(self) -> None:
        if self._client is not None and self._client_pid == os.getpid():
            self._client.close()
        self._client = None


class RequestTemplate:
    """One path of one replica, as the SDK renders every request to it: its URL, its
    headers (authorization, the SDK's own, ``Accept-Encoding``) and its timeouts, taken
    from one request the SDK built (``_build_request``) and kept.

    ``send(body, headers)`` adds the body and the stage's headers (which replace any of
    the same name, as the SDK's merge does), sends it through the SDK's ``http_client``,
    and fails as the SDK's ``post`` does with ``max_retries=0``: ``APITimeoutError``,
    ``APIConnectionError``, or the SDK's ``APIStatusError`` for a status that is not 2xx
    (its body read). It answers with the response, its body unread."""

    __slots__ = ("_client", "_http", "_url", "_headers", "_names", "_extensions")

    def __init__(self, client: openai.OpenAI, http: httpx2.Client, path: str) -> None:
        built = client._build_request(
            FinalRequestOptions.construct(method="post", url=path, json_data={})
        )
        self._client = client
        self._http = http
        self._url = built.url
        # Content-Length is the body's, set for each request.
        self._headers = [(k, v) for k, v in built.headers.raw if k.lower() != b"content-length"]
        self._names = frozenset(k.decode("latin-1").lower() for k, _ in self._headers)
        self._extensions = built.extensions

    def send(self, body: dict[str, Any], headers: Mapping[str, str]) -> httpx2.Response:
        rendered: list[tuple[Any, Any]] = self._headers
        if not self._names.isdisjoint(name.lower() for name in headers):
            replaced = {name.lower() for name in headers}
            rendered = [(k, v) for k, v in rendered if k.decode("latin-1").lower() not in replaced]
        request = httpx2.Request(
            "POST",
            self._url,
            headers=[*rendered, *headers.items()],
            # The SDK's serialisation (openapi_dumps) of a body of plain JSON values.
            content=json.dumps(
                body, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode(),
            extensions=dict(self._extensions),
        )
        try:
            response = self._http.send(request, stream=True)
        except httpx2.TimeoutException as exc:
            raise openai.APITimeoutError(request=request) from exc
        except (httpx2.RequestError, OSError) as exc:
            raise openai.APIConnectionError(request=request) from exc
        if not response.is_success:
            response.read()
            raise self._client._make_status_error_from_response(response) from None
        return response


def _detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return exc.message


def _given(exc: openai.APIStatusError, name: str) -> str | None:
    """A string the upstream's error body gives as ``name`` (``param``, ``code``)."""
    body = exc.body
    value = body.get(name) if isinstance(body, dict) else None
    return value if isinstance(value, str) and value else None


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    while cause is not None and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    return str(cause) if cause is not None and str(cause) else "connection failed"


class UpstreamRegistry:
    """The configured upstreams, each with one ``ReplicaClient`` per replica. A
    replica's ``config`` is its upstream's, with ``url`` its own."""

    def __init__(self, configs: list[UpstreamConfig]) -> None:
        self._configs = {cfg.name: cfg for cfg in configs}
        self._replicas = {
            cfg.name: tuple(ReplicaClient(replace(cfg, url=url)) for url in cfg.urls)
            for cfg in configs
        }
        self._by_url = {url: cfg.name for cfg in configs for url in cfg.urls}
        #: The default upstream's first replica (None when nothing is configured).
        self.default: ReplicaClient | None = next(iter(self._replicas.values()), (None,))[0]

    def __iter__(self) -> Iterator[ReplicaClient]:
        """Every replica of every upstream: each client of this process."""
        return (upstream for replicas in self._replicas.values() for upstream in replicas)

    def replicas(self, name: str) -> tuple[ReplicaClient, ...]:
        return self._replicas[name]

    def config(self, name: str) -> UpstreamConfig:
        return self._configs[name]

    def by_name(self, name: str) -> ReplicaClient | None:
        """The upstream called ``name``, as its first replica (its name, config, body)."""
        replicas = self._replicas.get(name)
        return replicas[0] if replicas else None

    def by_url(self, url: str) -> ReplicaClient | None:
        """The upstream one of whose replicas is at ``url``."""
        name = self._by_url.get(url.rstrip("/"))
        return None if name is None else self.by_name(name)

    def names(self) -> list[str]:
        return list(self._configs)

    def usable(self, allowed: frozenset[str] | None) -> list[str]:
        """The upstreams a caller allowed only ``allowed`` (None: all) may use, in order."""
        return [n for n in self._configs if allowed is None or n in allowed]

    def resolve(
        self,
        name: str | None,
        base_url: str | None,
        allowed: frozenset[str] | None = None,
        model: str | None = None,
    ) -> ReplicaClient:
        """The upstream a request asks for, as its first replica: by ``name`` or, as the
        seed's clients do, by ``base_url`` (any replica's URL names its upstream); else the
        first upstream whose ``models`` lists ``model``; else the default, the first
        configured. Only those ``allowed`` count, when the caller may use only some: one
        it may not use answers as one that does not exist. (The fallbacks of the upstream
        it gets are the operator's routing, and are used whatever ``allowed`` says; see
        ``route``.) Raises InvalidRequest naming the field."""
        usable = self.usable(allowed)
        if name is not None:
            upstream = self.by_name(name) if name in usable else None
            if upstream is None:
                configured = ", ".join(usable) or "none"
                raise InvalidRequest(
                    f"unknown upstream {name!r}; configured: {configured}", field="upstream"
                )
        elif base_url is not None:
            upstream = self.by_url(base_url)
            if upstream is None or upstream.name not in usable:
                raise InvalidRequest(
                    "base_url must be the URL of a configured upstream; the server does not "
                    "call other hosts (use 'upstream' to choose one by name)",
                    field="base_url",
                )
        else:
            if not usable:
                raise InvalidRequest(
                    "no upstream is configured on this server: set STAGESERVER_UPSTREAM_URL "
                    "or STAGESERVER_UPSTREAMS",
                    field="upstream",
                )
            listing = next((n for n in usable if model in self._configs[n].models), usable[0])
            upstream = self._replicas[listing][0]
        if base_url is not None and base_url.rstrip("/") not in upstream.config.urls:
            raise InvalidRequest(
                f"base_url does not match upstream {upstream.name!r}", field="base_url"
            )
        return upstream

    def route(self, name: str) -> list[str]:
        """The upstreams a stage routed to ``name`` may use, in order: ``name``, then each
        of its fallbacks with that one's own fallbacks after it; each upstream once.
        ``config.py`` has refused unknown names and cycles."""
        order: list[str] = []

        def add(upstream: str) -> None:
            if upstream not in order:
                order.append(upstream)
                for fallback in self._configs[upstream].fallbacks:
                    add(fallback)

        add(name)
        return order

    def close(self) -> None:
        for upstream in self:
            upstream.close()
