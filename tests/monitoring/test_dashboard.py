"""The Grafana dashboard: well-formed, every query valid PromQL over series the code exports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.monitoring.conftest import BUILTIN_SERIES, Promtool, metric_names

#: Grafana's variables, replaced by plausible values before promtool parses a query.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$namespace": ".*", "$provider": ".*"}
REQUIRED_PANELS = (
    "Tasks by phase",
    "Dead letters by reason and phase",
    "Spool depth per receiver",
    "Results: pingbacks vs fallback recoveries",
    "Provider API latency (p95)",
    "Provider requests by outcome",
    "Solve time percentiles",
)


@pytest.fixture(scope="module")
def dashboard(repo_root: Path) -> dict[str, Any]:
    path = repo_root / "charts" / "captchatask" / "files" / "dashboards" / "captchatask.json"
    document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return document


def _queries(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_the_dashboard_has_the_panels_the_issue_asks_for(dashboard: dict[str, Any]) -> None:
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert set(REQUIRED_PANELS) <= titles
    assert dashboard["uid"] == "captchatask-overview"


def test_panels_have_unique_ids_and_use_the_datasource_variable(
    dashboard: dict[str, Any],
) -> None:
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "provider"} <= variables
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]


def test_every_query_is_valid_promql(
    dashboard: dict[str, Any], promtool: Promtool, tmp_path: Path
) -> None:
    """promtool parses each query as a recording rule (it has no stand-alone PromQL check)."""
    rules = []
    for index, query in enumerate(_queries(dashboard)):
        expr = query
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_the_dashboard_uses_is_exported_by_the_code(
    dashboard: dict[str, Any], exported_series: set[str], recorded_names: set[str]
) -> None:
    used: set[str] = set()
    for query in _queries(dashboard):
        used |= metric_names(query)
    used -= BUILTIN_SERIES
    assert "captchatask_tasks" in used
    missing = sorted(used - exported_series - recorded_names)
    assert missing == [], f"the dashboard selects series no component exports: {missing}"
