"""Prometheus metrics (served at ``/metrics`` by ``ops.py``), kept by a stage listener.

Under gunicorn each worker counts its own stages, and a scrape reaches one worker only.
prometheus_client's multiprocess mode makes the answer right whichever worker gives it:
every process writes its values to files in ``PROMETHEUS_MULTIPROC_DIR`` and a scrape
adds up the files of all of them, live or dead (so counters never go back when a worker
is replaced). ``gunicorn_conf.py`` creates that directory before the workers fork, removes
the live-gauge files of a worker that exits, and deletes the directory at the end. The
variable must be set before prometheus_client is first imported, which is why the
metrics below are created at import, in the worker, after the fork.

Without the variable (``flask run``, the Flask test client) the process's default
registry is served, with prometheus_client's process and GC metrics besides ours.

Metrics (labels in brackets):

- ``stageserver_stages_total`` [upstream, outcome]: stages finished; outcome is the
  terminal event, ``done``, ``error`` or ``cancel``.
- ``stageserver_dialect_stages_total`` [dialect, outcome]: the same stages by the API that
  served them: ``seed`` (``/chat``), ``chat.completions`` or ``responses`` (``/v1``).
- ``stageserver_stage_continuations_total`` [mode, reason, outcome]: answers continued
  after a failure (``upstream/continuation.py``), or not: reason ``upstream_failed``,
  ``owner_lost`` or ``drain``; outcome ``ok``, ``failed`` (its first chunk did not come),
  ``length`` (no token was left) or ``refused`` (it could not be asked for).
- ``stageserver_time_to_first_token_seconds`` [upstream]: histogram, from the stage's
  start to its first chunk; stages that got no chunk are not observed.
- ``stageserver_stream_duration_seconds`` [upstream, outcome]: histogram, from the
  stage's start to its terminal event.
- ``stageserver_store_write_delay_seconds``: histogram, with a shared store: for each
  write to Redis (a flush), from the oldest event in it being relayed to Redis holding
  it (a client reads an event only then).
- ``stageserver_chunks_relayed_total`` [upstream]: upstream chunks relayed, added when
  their stage finishes (a long stream shows up at its end).
- ``stageserver_active_streams`` [upstream]: stages running now, from start to finish,
  summed over live workers. The admission limit applies to the same count, per worker.
- ``stageserver_upstream_errors_total`` [upstream, kind]: stages ended by an upstream
  failure; kind is the failure's class in stageserver/errors.py, an ``UpstreamFailure``
  (``UpstreamUnavailable``, ``FirstTokenTimeout``, ...). Shutdown, store and internal
  errors are not counted.
- ``stageserver_open_responses``: HTTP responses following a stage now (each holds a
  greenlet and a descriptor), summed over live workers.
- ``stageserver_stages_refused_total`` [reason]: ``/chat`` answered 503 before a stage
  started; reason is ``overload`` or ``shutting_down``.
- ``stageserver_stage_errors_total`` [upstream, fault]: the stages of
  ``stageserver_stages_total`` that ended in ``error``, by whose fault (``fault_of``):
  ``caller`` (the upstream refused the request itself: a 4xx other than 401, 403, 407, 408 and
  429), ``upstream`` (any other upstream failure) or ``stageserver`` (its own: shutdown, a
  lost lease, an internal error). An alert on errors leaves ``caller`` out.
- ``stageserver_principal_stages_total`` [principal, outcome],
  ``stageserver_principal_tokens_total`` [principal, kind] and
  ``stageserver_principal_refused_total`` [principal, limit]: per principal (its name,
  ``anonymous`` when the server is open), the stages it finished, the tokens they used
  (prompt, completion) and the stages its limits refused.

The families above count a stage under the upstream its request resolved to, whichever
replica or fallback served it (the active-stream gauge must go down under the label it
went up under). Per replica, kept by the pools (``ReplicaMetrics``, a ``ReplicaEvents``), with
labels upstream and replica (the replica's URL without credentials; configuration bounds
how many there are):

- ``stageserver_replica_requests_total``: attempts begun on the replica.
- ``stageserver_replica_failures_total`` [+ kind]: attempts that failed, and streams that
  failed after their first chunk; kind is the attempt's outcome (``refused``, ``reset``,
  ``http_500``, ``first_token_timeout``, ``idle_timeout``, ...).
- ``stageserver_replica_ejections_total``: times passive health (or the readiness probe)
  took the replica out for a cool-down.
- ``stageserver_replica_in_flight``: attempts and streams on the replica now, summed over
  live workers.
- ``stageserver_replica_time_to_first_token_seconds``: histogram, from an attempt's
  request to its first chunk.
- ``stageserver_replica_admitted``: 1 while the worker's pool admits the replica, 0 while
  it is ejected (cooling down, or waiting for its one trial); one series per live worker
  (label ``pid`` under gunicorn), since each worker keeps its own view.

The server as a whole, so that an alert or a dashboard needs nothing beside it:

- ``stageserver_store_unavailable``: with a shared store, 1 while a live worker cannot
  reach it (its flusher's last write, or its last look for orphaned stages, failed), else
  0; the largest over live workers.
- ``stageserver_store_connections`` [node, kind]: with a shared store, the connections
  live workers hold open to each Redis node (``host:port``, never its URL), summed over
  them; kind is ``commands`` (at most ``STAGESERVER_STORE_MAX_CONNECTIONS`` per worker and
  node), ``follows`` (blocking reads of responses that follow a stage of another worker,
  as many at most) or ``subscription`` (the cancel listener's, one per worker). Told by
  each worker every second.
- ``stageserver_workers``: gunicorn workers serving now (each counts 1 from its start),
  and ``stageserver_workers_configured``: how many gunicorn is configured to run. Fewer
  for long means workers that die and are replaced, or cannot start.
- ``stageserver_worker_cpu_seconds_total`` [pid] and
  ``stageserver_worker_resident_memory_bytes`` [pid]: each live worker's CPU time and
  resident memory, read from ``/proc`` at each scrape (``WorkerProcesses``):
  prometheus_client's own process metrics are not part of a multiprocess answer.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_multiproc_dir = os.environ.get(MULTIPROC_ENV)
if _multiproc_dir and not os.path.isdir(_multiproc_dir):
    raise RuntimeError(
        f"{MULTIPROC_ENV}={_multiproc_dir!r} is not a directory: create it (empty) before "
        "the server starts, or unset it; gunicorn_conf.py makes one when it is unset"
    )

# Imported after the check: prometheus_client picks its value storage at import time.
from prometheus_client import (  # noqa: E402
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import (  # noqa: E402
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector  # noqa: E402

from ..errors import AllAttemptsFailed, UpstreamFailure, UpstreamStatusError  # noqa: E402
from ..principals import Principal  # noqa: E402
from ..stages.events import TERMINAL_EVENT  # noqa: E402
from ..stages.records import ContinuationRecord  # noqa: E402
from ..stages.stage import Stage, StageListener  # noqa: E402
from ..upstream.replicas import Replica, ReplicaEvents  # noqa: E402

STAGES = Counter(
    "stageserver_stages",
    "Stages finished, by upstream and outcome (done, error, cancel).",
    ("upstream", "outcome"),
)
DIALECT_STAGES = Counter(
    "stageserver_dialect_stages",
    "Stages finished, by dialect (seed, chat.completions, responses) and outcome.",
    ("dialect", "outcome"),
)
CONTINUATIONS = Counter(
    "stageserver_stage_continuations",
    "Answers continued after a failure, or not, by mode, reason and outcome.",
    ("mode", "reason", "outcome"),
)
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TIME_TO_FIRST_TOKEN = Histogram(
    "stageserver_time_to_first_token_seconds",
    "Seconds from a stage's start to its first upstream chunk.",
    ("upstream",),
    buckets=_TTFT_BUCKETS,
)
STORE_WRITE_DELAY = Histogram(
    "stageserver_store_write_delay_seconds",
    "With a shared store: for each write (one round trip per Redis node, every stage's "
    "new events), seconds from the oldest event in it being relayed to Redis holding it "
    "(a client reads an event only then).",
    buckets=(0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
STREAM_DURATION = Histogram(
    "stageserver_stream_duration_seconds",
    "Seconds from a stage's start to its terminal event, by upstream and outcome.",
    ("upstream", "outcome"),
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0),
)
CHUNKS = Counter(
    "stageserver_chunks_relayed",
    "Upstream chunks relayed to clients, counted when their stage finishes.",
    ("upstream",),
)
ACTIVE = Gauge(
    "stageserver_active_streams",
    "Stages running now (from start to finish), summed over live workers.",
    ("upstream",),
    multiprocess_mode="livesum",
)
OPEN_RESPONSES = Gauge(
    "stageserver_open_responses",
    "HTTP responses following a stage now, summed over live workers.",
    multiprocess_mode="livesum",
)
UPSTREAM_ERRORS = Counter(
    "stageserver_upstream_errors",
    "Stages ended by an upstream failure, by kind (the class in stageserver/errors.py).",
    ("upstream", "kind"),
)
STAGE_ERRORS = Counter(
    "stageserver_stage_errors",
    "Stages ended in error, by upstream and whose fault: caller (the upstream refused the "
    "request itself, a 4xx other than 401, 403, 407, 408 and 429), upstream (any other upstream "
    "failure) or stageserver (shutdown, a lost lease, an internal error).",
    ("upstream", "fault"),
)
#: fault_of's answers, each present as 0 from an upstream's first stage on.
FAULTS = ("caller", "upstream", "stageserver")
REFUSED = Counter(
    "stageserver_stages_refused",
    "Requests for a stage answered 503 before it started, by reason.",
    ("reason",),
)
for _reason in ("overload", "shutting_down"):
    REFUSED.labels(_reason)  # present as 0 from the start, so rate() has a series
# Per principal: its name as configured, never a secret; "anonymous" when the server is
# open, "other" for a name a host app's identify() gave that is not configured.
PRINCIPAL_STAGES = Counter(
    "stageserver_principal_stages",
    "Stages finished, by principal and outcome (done, error, cancel).",
    ("principal", "outcome"),
)
PRINCIPAL_TOKENS = Counter(
    "stageserver_principal_tokens",
    "Tokens of finished stages, by principal and kind (prompt, completion); estimated "
    "where the upstream reported none.",
    ("principal", "kind"),
)
PRINCIPAL_REFUSED = Counter(
    "stageserver_principal_refused",
    "Stages refused for a principal's limit (max_streams, requests_per_minute, "
    "tokens_per_minute) or because the limits could not be checked (store).",
    ("principal", "limit"),
)

_REPLICA = ("upstream", "replica")
REPLICA_REQUESTS = Counter(
    "stageserver_replica_requests", "Attempts begun on each upstream replica.", _REPLICA
)
REPLICA_FAILURES = Counter(
    "stageserver_replica_failures",
    "Failed attempts and streams on each upstream replica, by kind (the attempt's outcome).",
    (*_REPLICA, "kind"),
)
REPLICA_EJECTIONS = Counter(
    "stageserver_replica_ejections",
    "Times each upstream replica was ejected for a cool-down.",
    _REPLICA,
)
REPLICA_IN_FLIGHT = Gauge(
    "stageserver_replica_in_flight",
    "Attempts and streams on each upstream replica now, summed over live workers.",
    _REPLICA,
    multiprocess_mode="livesum",
)
REPLICA_TTFT = Histogram(
    "stageserver_replica_time_to_first_token_seconds",
    "Seconds from an attempt's request to its first chunk, per upstream replica.",
    _REPLICA,
    buckets=_TTFT_BUCKETS,
)
# Per worker (liveall: a pid label under gunicorn), not summed: each worker ejects and
# readmits on its own, and "some worker has no replica left" is worth an alert.
REPLICA_ADMITTED = Gauge(
    "stageserver_replica_admitted",
    "1 while the worker's pool admits the upstream replica, 0 while it is ejected (cooling "
    "down, or waiting for its one trial); one series per live worker (label pid).",
    _REPLICA,
    multiprocess_mode="liveall",
)

# Labelless, so present as 0 in every worker from its start, with a store or not.
STORE_UNAVAILABLE = Gauge(
    "stageserver_store_unavailable",
    "With a shared store: 1 while a worker cannot reach it (its last write, or its last "
    "look for orphaned stages, failed), else 0; the largest over live workers.",
    multiprocess_mode="livemax",
)
STORE_CONNECTIONS = Gauge(
    "stageserver_store_connections",
    "With a shared store: connections open to each Redis node (host:port), by kind "
    "(commands, follows, subscription), summed over live workers.",
    ("node", "kind"),
    multiprocess_mode="livesum",
)
WORKERS = Gauge(
    "stageserver_workers",
    "gunicorn workers serving now: each live worker counts 1.",
    multiprocess_mode="livesum",
)
WORKERS_CONFIGURED = Gauge(
    "stageserver_workers_configured",
    "How many workers gunicorn is configured to run (its workers setting).",
    multiprocess_mode="livemax",
)


def worker_started(configured: int) -> None:
    """In a gunicorn worker, once its app is loaded (``gunicorn_conf.post_worker_init``):
    it counts among the live workers, and says how many there should be."""
    WORKERS.set(1)
    WORKERS_CONFIGURED.set(configured)


def store_reachable(reachable: bool) -> None:
    """The shared store's flusher or sweeper found it reachable, or not."""
    STORE_UNAVAILABLE.set(0 if reachable else 1)


