"""A stage's request to its upstream: the body of each attempt, built from the request
model (``schemas.ChatRequest``) and the replica the attempt goes to.

The seed's ``system_prompt`` and ``user_prompt`` become the messages; ``max_tokens``
falls back to ``STAGESERVER_DEFAULT_MAX_TOKENS``. Each upstream kind keeps its quirks,
and a fallback may serve the stage under a model name of its own
(``UpstreamConfig.model_for``).
"""

from __future__ import annotations

from typing import Any

from ..schemas import ChatRequest
from .clients import Upstream


class RequestBody:
    """The body of every attempt of one stage: ``body(replica)``, as the relay asks."""

    def __init__(self, request: ChatRequest, default_max_tokens: int) -> None:
        self.model = request.model_name
        self.messages = [{"role": "user", "content": request.user_prompt}]
        if request.system_prompt:
            self.messages.insert(0, {"role": "system", "content": request.system_prompt})
        self.max_tokens = request.max_tokens or default_max_tokens
        self.temperature = request.temperature

    def __call__(self, replica: Upstream) -> dict[str, Any]:
        config = replica.config
        body: dict[str, Any] = {
            "model": config.model_for(self.model),
            "messages": self.messages,
            "max_tokens": self.max_tokens,
            "stream": True,
        }
        if self.temperature is not None:
            body["temperature"] = self.temperature
        # Every kind takes it (llama-cpp-python ignores it); usage then comes in a last chunk.
        body["stream_options"] = {"include_usage": True}
        if config.kind == "ollama":
            # Ollama's OpenAI endpoint ignores max_tokens on some versions; OpenAI itself
            # rejects unknown fields, so only this kind gets it.
            body["options"] = {"num_predict": self.max_tokens}
        return body
