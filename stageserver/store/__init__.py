"""The shared stage store in Redis (``STAGESERVER_STORE_URL``): stages of other
workers and hosts, found, followed, cancelled and taken over.

``stage_store.py`` is the seam the stage manager holds (``StageStore``), with the store of
a process alone beside it (``LocalStore``). ``mirror.py`` is the store in Redis as the
manager and a stage see it (``RedisStageStore``, a ``StageStore`` and so a listener), a
facade over its parts:

- ``flusher.py`` writes the stages of this process to Redis, in batches, and publishes
  what it wrote;
- ``takeover.py`` says who runs each stage: the claim, the takeover of an orphan, the
  handoff, the sweeper, and the end of a stage whose owner died (``reap_orphan``);
- ``cancels.py`` is the cancel channel, both sides; ``idempotency.py`` the idempotency
  keys;
- ``reader.py`` reads stages of other processes, and only reads; ``remote_feed.py``
  follows their events; ``stored.py`` is one of them as a request sees it
  (``StoredStage``, a ``StageHandle``);
- ``leases.py`` renews what a worker holds while it lives; ``retention.py`` says how
  long a stage is kept after its end;
- ``scripts.py`` holds the Lua scripts (on a stage's keys, and the admission on a
  principal's limits), each with its arguments named; ``entries.py`` is the format of a
  stage's log;
- ``batch.py`` sends a batch of commands in one round trip per node; ``connection.py``
  connects (Redis, Sentinel or Redis Cluster) and turns the store's errors into
  ``StoreUnavailable``; ``keys.py`` names every key and channel.

From the facade down to the key names, each imports only what lies below it: the
store's layers contract in ``pyproject.toml`` (import-linter) orders them.
"""
