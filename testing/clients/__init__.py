"""Real clients of OpenAI's API, as their users write them, run against stageserver by
``tests/test_real_clients.py``: the OpenAI Agents SDK, pydantic-ai, LangChain and
LiteLLM, each with a function tool, streamed.

They run in a venv of their own (``venv.py``), with the newest release of each from
PyPI, never in the test's venv, which pins the server's ``openai``: so the test sees what
a user's newest SDK sends. Each program is run as ``python -m testing.clients.<name>
BASE_URL API_KEY MODEL [API]`` from the checkout and prints one JSON object
(``report.py``): what the tool was called with, the text streamed, and the run's final
output. None of them is imported by the test's own venv: mypy reads them with the
clients' packages as unknown (``pyproject.toml``).
"""
