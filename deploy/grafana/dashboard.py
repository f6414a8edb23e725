"""stageserver's Grafana dashboard, made with grafana-foundation-sdk: the source of
``stageserver.json`` beside it.

    .venv/bin/python deploy/grafana/dashboard.py > deploy/grafana/stageserver.json

Change the panels here, never the JSON: ``tests/test_deploy_grafana.py`` fails when the
committed JSON is not what this prints, and ``tests/test_deploy_prometheus.py`` runs
every query of every panel against a Prometheus that scrapes a real stageserver, and
fails on a panel without data.

Every percentile sums each histogram's bucket rates over the workers and hosts first
(``sum by (le) (rate(..._bucket[$__rate_interval]))``), then takes the quantile: the
only way that is right across workers. The panels select ``job`` and ``instance``
through the dashboard's variables (``SELECTOR``).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from grafana_foundation_sdk.builders import common, prometheus, stat, timeseries
from grafana_foundation_sdk.builders import dashboard as builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model

UID = "stageserver"
#: Every query's selector: the dashboard's job and instance variables.
SELECTOR = 'job=~"$job", instance=~"$instance"'
RATE = "$__rate_interval"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Chart:
    """One panel: a time series, or a stat (its latest value, mapped to words)."""

    title: str
    description: str
    queries: Sequence[Query]
    unit: str = "short"
    kind: Literal["timeseries", "stat"] = "timeseries"
    words: dict[str, tuple[str, str]] | None = None  # value -> (text, colour), for a stat
    width: int = 12


def quantiles(metric: str, where: str = "", by: str = "") -> list[Query]:
    """p50, p90 and p99 of a histogram, its buckets' rates summed over the workers and
    hosts before the quantile; ``by``: labels kept apart (besides ``le``)."""
    labels = f"{by}, le" if by else "le"
    legend = "".join(f"{{{{{label.strip()}}}}} " for label in by.split(",") if label.strip())
    return [
        Query(
            f"histogram_quantile({q}, sum by ({labels}) "
            f"(rate({metric}_bucket{{{SELECTOR}{where}}}[{RATE}])))",
            f"{legend}p{round(q * 100)}",
        )
        for q in (0.5, 0.9, 0.99)
    ]


def rate(metric: str, by: str, where: str = "") -> str:
    return f"sum by ({by}) (rate({metric}{{{SELECTOR}{where}}}[{RATE}]))"


ROWS: dict[str, list[Chart]] = {
    "Streams": [
        Chart(
            "Streams running",
            "Stages running now (from start to finish), and the responses following them.",
            [
                Query(
                    f"sum by (upstream) (stageserver_active_streams{{{SELECTOR}}})", "{{upstream}}"
                ),
                Query(f"sum(stageserver_open_responses{{{SELECTOR}}})", "responses open"),
            ],
        ),
        Chart(
            "Chunks relayed per second",
            "Upstream chunks relayed to clients, counted when their stage finishes.",
            [Query(rate("stageserver_chunks_relayed_total", "upstream"), "{{upstream}}")],
            unit="cps",
        ),
        Chart(
            "Stages by outcome",
            "Stages finished per second, by their terminal event: done, error or cancel.",
            [Query(rate("stageserver_stages_total", "outcome"), "{{outcome}}")],
            unit="reqps",
        ),
        Chart(
            "Stages by dialect",
            "The same stages by the API that served them: seed (/chat), chat.completions "
            "or responses (/v1).",
            [
                Query(
                    rate("stageserver_dialect_stages_total", "dialect, outcome"),
                    "{{dialect}} {{outcome}}",
                )
            ],
            unit="reqps",
        ),
    ],
    "Latency": [
        Chart(
            "Time to first token",
            "From a stage's start to its first upstream chunk, over every worker and host.",
            quantiles("stageserver_time_to_first_token_seconds"),
            unit="s",
        ),
        Chart(
            "Stream duration (done)",
            "From a stage's start to its done event, over every worker and host.",
            quantiles("stageserver_stream_duration_seconds", where=', outcome="done"'),
            unit="s",
        ),
    ],
    "Errors": [
        Chart(
            "Errors not the caller's",
            "The share of stages that ended in error by stageserver's or its upstreams' "
            "fault (a caller's bad request left out): what StageserverStageErrors watches.",
            [
                Query(
                    f"sum(rate(stageserver_stage_errors_total{{{SELECTOR}, "
                    f'fault!="caller"}}[{RATE}])) / '
                    f"sum(rate(stageserver_stages_total{{{SELECTOR}}}[{RATE}]))",
                    "share",
                )
            ],
            unit="percentunit",
            kind="stat",
            width=6,
        ),
        Chart(
            "Errors by fault",
            "Stages ended in error per second: the caller's (an upstream 4xx), the "
            "upstream's, or stageserver's own.",
            [Query(rate("stageserver_stage_errors_total", "fault"), "{{fault}}")],
            unit="reqps",
            width=9,
        ),
        Chart(
            "Upstream errors by kind",
            "Stages ended by an upstream failure, by its class (NoReplicaAvailable: load "
            "shed, no replica could take the stage).",
            [
                Query(
                    rate("stageserver_upstream_errors_total", "upstream, kind"),
                    "{{upstream}} {{kind}}",
                )
            ],
            unit="reqps",
            width=9,
        ),
    ],
    "Upstream replicas": [
        Chart(
            "Replica state",
            "Admitted by every worker, or ejected by at least one (cooling down after "
            "failures, or waiting for its one trial).",
            [
                Query(
                    f"min by (upstream, replica) (stageserver_replica_admitted{{{SELECTOR}}})",
                    "{{upstream}} {{replica}}",
                )
            ],
            kind="stat",
            words={"0": ("ejected", "red"), "1": ("admitted", "green")},
        ),
        Chart(
            "Replica attempts in flight",
            "Attempts and streams on each replica now, over every worker and host.",
            [
                Query(
                    f"sum by (upstream, replica) (stageserver_replica_in_flight{{{SELECTOR}}})",
                    "{{upstream}} {{replica}}",
                )
            ],
        ),
        Chart(
            "Replica failures",
            "Failed attempts per second on each replica, by how they failed.",
            [
                Query(
                    rate("stageserver_replica_failures_total", "replica, kind"),
                    "{{replica}} {{kind}}",
                )
            ],
            unit="reqps",
        ),
        Chart(
            "Replica ejections",
            "Times per second a worker ejected the replica for a cool-down.",
            [
                Query(
                    rate("stageserver_replica_ejections_total", "upstream, replica"),
                    "{{upstream}} {{replica}}",
                )
            ],
            unit="reqps",
        ),
    ],
    "Continuations and takeovers": [
        Chart(
            "Continuations and takeovers",
            "Answers continued after a failure, by reason (upstream_failed; owner_lost: "
            "a dead worker's stage taken over; drain: a deploy's handoff) and outcome.",
            [
                Query(
                    rate("stageserver_stage_continuations_total", "reason, outcome"),
                    "{{reason}} {{outcome}}",
                )
            ],
            unit="reqps",
            width=24,
        ),
    ],
    "Shared store": [
        Chart(
            "Store write delay",
            "From an event's relay to Redis holding it (clients read it only then), over "
            "every worker and host.",
            quantiles("stageserver_store_write_delay_seconds"),
            unit="s",
            width=18,
        ),
        Chart(
            "Store",
            "Whether every worker reaches the shared store (Redis).",
            [Query(f"max(stageserver_store_unavailable{{{SELECTOR}}})", "store")],
            kind="stat",
            words={"0": ("reachable", "green"), "1": ("unavailable", "red")},
            width=6,
        ),
    ],
    "Admission": [
        Chart(
            "Stages refused before they start",
            "503s per second: overload (a worker at STAGESERVER_MAX_ACTIVE_STREAMS) or "
            "shutting_down (a deploy).",
            [Query(rate("stageserver_stages_refused_total", "reason"), "{{reason}}")],
            unit="reqps",
            width=24,
        ),
    ],
    "Workers": [
        Chart(
            "Workers",
            "Live gunicorn workers, against the number configured, over the hosts; and "
            "the hosts that answer Prometheus.",
            [
                Query(f"sum(stageserver_workers{{{SELECTOR}}})", "live"),
                Query(f"sum(stageserver_workers_configured{{{SELECTOR}}})", "configured"),
                Query(f"sum(up{{{SELECTOR}}})", "hosts up"),
            ],
            width=8,
        ),
        Chart(
            "CPU per worker",
            "CPU time each worker uses per second: 1 is a whole core.",
            [
                Query(
                    f"rate(stageserver_worker_cpu_seconds_total{{{SELECTOR}}}[{RATE}])",
                    "{{instance}} {{pid}}",
                )
            ],
            unit="percentunit",
            width=8,
        ),
        Chart(
            "Memory per worker",
            "Resident memory of each worker.",
            [
                Query(
                    f"stageserver_worker_resident_memory_bytes{{{SELECTOR}}}",
                    "{{instance}} {{pid}}",
                )
            ],
            unit="bytes",
            width=8,
        ),
    ],
}


def panel(chart: Chart) -> timeseries.Panel | stat.Panel:
    made: timeseries.Panel | stat.Panel
    if chart.kind == "stat":
        # The latest value of each series, not a mean over the time range.
        made = stat.Panel().reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]))
        if chart.words:
            made = made.mappings(
                [
                    model.ValueMap(
                        {
                            value: model.ValueMappingResult(text=text, color=colour, index=n)
                            for n, (value, (text, colour)) in enumerate(chart.words.items())
                        }
                    )
                ]
            )
    else:
        made = timeseries.Panel().fill_opacity(10).line_width(1)
    made = (
        made.title(chart.title)
        .description(chart.description)
        .datasource(DATASOURCE)
        .unit(chart.unit)
        .span(chart.width)
        .height(8)
    )
    for number, query in enumerate(chart.queries):
        made = made.with_target(
            prometheus.Dataquery()
            .expr(query.expr)
            .legend_format(query.legend)
            .ref_id(chr(ord("A") + number))
        )
    return made


def variables() -> list[builder.QueryVariable | builder.DatasourceVariable]:
    return [
        builder.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        builder.QueryVariable("job")
        .label("Job")
        .datasource(DATASOURCE)
        .query("label_values(stageserver_stages_total, job)")
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC),
        builder.QueryVariable("instance")
        .label("Instance")
        .datasource(DATASOURCE)
        .query('label_values(stageserver_stages_total{job=~"$job"}, instance)')
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*"),
    ]


def build() -> model.Dashboard:
    made = (
        builder.Dashboard("stageserver")
        .uid(UID)
        .description(
            "stageserver: streams, stages, latency, upstream replicas, continuations, the "
            "shared store, admission and workers. Made by deploy/grafana/dashboard.py."
        )
        .tags(["stageserver"])
        .time("now-1h", "now")
        .refresh("30s")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
    )
    for variable in variables():
        made = made.with_variable(variable)
    ids = itertools.count(1)  # Grafana wants each panel's id, rows too, unique
    for title, charts in ROWS.items():
        made = made.with_row(builder.Row(title).id(next(ids)))
        for chart in charts:
            made = made.with_panel(panel(chart).id(next(ids)))
    return made.build()


def render() -> str:
    """The dashboard's JSON, as committed in stageserver.json."""
    return json.dumps(json.loads(JSONEncoder().encode(build())), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(render(), end="")
