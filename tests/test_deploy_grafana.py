"""deploy/grafana/: the committed dashboard is exactly what its generator makes, and its
queries are the right kind. (That each returns data from a real stageserver is
tests/test_deploy_prometheus.py's end-to-end test.)
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from types import ModuleType
from typing import Any

from testing.servers import ROOT

GRAFANA = ROOT / "deploy" / "grafana"


def generator() -> ModuleType:
    """deploy/grafana/dashboard.py, loaded from its file (deploy/ is no package)."""
    spec = importlib.util.spec_from_file_location("stageserver_dashboard", GRAFANA / "dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def panels() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads((GRAFANA / "stageserver.json").read_text())["panels"]
    return found


def test_the_committed_dashboard_is_what_the_generator_makes() -> None:
    made: str = generator().render()
    committed = (GRAFANA / "stageserver.json").read_text()
    assert made == committed, (
        "deploy/grafana/stageserver.json is not what deploy/grafana/dashboard.py makes: run "
        ".venv/bin/python deploy/grafana/dashboard.py > deploy/grafana/stageserver.json"
    )


def test_every_percentile_sums_the_bucket_rates_over_workers_before_its_quantile() -> None:
    """histogram_quantile over ``sum by (..., le) (rate(<histogram>_bucket[...]))``: never
    a quantile per worker, nor buckets summed before their rate."""
    quantile = re.compile(
        r"^histogram_quantile\(0\.\d+, sum by \(([\w, ]*)\) \(rate\((\w+)_bucket\{[^}]*\}"
        r"\[\$__rate_interval\]\)\)\)$"
    )
    seen = 0
    for panel in panels():
        for target in panel.get("targets", []):
            expr = target["expr"]
            if "_bucket" not in expr and "histogram_quantile" not in expr:
                continue
            match = quantile.match(expr)
            assert match, f"{panel['title']}: {expr}"
            assert "le" in [label.strip() for label in match.group(1).split(",")], expr
            seen += 1
    assert seen >= 9  # time to first token, stream duration, the store's write delay


def test_every_query_follows_the_dashboards_job_and_instance() -> None:
    variables = {
        v["name"]
        for v in json.loads((GRAFANA / "stageserver.json").read_text())["templating"]["list"]
    }
    assert variables == {"datasource", "job", "instance"}
    charts = [p for p in panels() if p["type"] != "row"]
    assert len(charts) >= 20
    for panel in charts:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'job=~"$job", instance=~"$instance"' in target["expr"], target["expr"]
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))
