"""Upstreams: the OpenAI-compatible servers a stage reads from.

``clients.py`` holds one OpenAI client per replica per process and resolves the upstream
a request asks for; ``replicas.py`` chooses a replica for an attempt and keeps their
health; ``route.py`` is a stage's order of upstreams and attempts; ``relay.py`` reads one
stage's stream to its end, and continues an answer cut short (``continuation.py``: how
each upstream takes a partial answer, with the chat templates of ``template.py``);
``chunks.py`` and ``sse.py`` read the chunk format and split the body; ``health.py`` is
the readiness probe. Beneath the clients, ``transport/``.
"""