def store_connections(counts: dict[tuple[str, str], int]) -> None:
    """What this worker holds open to the shared store's nodes, by node and kind."""
    for (node, kind), count in counts.items():
        STORE_CONNECTIONS.labels(node, kind).set(count)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
# prometheus_client's file of a process's livesum gauges (every worker has one: WORKERS);
# gunicorn_conf.child_exit removes a dead worker's, so the files name the live workers.
_LIVE_WORKER_FILE = re.compile(r"gauge_livesum_(\d+)\.db$")


class WorkerProcesses(Collector):
    """Each live worker's CPU time and resident memory, read from ``/proc`` at each
    scrape by whichever worker answers it. Under gunicorn the workers are the processes
    whose live-gauge files are in the metrics directory; without it, this process."""

    #: The label of both families (hooks.py lists it in the docs' table).
    labelnames = ("pid",)

    def __init__(self, multiproc_dir: str | None) -> None:
        self._dir = multiproc_dir

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        cpu, memory = self._families()
        for pid in self._pids():
            usage = _process_usage(pid)
            if usage is not None:  # a worker that has just exited is left out
                cpu.add_metric([str(pid)], usage[0])
                memory.add_metric([str(pid)], usage[1])
        yield cpu
        yield memory

    def _families(self) -> tuple[CounterMetricFamily, GaugeMetricFamily]:
        cpu = CounterMetricFamily(
            "stageserver_worker_cpu_seconds",
            "CPU time (user and system) each live worker has used since it started.",
            labels=self.labelnames,
        )
        memory = GaugeMetricFamily(
            "stageserver_worker_resident_memory_bytes",
            "Resident memory of each live worker.",
            labels=self.labelnames,
        )
        return cpu, memory

    def _pids(self) -> list[int]:
        if not self._dir:
            return [os.getpid()]
        names = glob.glob(os.path.join(self._dir, "gauge_livesum_*.db"))
        found = (_LIVE_WORKER_FILE.search(name) for name in names)
        return sorted(int(match.group(1)) for match in found if match)


