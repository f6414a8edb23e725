"""Everything that speaks HTTP: the only package, beside ``app.py``, that imports Flask.

``views.py`` is the stage API (``POST /chat``, ``/stages/...``): it authenticates
(``auth.py``), reads the body (``bodies.py``), asks the ``StageManager``, and answers as
SSE through ``follow.py`` or as JSON. ``v1.py`` is OpenAI's API on the same stages
(``/v1/chat/completions``, ``/v1/models``, ``/v1/responses``); ``context.py`` is what
both share. ``errors.py`` is the one mapping from the error tree to HTTP, in the seed's
body or OpenAI's. ``ops.py`` serves health and metrics; ``apidocs.py``, ``openapi.py``
and ``openapi_v1.py`` the published contract; ``browser.py`` the browser module and the
playground; ``cors.py`` says what other origins may do.
"""
