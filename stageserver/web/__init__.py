"""Everything that speaks HTTP: the only package, beside ``app.py``, that imports Flask.

``views.py`` is the stage API (``POST /chat``, ``/stages/...``): it authenticates
(``auth.py``), reads the body (``bodies.py``), asks the ``StageManager``, and answers as
SSE through ``follow.py`` or as JSON. ``errors.py`` is the one mapping from the error tree
to HTTP. ``ops.py`` serves health and metrics, ``apidocs.py`` and ``openapi.py`` the
published contract, ``browser.py`` the browser module and the playground, ``cors.py``
what other origins may do.
"""