def _process_usage(pid: int) -> tuple[float, float] | None:
    """CPU seconds (utime + stime) and resident bytes of ``pid``; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name, in parentheses, may hold spaces: count from its end.
            fields = stat.read().rpartition(")")[2].split()
        with open(f"/proc/{pid}/statm") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    cpu = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return cpu, float(resident_pages * _PAGE_BYTES)


WORKER_PROCESSES = WorkerProcesses(_multiproc_dir)
if not _multiproc_dir:
    REGISTRY.register(WORKER_PROCESSES)


def exposition() -> tuple[bytes, str]:
    """The text a scrape gets, and its content type."""
    if _multiproc_dir:
        # A fresh registry per scrape is prometheus_client's documented way: the
        # collector reads every process's files each time.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=_multiproc_dir)  # type: ignore[no-untyped-call]
        registry.register(WORKER_PROCESSES)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class _UpstreamSeries:
    """One upstream's labelled series, looked up once: ``labels()`` costs as much as the
    update itself, and a stage makes seven updates. Creating them all at once also shows
    every outcome as 0 from the upstream's first stage on."""

    def __init__(self, upstream: str) -> None:
        self.active = ACTIVE.labels(upstream)
        self.chunks = CHUNKS.labels(upstream)
        self.ttft = TIME_TO_FIRST_TOKEN.labels(upstream)
        self.stages = {o: STAGES.labels(upstream, o) for o in TERMINAL_EVENT.values()}
        self.duration = {o: STREAM_DURATION.labels(upstream, o) for o in TERMINAL_EVENT.values()}
        self.errors = {fault: STAGE_ERRORS.labels(upstream, fault) for fault in FAULTS}


