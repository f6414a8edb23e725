"""A stage's request to its upstream: the body of each attempt, built from the stage's
conversation (``stages.conversation.Conversation``) and the replica the attempt goes to.

``max_tokens`` falls back to ``STAGESERVER_DEFAULT_MAX_TOKENS``. Each upstream kind keeps
its quirks, and a fallback may serve the stage under a model name of its own
(``UpstreamConfig.model_for``). The conversation's fields beyond OpenAI's API go only to
a replica whose ``extra_fields`` takes them: the upstream the request named takes them
all (the manager refused any it does not), a fallback of another kind maybe none. So do
its ``hints``, which are never refused; a field of both is the two objects merged.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequest
from ..stages.conversation import Conversation
from .clients import ReplicaClient


def check_extra_fields(conversation: Conversation, upstream: ReplicaClient) -> None:
    """Refuse the first of the conversation's fields beyond OpenAI's API that ``upstream``
    (the one its request resolved to) does not take, as OpenAI refuses an unknown field."""
    for name in conversation.extra:
        if not upstream.config.takes_extra(name):
            raise InvalidRequest(
                f"{name}: is not supported by this server (upstream {upstream.name!r} takes no "
                "such field; its extra_fields lists those it takes)",
                field=name,
                code="unsupported_parameter",
            )


class RequestBody:
    """The body of every attempt of one stage: ``body(replica)``, as the relay asks."""

    def __init__(self, conversation: Conversation, default_max_tokens: int) -> None:
        self.conversation = conversation
        self.max_tokens = conversation.max_tokens or default_max_tokens

    def __call__(self, replica: ReplicaClient) -> dict[str, Any]:
        config = replica.config
        conversation = self.conversation
        body: dict[str, Any] = {
            "model": config.model_for(conversation.model),
            "messages": list(conversation.messages),
            "max_tokens": self.max_tokens,
            "stream": True,
            **conversation.passed,
        }
        for name, value in conversation.hints.items():
            if config.takes_extra(name):
                body[name] = value
        for name, value in conversation.extra.items():
            if config.takes_extra(name):
                hint = body.get(name)
                if isinstance(hint, dict) and isinstance(value, dict):
                    value = {**hint, **value}
                body[name] = value
        # Every kind takes it (llama-cpp-python ignores it); usage then comes in a last chunk.
        body["stream_options"] = {"include_usage": True}
        if config.kind == "ollama":
            # Ollama's OpenAI endpoint ignores max_tokens on some versions; OpenAI itself
            # rejects unknown fields, so only this kind gets it, with the request's own.
            given = body.get("options")
            options = given if isinstance(given, dict) else {}
            body["options"] = {**options, "num_predict": self.max_tokens}
        return body
