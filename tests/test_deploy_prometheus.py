"""deploy/prometheus/ with Debian's prometheus and promtool, and deploy/grafana's dashboard
against them.

- ``promtool check config`` on both scrape configurations, ``promtool check rules`` on
  the rules, ``promtool test rules`` on stageserver.tests.yml: one test per alert, which
  fires on a synthetic series and stays quiet on a normal one.
- Every alert has its summary, its description, and a runbook whose anchor is a
  heading of docs/operations.md.
- End to end: prometheus scrapes a real stageserver (gunicorn, two workers,
  multiprocess metrics, the Redis store) with the shipped configuration and rules (a
  copy with only the target and the intervals substituted) under a load from bench's
  generator; every query of every panel of the dashboard returns data; then the upstream
  is killed, and StageserverUpstreamDown (its ``for`` shortened) fires.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import markdown
import pytest
import requests
import yaml

from bench import load
from bench.procs import FakeUpstreamProcess
from testing.metrics import scrape, value
from testing.servers import ROOT, Prometheus, RedisServer, gunicorn_server
from testing.sse import parse_events, post_chat, terminal

SHIPPED = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "stageserver.json"
OPERATIONS = ROOT / "docs" / "operations.md"
RUNBOOKS = "https://stageserver.example/docs/operations/#"
#: The alert the end-to-end test waits for, and the `for` its copy gets.
UPSTREAM_DOWN = "StageserverUpstreamDown"
SHORT_FOR = "2s"


def tool(name: str) -> str:
    """The path of Debian's ``name``; the test fails, naming the package, without it."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    assert path, f"{name} is missing: apt-get install prometheus (scripts/setup.sh --dev does)"
    return path


