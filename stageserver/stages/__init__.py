"""Stages: one chat completion each, recorded as an ordered event log.

The stage (``stage.py``) keeps its log (``log.py``), its subscribers, its grace timer and
its terminal state, and calls its listeners (``StageListener``) in the order it was given
them. ``spec.py`` holds what a stage is given, ``records.py`` what it keeps of its attempts and
continuations, ``events.py`` how its events look on the
wire, ``registry.py`` this process's stages, ``usage.py`` its token count, ``feeds.py``
where a response's events come from. No Flask, no Redis, no upstream: a stage is tested
in-process with plain bytes.
"""
