"""What the APIs that speak HTTP share, and OpenAI's API: with ``app.py``, the seed's
views (``views.py``) and the SSE response (``stream.py``), the only code that imports
Flask.

The seed's views (``../views.py``: ``POST /chat``, ``/stages/...``) and OpenAI's
(``v1.py``: ``/v1/chat/completions``, ``/v1/models``, ``/v1/responses``) authenticate
(``auth.py``), read the body (``bodies.py``), ask the ``StageManager``, and answer as SSE
(``../stream.py``) or as JSON; ``context.py`` is what they share. ``errors.py`` is the
one mapping from the error tree to HTTP, in the seed's body or OpenAI's. ``ops.py``
serves health and metrics; ``apidocs.py``, ``openapi.py`` and ``openapi_v1.py`` the
published contract; ``browser.py`` the browser module and the playground; ``cors.py``
says what other origins may do.
"""
