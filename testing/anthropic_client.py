"""Anthropic's official Python SDK (``anthropic``) against a stageserver, run by
``testing/anthropic_sdk.py`` in a venv of its own: ``python anthropic_client.py <plan>``.

The plan is JSON: ``{"base_url", "api_key" | "auth_token", "call", "params", "async"}``;
``call`` is one of

- ``create``: ``messages.create(**params)``; with ``stream``, every raw event;
- ``stream``: ``messages.stream(**params)``: every event it gives (the raw ones, and its
  own ``text``, ``thinking``, ``input_json`` and ``signature``), then the final message;
- ``tool_round``: ``messages.create(**params)``, then again with the answer sent back
  (``Message.to_param()``) and a ``tool_result`` for each ``tool_use`` (its content
  ``"result of <name>"``): both messages;
- ``count_tokens``: ``messages.count_tokens(**params)``;
- ``models``: every model of ``models.list(**params)``, page after page.

One JSON line on stdout per thing received, ``{"kind", "value"}`` (values as the SDK's
``to_dict()``), then ``{"kind": "end"}``; an API error is ``{"kind": "error", "value":
{"class", "status", "body", "message"}}``. The client retries nothing: a failure shows as
it is.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import anthropic


def emit(kind: str, value: Any) -> None:
    sys.stdout.write(json.dumps({"kind": kind, "value": value}) + "\n")
    sys.stdout.flush()


def dump(item: Any) -> Any:
    return item.to_dict(mode="json") if hasattr(item, "to_dict") else item


def results(message: Any) -> list[dict[str, Any]]:
    """A ``tool_result`` for each ``tool_use`` of ``message``."""
    return [
        {"type": "tool_result", "tool_use_id": block.id, "content": f"result of {block.name}"}
        for block in message.content
        if block.type == "tool_use"
    ]


def run(client: anthropic.Anthropic, call: str, params: dict[str, Any]) -> None:
    if call == "create":
        answer = client.messages.create(**params)
        if params.get("stream"):
            for event in answer:
                emit("event", dump(event))
        else:
            emit("message", dump(answer))
    elif call == "stream":
        with client.messages.stream(**params) as stream:
            for event in stream:
                emit("event", dump(event))
            emit("final", dump(stream.get_final_message()))
    elif call == "tool_round":
        first = client.messages.create(**params)
        emit("message", dump(first))
        messages = [*params["messages"], first.to_param()]
        messages.append({"role": "user", "content": results(first)})
        emit("message", dump(client.messages.create(**{**params, "messages": messages})))
    elif call == "count_tokens":
        emit("count", dump(client.messages.count_tokens(**params)))
    elif call == "models":
        for model in client.models.list(**params):
            emit("model", dump(model))
    else:
        raise ValueError(f"unknown call {call!r}")


async def run_async(client: anthropic.AsyncAnthropic, call: str, params: dict[str, Any]) -> None:
    if call == "create":
        answer = await client.messages.create(**params)
        if params.get("stream"):
            async for event in answer:
                emit("event", dump(event))
        else:
            emit("message", dump(answer))
    elif call == "stream":
        async with client.messages.stream(**params) as stream:
            async for event in stream:
                emit("event", dump(event))
            emit("final", dump(await stream.get_final_message()))
    else:
        raise ValueError(f"no async {call!r} here")


def main() -> None:
    plan = json.loads(sys.argv[1])
    auth = {key: plan[key] for key in ("api_key", "auth_token") if key in plan}
    options: dict[str, Any] = {"base_url": plan["base_url"], "max_retries": 0, "timeout": 30}
    try:
        if plan.get("async"):

            async def go() -> None:
                async with anthropic.AsyncAnthropic(**options, **auth) as client:
                    await run_async(client, plan["call"], plan.get("params", {}))

            asyncio.run(go())
        else:
            with anthropic.Anthropic(**options, **auth) as client:
                run(client, plan["call"], plan.get("params", {}))
    except anthropic.APIStatusError as exc:
        emit(
            "error",
            {
                "class": type(exc).__name__,
                "status": exc.status_code,
                "body": exc.body,
                "message": exc.message,
            },
        )
    emit("end", None)


if __name__ == "__main__":
    main()
