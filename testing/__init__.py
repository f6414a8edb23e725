"""Real parts for stageserver's tests and benchmarks, never mocks. Both ``tests/`` and
``bench/`` import from here, and only from here: a test module imports no other test
module (an import-linter contract in ``pyproject.toml`` holds it), so what two tests
share lives in one of these, each of one concern.

The parts:

- ``fake_upstream/``: a fake OpenAI upstream that is a real HTTP server, with fault modes.
- ``servers``: the real servers, started as processes on free loopback ports: gunicorn
  running stageserver, nginx, redis-server, Sentinels, a Redis Cluster, prometheus.
- ``hosts``: a gunicorn host's workers found, named as a stage's record names them, and
  a whole host killed at once.
- ``topology``: the three ways stageserver is deployed (one worker, two hosts on Redis,
  two hosts on a Redis Cluster), started once per session, over which a scenario is
  written once; ``shards``: where a stage's keys and a principal's limits live on a
  cluster.
- ``apps``: stageserver apps in the test's own process, driven by Flask's test client.

What a test reads and checks:

- ``sse``: a ``POST /chat`` over ``requests``, exact wire bytes in, events out, and the
  checks of a stage's events (each once, resumed exactly once, continued once).
- ``sockets``: a stream on a bare socket, read until a marker, dropped at will.
- ``metrics``: Prometheus's text format, read sample by sample.
- ``takeover``: what a takeover leaves: the upstream's requests of one stage, the
  continuation asked from the durable text, a host's count of continuations.
- ``field_rows``: what a row of a dialect's field table is expected to do on the wire
  (sent, dropped, refused, built), and the docs' table of the rows.

How the tests run:

- ``processes``: a pytest plugin that marks ``processes`` each test that starts a
  process, and fails one that starts one unmarked (``pytest -m "not processes"`` is the
  inner loop).
- ``threads``: a pytest plugin that fails a test that leaves a stageserver background
  thread running (an app it made and did not close).
- ``schedule``: a pytest plugin that hands the longest modules out first when
  ``scripts/test`` runs the suite on several workers.

Around the server:

- ``proxy``: a loopback proxy that cuts connections on command.
- ``browser``: Debian's Chromium driven by Playwright, watched for console errors.
- ``js/``: the openai npm package's programs, run by node.
- ``clients/``: real OpenAI clients (Agents SDK, pydantic-ai, LangChain, LiteLLM) run in
  a venv of their own.
- ``anthropic_sdk``: Anthropic's Python SDK in a venv of its own, running
  ``anthropic_client``, the program that calls it with a plan.
- ``venvs``: fresh venvs outside the checkout, to test the package as a user installs it.
"""
