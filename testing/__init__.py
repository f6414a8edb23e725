"""Real parts for stageserver's tests and benchmarks, never mocks: a fake OpenAI upstream
that is a real HTTP server (``fake_upstream``), the real servers started as processes
(``servers``: gunicorn, nginx, redis-server), an SSE client that reads exact wire bytes
(``sse``), a loopback proxy that cuts connections (``proxy``) and Debian's Chromium
driven by Playwright (``browser``). Both ``tests/`` and ``bench/`` import from here, and
only from here.
"""
