"""LangChain (``langchain-openai``'s ``ChatOpenAI``): a function tool bound to the model,
and the loop of LangChain's tool-calling guide, streamed: each turn's chunks added up,
the tool run on the calls they hold, its result sent back as a ``ToolMessage``, until a
turn answers in text. On ``/v1/chat/completions``, or on ``/v1/responses`` with
``use_responses_api=True``."""

from __future__ import annotations

from langchain_core.messages import (
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from testing.clients.report import INSTRUCTIONS, PROMPT, Report, arguments, get_weather

#: A model that calls tools for ever is cut off here.
MAX_TURNS = 3


def main() -> None:
    args = arguments(("chat", "responses"))
    weather = tool(get_weather)
    llm = ChatOpenAI(
        base_url=args.base_url,
        api_key=SecretStr(args.api_key),
        model=args.model,
        use_responses_api=args.api == "responses",
        max_retries=0,
    ).bind_tools([weather])
    report = Report(f"langchain-openai ChatOpenAI ({args.api})", ("langchain-openai", "openai"))
    messages: list[BaseMessage] = [SystemMessage(INSTRUCTIONS), HumanMessage(PROMPT)]
    for _ in range(MAX_TURNS):
        turn: AIMessageChunk | None = None
        for chunk in llm.stream(messages):
            assert isinstance(chunk, AIMessageChunk)
            report.streamed.append(str(chunk.text))
            turn = chunk if turn is None else turn + chunk
        assert turn is not None, "the stream held no chunk"
        messages.append(turn)
        if not turn.tool_calls:
            report.final = str(turn.text)
            break
        for call in turn.tool_calls:
            messages.append(ToolMessage(weather.invoke(call["args"]), tool_call_id=call["id"]))
    report.print()


if __name__ == "__main__":
    main()
