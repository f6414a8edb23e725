"""Nothing hangs and nothing leaks: each fault injected into real servers, and measured.

    .venv/bin/python -m bench.faults [--only NAME,...] [--quick] [--out DIR]

Each fault starts what it needs (gunicorn via ``testing.servers``, the fake upstream,
redis-server or a Sentinel group), warms it up, reads the worker's baseline, injects the
fault and then reports, from what the clients saw:

- what happened, checked (terminal events counted per client, exactly once where it
  applies), never assumed;
- the time to terminal: from the injection to the moment the last affected client had its
  terminal event (or was let go, or stopped reconnecting);
- what was left over once settled: greenlets (open responses and running stages, from
  ``/metrics``), descriptors above the baseline, RSS delta, upstream connections still open
  in the fake upstream's view.

It prints one markdown table, and the plateau and per-stage memory lines, and writes them
to ``bench/results/<stamp>-faults.md``; it exits 1 when a fault's outcome was wrong.

The faults (``--only`` names), one module per group:

- ``store``: ``owner-sigkill``, ``redis-restart``, ``sentinel-failover``;
- ``continuation``: ``host-sigkill`` (a host SIGKILLed, its answers continued on
  another), ``replica-cut`` (a replica that cuts answers mid-way, continued on the other);
- ``messages``: ``host-sigkill-messages``, ``replica-cut-messages``: the same, the
  streams through Anthropic's Messages API (``/v1/messages``);
- ``lifecycle``: ``worker-restart`` (max_requests), ``burst-then-quiet``;
- ``clients_faults``: ``frozen-clients``, ``eventsource-after-end``, ``half-close``;
- ``memory``: ``churn`` (the plateau), ``stage-memory`` (with ``stage_cost``, in-process).
"""
