"""The Grafana-managed alert rules are the Prometheus alerts, converted, and up to date."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from tests.monitoring.conftest import Promtool


@pytest.fixture(scope="module")
def converter(repo_root: Path) -> ModuleType:
    """hack/grafana_alerting.py, loaded from its path (hack/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(
        "grafana_alerting", repo_root / "hack" / "grafana_alerting.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def grafana_file(repo_root: Path) -> Path:
    return repo_root / "charts" / "captchatask" / "files" / "grafana-alerting.yaml"


def test_the_committed_file_is_a_fresh_conversion(
    converter: ModuleType, rules_file: Path, grafana_file: Path
) -> None:
    expected = converter.render(rules_file.read_text(encoding="utf-8"))
    assert grafana_file.read_text(encoding="utf-8") == expected, "run `make manifests`"


def test_every_alert_is_converted_with_its_for_labels_and_annotations(
    alerts: list[dict[str, Any]], grafana_file: Path
) -> None:
    document = yaml.safe_load(grafana_file.read_text(encoding="utf-8"))
    (group,) = document["groups"]
    converted = {rule["title"]: rule for rule in group["rules"]}
    assert set(converted) == {alert["alert"] for alert in alerts}
    for alert in alerts:
        rule = converted[alert["alert"]]
        assert rule["for"] == alert["for"]
        assert rule["labels"] == alert["labels"]
        assert rule["annotations"]["runbook_url"] == alert["annotations"]["runbook_url"]
        assert "$value " not in rule["annotations"]["description"]
        assert rule["noDataState"] == "OK"
        assert len(rule["uid"]) <= 40


def test_the_converted_queries_are_valid_promql_without_recording_rules(
    grafana_file: Path, recorded_names: set[str], promtool: Promtool, tmp_path: Path
) -> None:
    document = yaml.safe_load(grafana_file.read_text(encoding="utf-8"))
    queries = [
        step["model"]["expr"]
        for rule in document["groups"][0]["rules"]
        for step in rule["data"]
        if step["refId"] == "A"
    ]
    for query in queries:
        assert not any(name in query for name in recorded_names), query
    rules = [{"record": f"grafana:query_{i}", "expr": q} for i, q in enumerate(queries)]
    path = tmp_path / "grafana-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "grafana", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_recording_rule_with_a_selector_is_refused(converter: ModuleType) -> None:
    with pytest.raises(converter.ConversionError):
        converter.inline_recording_rules('x:y:z{a="b"} > 0', {"x:y:z": "sum(m)"})
    assert converter.inline_recording_rules("x:y:z > 0", {"x:y:z": "sum(m)"}) == "(sum(m)) > 0"