def promtool(*args: str, cwd: Path = SHIPPED) -> str:
    done = subprocess.run(
        [tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load((SHIPPED / "stageserver.alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


# -- promtool ---------------------------------------------------------------------------


@pytest.mark.processes
@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-kubernetes.yml"])
def test_promtool_checks_the_scrape_configuration_and_its_rules(config: str) -> None:
    output = promtool("check", "config", config)
    assert "SUCCESS: 2 rule files found" in output


@pytest.mark.processes
def test_promtool_checks_the_rules() -> None:
    output = promtool("check", "rules", "stageserver.rules.yml", "stageserver.alerts.yml")
    assert f"SUCCESS: {len(alerts())} rules found" in output


@pytest.mark.processes
def test_promtool_runs_the_rules_unit_tests() -> None:
    assert "SUCCESS" in promtool("test", "rules", "stageserver.tests.yml")


def test_every_alert_has_a_unit_test_that_fires_and_one_that_stays_quiet() -> None:
    """stageserver.tests.yml has a test named after each alert, whose input has a normal
    series beside the one in trouble, and which expects the alert both quiet (before its
    `for`, or never for the normal series) and firing for the one in trouble alone."""
    tests = yaml.safe_load((SHIPPED / "stageserver.tests.yml").read_text())["tests"]
    by_name = {test["name"]: test for test in tests}
    for rule in alerts():
        name = rule["alert"]
        assert name in by_name, f"stageserver.tests.yml has no test named {name}"
        test = by_name[name]
        assert any("normal" in s["series"] for s in test["input_series"]), name
        own = [t for t in test["alert_rule_test"] if t["alertname"] == name]
        assert any(t["exp_alerts"] == [] for t in own), f"{name}: never expected quiet"
        firing = [a for t in own for a in t["exp_alerts"]]
        assert firing, f"{name}: never expected to fire"
        for expected in firing:
            assert "normal" not in json.dumps(expected["exp_labels"]), name


def operations_anchors() -> set[str]:
    """The ids of docs/operations.md's headings, as the site's Markdown (mkdocs.yml's
    toc and attr_list) makes them."""
    html = markdown.markdown(OPERATIONS.read_text(), extensions=["toc", "attr_list", "tables"])
    return set(re.findall(r'<h[1-6] id="([^"]+)"', html))


def test_every_alert_has_a_summary_and_a_runbook_in_the_operations_page() -> None:
    anchors = operations_anchors()
    assert "alerts" in anchors
    for rule in alerts():
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        url = annotations["runbook_url"]
        assert url == RUNBOOKS + rule["alert"].lower(), url
        assert url.removeprefix(RUNBOOKS) in anchors, f"operations.md has no heading {url}"
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]


# -- end to end ---------------------------------------------------------------------------


def shipped_copy(target: str) -> tuple[str, dict[str, str]]:
    """The shipped prometheus.yml and its rule files, with the target, the intervals and
    StageserverUpstreamDown's `for` substituted; each substitution must find exactly what
    it replaces, so that a change of the shipped files' shape fails here instead of
    silently testing something else."""
    config = yaml.safe_load((SHIPPED / "prometheus.yml").read_text())
    assert set(config["global"]) == {"scrape_interval", "evaluation_interval"}
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    [job] = config["scrape_configs"]
    assert job["job_name"] == "stageserver" and job["scrape_timeout"] == "5s"
    job["scrape_timeout"] = "1s"
    [static] = job["static_configs"]
    assert static == {"targets": ["127.0.0.1:8000"]}
    static["targets"] = [target]

    rules = yaml.safe_load((SHIPPED / "stageserver.alerts.yml").read_text())
    [down] = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == UPSTREAM_DOWN]
    down["for"] = SHORT_FOR
    files = {
        "stageserver.rules.yml": (SHIPPED / "stageserver.rules.yml").read_text(),
        "stageserver.alerts.yml": yaml.safe_dump(rules, sort_keys=False),
    }
    assert config["rule_files"] == list(files)
    return yaml.safe_dump(config, sort_keys=False), files


def panel_queries() -> Iterator[tuple[str, str]]:
    """(panel title, query) of every panel of the dashboard, with its variables given
    what a Grafana would: this job, every instance, a rate window of a minute."""
    given = {"$job": "stageserver", "$instance": ".*", "$__rate_interval": "1m"}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, text in given.items():
                expr = expr.replace(variable, text)
            assert "$" not in expr, f"{panel['title']}: a variable left in {expr}"
            yield panel["title"], expr


def has_data(prometheus: Prometheus, query: str) -> bool:
    """Whether ``query`` gives at least one series with a number (NaN is an empty panel)."""
    result = prometheus.api("query", query=query)["result"]
    return any(math.isfinite(float(series["value"][1])) for series in result)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def firing(prometheus: Prometheus, name: str) -> list[dict[str, Any]]:
    return [
        alert
        for alert in prometheus.api("alerts")["alerts"]
        if alert["labels"]["alertname"] == name and alert["state"] == "firing"
    ]


def test_prometheus_scrapes_stageserver_under_load_and_fires_when_the_upstream_dies(
    redis_server: RedisServer,
) -> None:
    upstream = FakeUpstreamProcess()
    env = {
        "STAGESERVER_UPSTREAM_URL": upstream.url,
        "STAGESERVER_STORE_URL": redis_server.url,
        "STAGESERVER_ACCESS_LOG": "",
    }
    try:
        with gunicorn_server(env, workers=2) as server:
            wait_until(lambda: len(server.worker_pids()) == 2, "two workers")
            config, files = shipped_copy(f"127.0.0.1:{server.port}")
            prometheus = Prometheus(config, files)
            try:
                # Prometheus applies its targets a few seconds after it starts: the load
                # must come after its first scrapes, for rate() to see it.
                wait_until(lambda: has_data(prometheus, 'up{job="stageserver"} == 1'), "a scrape")
                check_under_load(prometheus, server.url, server.port, server.proc.pid)
                check_worker_metrics(server.url, server.worker_pids())

                upstream.proc.send_signal(signal.SIGKILL)
                upstream.proc.wait()

                stage_ids = (f"after-{n}" for n in itertools.count())

                def fired() -> bool:
                    # Stages keep coming: each worker sees the replica refuse, ejects it
                    # after eject_after (3) failures in a row, and so has none left.
                    response = post_chat(server.url, stage_id=next(stage_ids), timeout=10)
                    assert terminal(parse_events(response.content))[0]["event"] == "error"
                    return bool(firing(prometheus, UPSTREAM_DOWN))

                wait_until(fired, f"{UPSTREAM_DOWN} firing")
                [alert] = firing(prometheus, UPSTREAM_DOWN)
                assert alert["labels"]["upstream"] == "default"
                assert alert["labels"]["instance"] == f"127.0.0.1:{server.port}"
                assert alert["annotations"]["runbook_url"] == RUNBOOKS + UPSTREAM_DOWN.lower()
            finally:
                prometheus_log = prometheus.log()
                prometheus.stop()
            assert " level=error " not in prometheus_log, prometheus_log
    finally:
        upstream.stop()


def check_under_load(prometheus: Prometheus, url: str, port: int, server_pid: int) -> None:
    """bench's load, a few stages that fail (the caller's 400, the upstream's 500) and one
    cut mid-answer (a continuation refused: the default upstream kind continues none);
    then every panel's query has data."""
    failing = {
        "caller-400": "fake?mode=status&status=400",
        "upstream-500": "fake?mode=status&status=500",
        "cut": "fake?mode=drop&after=2&chunks=5",
    }
    for stage_id, model in failing.items():
        response = post_chat(url, stage_id=stage_id, model_name=model)
        assert terminal(parse_events(response.content))[0]["event"] == "error", response.text
    result = asyncio.run(
        load.run(
            load.LoadSpec(
                port=port,
                target="stageserver",
                path="/chat",
                shape=load.Shape(chunks=20, interval=0.02, prefill=0.0),
                concurrency=8,
                duration=3.0,
                server_pid=server_pid,
                metrics=True,
            )
        )
    )
    assert result.errors == 0, result.error_samples
    assert result.streams > 0 and result.durable_writes

    queries = list(panel_queries())
    assert len(queries) >= 20

    def every_panel_has_data() -> bool:
        return all(has_data(prometheus, query) for _, query in queries)

    try:
        wait_until(every_panel_has_data, "every panel's data", timeout=30)
    except AssertionError:
        empty = [(title, query) for title, query in queries if not has_data(prometheus, query)]
        raise AssertionError(f"panels without data: {empty}") from None


def check_worker_metrics(url: str, pids: list[int]) -> None:
    """The workers' own families, read through gunicorn's multiprocess directory: both
    workers live, as configured, each with its CPU and memory."""
    samples = scrape(requests.get(f"{url}/metrics", timeout=10).text)
    assert value(samples, "stageserver_workers") == 2
    assert value(samples, "stageserver_workers_configured") == 2
    for name in (
        "stageserver_worker_cpu_seconds_total",
        "stageserver_worker_resident_memory_bytes",
    ):
        by_pid = {dict(labels)["pid"]: v for (n, labels), v in samples.items() if n == name}
        assert sorted(by_pid) == sorted(str(pid) for pid in pids), name
        assert all(v > 0 for v in by_pid.values()), (name, by_pid)
