"""What choosing a replica costs a stage, in-process: a stage's route made, an attempt
leased, its first chunk and its release reported, with the per-replica metrics in
prometheus_client's multiprocess mode (as under gunicorn). No upstream is called.

    .venv/bin/python -m bench.pool_cost

The end-to-end figure is ``bench.run --targets stageserver,stageserver+pool``; this one
isolates the pool's own work, which is per stage, never per chunk.
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="pool-cost-"))

from stageserver.config import apply_defaults, upstream_configs  # noqa: E402
from stageserver.telemetry import metrics  # noqa: E402  (after the variable: multiprocess mode)
from stageserver.upstream.clients import UpstreamRegistry  # noqa: E402
from stageserver.upstream.route import ReplicaSets  # noqa: E402

STAGES = 20_000


def per_stage_us(replicas: int) -> float:
    """The best of five runs of ``STAGES`` stages, in µs per stage."""
    urls = [f"http://127.0.0.1:{9000 + n}/v1" for n in range(replicas)]
    config = {"STAGESERVER_UPSTREAMS": {"default": {"urls": urls}}}
    apply_defaults(config, {})
    pools = ReplicaSets(UpstreamRegistry(upstream_configs(config)), metrics.ReplicaMetrics())
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(STAGES):
            attempt = pools.route("default").next_attempt()
            assert attempt is not None
            attempt.served_first_chunk()
            attempt.release()
        best = min(best, (time.perf_counter() - started) / STAGES * 1e6)
    return best


def main() -> None:
    for replicas in (1, 2, 8):
        cost = per_stage_us(replicas)
        print(
            f"{replicas} replica(s): {cost:.1f} µs per stage, {cost / 52:.2f} µs per chunk "
            "of a 52-chunk stream"
        )


if __name__ == "__main__":
    main()
