"""``stageserver serve``: check the ports and the model, start, say how to use it, and
stop everything on a signal or a failure."""

from __future__ import annotations

import importlib.util
import json
import shlex
import signal
import socket
from collections.abc import Mapping
from pathlib import Path

from ..errors import ConfigError
from .model import MODEL_NAME, default_model_path
from .settings import LaunchError, read_settings
from .supervisor import Stopped, Supervisor, say


def check_port_free(host: str, port: int, key: str) -> None:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        raise LaunchError(f"{key}: cannot resolve {host!r}: {exc}") from None
    with socket.socket(family, kind, proto) as sock:
        # As the servers themselves will: a port held only by TIME_WAIT connections is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == 98:  # EADDRINUSE
                raise LaunchError(
                    f"port {port} on {host} is already in use ({key}); stop what is "
                    f"listening there or set {key} to another port"
                ) from None
            raise LaunchError(f"cannot listen on {host}:{port} ({key}): {exc.strerror}") from None


def ready_message(url: str, upstream: str, model_name: str) -> str:
    request = {
        "stage_id": "hello-1",
        "model_name": model_name,
        "user_prompt": "What is the capital of France?",
        "stream": True,
        "max_tokens": 64,
    }
    data = json.dumps(request, separators=(",", ":"))
    curl = f"curl -N {url}/chat -H 'Content-Type: application/json' -d {shlex.quote(data)}"
    sdk = (
        f'OpenAI(base_url="{url}/v1", api_key="none").chat.completions.create('
        f'model="{model_name}", messages=[{{"role": "user", "content": "Hi!"}}])'
    )
    return (
        f"stageserver is ready: {url}\n"
        f"  upstream: {upstream}\n"
        "Try it (each stage needs a new stage_id while the last one runs):\n"
        f"  {curl}\n"
        "Or with the openai SDK (pip install openai; from openai import OpenAI):\n"
        f"  {sdk}\n"
        "Ctrl-C stops everything.\n"
    )


def run(environ: Mapping[str, str]) -> int:
    try:
        settings = read_settings(environ)
    except (ConfigError, LaunchError) as exc:
        say(str(exc))
        return 1
    embedded = settings.upstream is None
    supervisor = Supervisor(settings)
    previous = {
        signum: signal.signal(signum, supervisor.on_signal)
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        check_port_free(settings.bind_host, settings.bind_port, "STAGESERVER_BIND")
        if embedded:
            if settings.model_port == settings.bind_port:
                raise LaunchError(
                    f"STAGESERVER_EMBEDDED_MODEL_PORT and STAGESERVER_BIND both use port "
                    f"{settings.bind_port}; give the model server another port"
                )
            check_port_free("127.0.0.1", settings.model_port, "STAGESERVER_EMBEDDED_MODEL_PORT")
            model_path = Path(settings.model_path) if settings.model_path else default_model_path()
            if not model_path.is_file():
                raise LaunchError(
                    f"the embedded model file {model_path} is missing; run scripts/setup.sh, "
                    "set STAGESERVER_EMBEDDED_MODEL_PATH to a GGUF file, or set "
                    "STAGESERVER_UPSTREAM_URL to use another upstream"
                )
            if importlib.util.find_spec("llama_cpp") is None:
                raise LaunchError(
                    "llama-cpp-python is not installed; run scripts/setup.sh, or set "
                    "STAGESERVER_UPSTREAM_URL to use another upstream"
                )
            model_url = supervisor.start_model(model_path)
            url = supervisor.start_gunicorn(
                {
                    "STAGESERVER_UPSTREAM_URL": model_url,
                    "STAGESERVER_UPSTREAM_KIND": "llamacpp",
                    # llama-cpp-python continues no chat message: an answer cut short is
                    # continued through /completions, with the template from the GGUF.
                    "STAGESERVER_UPSTREAM_CONTINUATION": "raw",
                    "STAGESERVER_UPSTREAM_CHAT_TEMPLATE": str(model_path),
                }
            )
            upstream = (
                f"embedded llama.cpp at {model_url}, {model_path.name} "
                f'(any model_name works; it lists itself as "{MODEL_NAME}")'
            )
            print(ready_message(url, upstream, MODEL_NAME), end="", flush=True)
        else:
            url = supervisor.start_gunicorn({})
            upstream = f"{settings.upstream} (put that upstream's model in model_name)"
            print(ready_message(url, upstream, "MODEL"), end="", flush=True)
        supervisor.supervise()
    except Stopped:
        quick = supervisor.signals[0] == signal.SIGINT
        say("stopping" + (" (quick)" if quick else ""))
        supervisor.stop(quick=quick)
        say("stopped")
        return 0
    except LaunchError as exc:
        say(str(exc))
        if supervisor.model or supervisor.gunicorn:
            say("stopping what was started")
        supervisor.stop(quick=False)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
