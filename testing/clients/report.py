"""What every client program shares: its arguments, the tool it gives the model, and the
report it prints.

The tool is ``get_weather(city)``; each call is noted, with the arguments the model gave,
so the report shows that the tool ran, and with what. The report is one line of JSON on
stdout:

    {"client": "openai-agents", "versions": {"openai-agents": "0.24.0", ...},
     "tool_calls": [{"city": "Paris"}], "streamed": "...", "final": "..."}

``streamed`` is the text as the client's stream gave it, delta by delta; ``final`` is the
run's final output as the client gives it once the stream has ended.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

#: The description every client gives the tool, and its JSON schema where a client
#: takes one (LiteLLM); the others make it from ``get_weather``'s signature.
WEATHER_DESCRIPTION = "The weather in a city."
WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
PROMPT = "What is the weather in Paris?"
INSTRUCTIONS = "Answer with the weather; call get_weather to learn it."

#: Each call of ``get_weather``, with the arguments the model gave.
calls: list[dict[str, Any]] = []


def get_weather(city: str) -> str:
    """The weather in a city."""
    calls.append({"city": city})
    return f"sunny in {city}"


@dataclass(frozen=True)
class Arguments:
    base_url: str
    api_key: str
    model: str
    api: str


def arguments(apis: tuple[str, ...]) -> Arguments:
    """The program's arguments: stageserver's OpenAI base URL (``…/v1``), its API key, the
    model, and which of OpenAI's APIs to use (one of ``apis``)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("base_url")
    parser.add_argument("api_key")
    parser.add_argument("model")
    parser.add_argument("api", choices=apis, nargs="?", default=apis[0])
    parsed = parser.parse_args()
    return Arguments(parsed.base_url, parsed.api_key, parsed.model, parsed.api)


@dataclass
class Report:
    client: str
    #: The distributions whose versions the report names (the client, and ``openai``).
    distributions: tuple[str, ...]
    streamed: list[str] = field(default_factory=list)
    final: str | None = None

    def print(self) -> None:
        print(
            json.dumps(
                {
                    "client": self.client,
                    "versions": {name: version(name) for name in self.distributions},
                    "tool_calls": calls,
                    "streamed": "".join(self.streamed),
                    "final": self.final,
                }
            )
        )
