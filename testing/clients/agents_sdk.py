"""The OpenAI Agents SDK (``openai-agents``): an agent with a function tool, run streamed
on either of its models, ``OpenAIResponsesModel`` (its default, ``/v1/responses``) or
``OpenAIChatCompletionsModel`` (``/v1/chat/completions``), with an ``AsyncOpenAI`` client
of stageserver's.

Tracing is disabled: its exporter would send each run's trace to api.openai.com.
"""

from __future__ import annotations

import asyncio

from agents import (
    Agent,
    Model,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI
from openai.types.responses import ResponseTextDeltaEvent

from testing.clients.report import INSTRUCTIONS, PROMPT, Report, arguments, get_weather


async def main() -> None:
    args = arguments(("responses", "chat"))
    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    model: Model
    if args.api == "responses":
        model = OpenAIResponsesModel(model=args.model, openai_client=client)
    else:
        model = OpenAIChatCompletionsModel(model=args.model, openai_client=client)
    agent = Agent(
        name="weather", instructions=INSTRUCTIONS, tools=[function_tool(get_weather)], model=model
    )
    report = Report(f"openai-agents {type(model).__name__}", ("openai-agents", "openai"))
    run = Runner.run_streamed(agent, PROMPT)
    async for event in run.stream_events():
        if event.type == "raw_response_event" and isinstance(event.data, ResponseTextDeltaEvent):
            report.streamed.append(event.data.delta)
    report.final = str(run.final_output)
    report.print()


if __name__ == "__main__":
    asyncio.run(main())