_series: dict[str, _UpstreamSeries] = {}


def _for(upstream: str) -> _UpstreamSeries:
    series = _series.get(upstream)
    if series is None:
        series = _series[upstream] = _UpstreamSeries(upstream)
    return series


#: Upstream answers in the 4xx range that are not the caller's doing: the upstream's key
#: (401, 403, 407: stageserver's configuration), a timeout (408), a limit (429).
_NOT_THE_CALLERS = frozenset({401, 403, 407, 408, 429})


def fault_of(failure: BaseException | None) -> str:
    """Whose fault a stage's end in ``error`` was: ``caller`` when the upstream refused
    the request itself (a 4xx it would refuse again, as the last of several attempts too),
    ``upstream`` for any other upstream failure, ``stageserver`` for the rest."""
    last = failure.last if isinstance(failure, AllAttemptsFailed) else failure
    if (
        isinstance(last, UpstreamStatusError)
        and 400 <= last.upstream_status < 500
        and last.upstream_status not in _NOT_THE_CALLERS
    ):
        return "caller"
    if isinstance(failure, UpstreamFailure):
        return "upstream"
    return "stageserver"


def stage_refused(reason: str) -> None:
    REFUSED.labels(reason).inc()


def limit_refused(principal: Principal, limit: str) -> None:
    PRINCIPAL_REFUSED.labels(principal.metrics_label, limit).inc()


