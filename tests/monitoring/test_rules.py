"""The alerting and recording rules: valid, unit-tested on both sides of `for:`, documented.

``promtool test rules`` runs ``tests/monitoring/*_test.yaml`` against the same file the chart
ships. The structural tests below make sure that stays true for every alert added later: each has
the house-style fields, a runbook URL on the documentation site, and a promtool case just before
its `for:` runs out (not firing) and one exactly one evaluation later (firing, with exact labels).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.monitoring.conftest import BUILTIN_SERIES, Promtool, metric_names

RUNBOOK_PREFIX = "https://captchatask.github.io/captchatask/runbooks/"
SEVERITIES = {"critical", "warning", "info"}


def _duration_seconds(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smhd])", text))


def _test_files(repo_root: Path) -> list[Path]:
    files = sorted((repo_root / "tests" / "monitoring").glob("*_test.yaml"))
    assert files, "promtool test files exist"
    return files


def test_promtool_accepts_the_rules_file(promtool: Promtool, rules_file: Path) -> None:
    result = promtool("check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass(promtool: Promtool, repo_root: Path) -> None:
    files = [str(path) for path in _test_files(repo_root)]
    result = promtool("test", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_for_severity_summary_description_and_runbook(
    alerts: list[dict[str, Any]],
) -> None:
    assert alerts
    for alert in alerts:
        name = alert["alert"]
        assert re.fullmatch(r"Captchatask[A-Z][A-Za-z]+", name), name
        assert _duration_seconds(alert["for"]) > 0, name
        assert alert["labels"]["severity"] in SEVERITIES, name
        annotations = alert["annotations"]
        assert annotations["summary"].strip(), name
        assert annotations["description"].strip(), name
        assert annotations["runbook_url"] == f"{RUNBOOK_PREFIX}{name.lower()}/", name


def test_the_required_alerts_exist(alerts: list[dict[str, Any]]) -> None:
    names = {alert["alert"] for alert in alerts}
    assert {
        "CaptchataskDeadLettersGrowing",
        "CaptchataskSpoolNotDraining",
        "CaptchataskSpoolNearlyFull",
        "CaptchataskSpoolDamaged",
        "CaptchataskBackgroundLoopCrashing",
        "CaptchataskDeadLettersUnwritten",
        "CaptchataskFallbackRecoveryRatioHigh",
        "CaptchataskProviderNotReady",
        "CaptchataskTasksPastDeadline",
        "CaptchataskPermanentFailureRateHigh",
        "CaptchataskOperatorDown",
        "CaptchataskReceiverDown",
    } <= names


# That each runbook URL is a page of the built site is checked in tests/test_docs.py.


def test_every_alert_is_tested_just_before_and_just_after_its_for_duration(
    alerts: list[dict[str, Any]], repo_root: Path
) -> None:
    """For each alert: a case with no alerts at T and one with exact labels at T + 1 interval."""
    cases: dict[str, list[tuple[int, int, bool]]] = {}
    for path in _test_files(repo_root):
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        interval = _duration_seconds(document.get("evaluation_interval", "1m"))
        for test in document["tests"]:
            for case in test.get("alert_rule_test", []):
                fires = bool(case.get("exp_alerts"))
                if fires:
                    for expected in case["exp_alerts"]:
                        assert "severity" in expected["exp_labels"], case["alertname"]
                        assert "runbook_url" in expected["exp_annotations"], case["alertname"]
                cases.setdefault(case["alertname"], []).append(
                    (_duration_seconds(case["eval_time"]), interval, fires)
                )
    for alert in alerts:
        name = alert["alert"]
        seen = cases.get(name, [])
        quiet = {time for time, _, fires in seen if not fires}
        firing = [(time, interval) for time, interval, fires in seen if fires]
        assert any(time - interval in quiet for time, interval in firing), (
            f"{name}: needs a not-firing case one evaluation before a firing case"
        )


def test_alert_expressions_use_recording_rules_only_as_plain_instant_vectors(
    alerts: list[dict[str, Any]], recorded_names: set[str]
) -> None:
    """So hack/grafana_alerting.py can inline them (Grafana may not load our recording rules)."""
    for alert in alerts:
        for name in recorded_names:
            assert not re.search(rf"{re.escape(name)}\s*[\[{{]", alert["expr"]), alert["alert"]


@pytest.fixture(scope="module")
def rule_metrics(rules: dict[str, Any], recorded_names: set[str]) -> set[str]:
    names: set[str] = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            names |= metric_names(rule["expr"])
    return names - recorded_names - BUILTIN_SERIES


def test_the_metric_name_parser_finds_what_the_rules_select(rule_metrics: set[str]) -> None:
    assert "captchatask_dead_letters" in rule_metrics
    assert "captchatask_task_solve_duration_seconds_bucket" in rule_metrics
    assert "captchatask_fallback_recoveries_total" in rule_metrics
    assert not {"namespace", "provider", "sum", "rate"} & rule_metrics


def test_every_metric_the_rules_use_is_exported_by_the_code(
    rule_metrics: set[str], exported_series: set[str]
) -> None:
    missing = sorted(rule_metrics - exported_series)
    assert missing == [], (
        f"the rules select series no component exports: {missing} "
        "(operator/captchatask_operator/metrics.py, sidecar/captchatask_sidecar/metrics.py)"
    )
