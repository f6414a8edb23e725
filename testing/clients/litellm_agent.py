"""LiteLLM as a client: ``litellm.completion`` (Chat Completions) or ``litellm.responses``
(Responses), streamed, with an ``openai/`` model and ``api_base`` naming stageserver, as
LiteLLM's docs say to reach any OpenAI-compatible server. The tool loop is the one of
LiteLLM's function-calling guide: the call read off the stream, the tool run, its result
sent back, until a turn answers in text.

The model is registered as one that streams (``supports_native_streaming``), as a
self-hosted model must be: LiteLLM looks every model up in its own catalogue, and
``litellm.responses(stream=True)`` on one it does not find sends ``stream: false`` and
makes up the events from the whole answer (BerriAI/litellm#21090, open as of 1.110).
Chat Completions streams any model.

``LITELLM_LOCAL_MODEL_COST_MAP=True`` (the test's environment) keeps LiteLLM from
fetching its catalogue from GitHub when it is imported.
"""

from __future__ import annotations

import json
from typing import Any

import litellm

from testing.clients.report import (
    INSTRUCTIONS,
    PROMPT,
    WEATHER_DESCRIPTION,
    WEATHER_PARAMETERS,
    Arguments,
    Report,
    arguments,
    get_weather,
)

#: A model that calls tools for ever is cut off here.
MAX_TURNS = 3


def chat_completions(args: Arguments, report: Report) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": WEATHER_DESCRIPTION,
                "parameters": WEATHER_PARAMETERS,
            },
        }
    ]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": PROMPT},
    ]
    for _ in range(MAX_TURNS):
        chunks = []
        for chunk in litellm.completion(
            model=f"openai/{args.model}",
            api_base=args.base_url,
            api_key=args.api_key,
            messages=messages,
            tools=tools,
            stream=True,
        ):
            chunks.append(chunk)
            if chunk.choices and chunk.choices[0].delta.content:
                report.streamed.append(chunk.choices[0].delta.content)
        message = litellm.stream_chunk_builder(chunks, messages=messages).choices[0].message
        if not message.tool_calls:
            report.final = message.content
            return
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            result = get_weather(**json.loads(call.function.arguments))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})


def responses(args: Arguments, report: Report) -> None:
    tools = [
        {
            "type": "function",
            "name": "get_weather",
            "description": WEATHER_DESCRIPTION,
            "parameters": WEATHER_PARAMETERS,
        }
    ]
    items: list[dict[str, Any]] = [{"role": "user", "content": PROMPT}]
    for _ in range(MAX_TURNS):
        completed: Any = None
        for event in litellm.responses(
            model=f"openai/{args.model}",
            api_base=args.base_url,
            api_key=args.api_key,
            instructions=INSTRUCTIONS,
            input=items,
            tools=tools,
            stream=True,
        ):
            if event.type == "response.output_text.delta":
                report.streamed.append(event.delta)
            elif event.type == "response.completed":
                completed = event.response
        assert completed is not None, "the stream ended without response.completed"
        calls = [item for item in completed.output if item.type == "function_call"]
        if not calls:
            report.final = "".join(
                part.text
                for item in completed.output
                if item.type == "message"
                for part in item.content
                if part.type == "output_text"
            )
            return
        for call in calls:
            result = get_weather(**json.loads(call.arguments))
            items.append(
                {
                    "type": "function_call",
                    "call_id": call.call_id,
                    "name": call.name,
                    "arguments": call.arguments,
                }
            )
            items.append(
                {"type": "function_call_output", "call_id": call.call_id, "output": result}
            )


def main() -> None:
    args = arguments(("chat", "responses"))
    litellm.suppress_debug_info = True  # its hints ("Provider List: ...") go to stdout
    litellm.register_model(
        {f"openai/{args.model}": {"litellm_provider": "openai", "supports_native_streaming": True}}
    )
    report = Report(f"litellm {args.api}", ("litellm", "openai"))
    if args.api == "chat":
        chat_completions(args, report)
    else:
        responses(args, report)
    report.print()


if __name__ == "__main__":
    main()