class StageMetrics(StageListener):
    """Counts each stage as it starts and finishes."""

    def on_start(self, stage: Stage) -> None:
        _for(stage.spec.upstream).active.inc()

    def on_finish(self, stage: Stage) -> None:
        upstream = stage.spec.upstream
        series = _for(upstream)
        outcome = stage.outcome
        series.active.dec()
        series.stages[outcome].inc()
        series.duration[outcome].observe(stage.duration_seconds or 0.0)
        if stage.first_token_seconds is not None:
            series.ttft.observe(stage.first_token_seconds)
        if stage.chunk_count:
            series.chunks.inc(stage.chunk_count)
        if isinstance(stage.failure, UpstreamFailure):
            UPSTREAM_ERRORS.labels(upstream, type(stage.failure).__name__).inc()
        if outcome == "error":
            series.errors[fault_of(stage.failure)].inc()
        DIALECT_STAGES.labels(stage.dialect.name, outcome).inc()
        label = stage.spec.principal.metrics_label
        PRINCIPAL_STAGES.labels(label, outcome).inc()
        usage = stage.usage or {}
        for kind in ("prompt", "completion"):
            tokens = usage.get(f"{kind}_tokens")
            if isinstance(tokens, int) and tokens > 0:
                PRINCIPAL_TOKENS.labels(label, kind).inc(tokens)

    def on_continue(self, stage: Stage, record: ContinuationRecord) -> None:
        CONTINUATIONS.labels(record.mode, record.reason, record.outcome).inc()


class _ReplicaSeries:
    __slots__ = ("requests", "in_flight", "ttft", "ejections", "admitted", "failures", "labels")

    def __init__(self, replica: Replica) -> None:
        self.labels = (replica.upstream, replica.url)
        self.requests = REPLICA_REQUESTS.labels(*self.labels)
        self.in_flight = REPLICA_IN_FLIGHT.labels(*self.labels)
        self.ttft = REPLICA_TTFT.labels(*self.labels)
        self.ejections = REPLICA_EJECTIONS.labels(*self.labels)
        self.admitted = REPLICA_ADMITTED.labels(*self.labels)
        self.failures: dict[str, Counter] = {}


class ReplicaMetrics(ReplicaEvents):
    """The per-replica families, kept as the pools report attempts."""

    def __init__(self) -> None:
        self._series: dict[Replica, _ReplicaSeries] = {}

    def _for(self, replica: Replica) -> _ReplicaSeries:
        series = self._series.get(replica)
        if series is None:
            series = self._series[replica] = _ReplicaSeries(replica)
        return series

    def on_lease(self, replica: Replica) -> None:
        series = self._for(replica)
        series.requests.inc()
        series.in_flight.inc()

    def on_outcome(self, replica: Replica, outcome: str, seconds: float) -> None:
        series = self._for(replica)
        if outcome == "ok":
            series.ttft.observe(seconds)
        elif outcome != "cancelled":
            failures = series.failures.get(outcome)
            if failures is None:
                failures = series.failures[outcome] = REPLICA_FAILURES.labels(
                    *series.labels, outcome
                )
            failures.inc()

    def on_admitted(self, replica: Replica) -> None:
        self._for(replica).admitted.set(1)

    def on_ejected(self, replica: Replica) -> None:
        series = self._for(replica)
        series.ejections.inc()
        series.admitted.set(0)

    def on_release(self, replica: Replica) -> None:
        self._for(replica).in_flight.dec()
