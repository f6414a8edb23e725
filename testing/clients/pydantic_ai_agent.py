"""pydantic-ai (``pydantic-ai-slim[openai]``): an agent with a function tool on
``OpenAIResponsesModel`` (``/v1/responses``), or ``OpenAIChatModel``
(``/v1/chat/completions``), run streamed: ``run_stream`` runs the tool, then streams the
final text."""

from __future__ import annotations

import asyncio

from pydantic_ai import Agent
from pydantic_ai.models import Model
from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
from pydantic_ai.providers.openai import OpenAIProvider

from testing.clients.report import INSTRUCTIONS, PROMPT, Report, arguments, get_weather


async def main() -> None:
    args = arguments(("responses", "chat"))
    provider = OpenAIProvider(base_url=args.base_url, api_key=args.api_key)
    model: Model
    if args.api == "responses":
        model = OpenAIResponsesModel(args.model, provider=provider)
    else:
        model = OpenAIChatModel(args.model, provider=provider)
    agent = Agent(model, instructions=INSTRUCTIONS, tools=[get_weather])
    report = Report(f"pydantic-ai {type(model).__name__}", ("pydantic-ai-slim", "openai"))
    async with agent.run_stream(PROMPT) as run:
        async for delta in run.stream_text(delta=True):
            report.streamed.append(delta)
        report.final = await run.get_output()
    report.print()


if __name__ == "__main__":
    asyncio.run(main())
