"""Fixtures for the monitoring tests: the canonical rules file, promtool, and the metric catalogue.

promtool and prometheus are built from the Prometheus Go module into the binary cache by
``make testtools`` (``hack/build-binaries.sh --test``), which ``make test`` runs. They are
required, not optional: a missing binary *fails* these tests, because monitoring is product code
and an untested alert is a pager that never rings.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from captchatask import testbed

#: promtool checks a rules file in milliseconds; a hang must not hang the suite.
PROMTOOL_TIMEOUT_SECONDS = 60

#: The components' metric modules: every series the rules and dashboard use must be defined here.
METRIC_MODULES = ("captchatask_operator.metrics", "captchatask_sidecar.metrics")
#: Where metrics may be defined (scanned for Counter/Gauge/Histogram/Summary constructors).
METRIC_SOURCE_DIRS = (
    "operator/captchatask_operator",
    "sidecar/captchatask_sidecar",
    "src/captchatask",
)
#: Series that Prometheus itself produces for every target.
BUILTIN_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
#: Metric constructors of prometheus_client, and the suffixes of the series they expose.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "unknown": ("",),
}
CONSTRUCTORS = {
    "Counter": "counter",
    "Gauge": "gauge",
    "Histogram": "histogram",
    "Summary": "summary",
}

Promtool = Callable[..., subprocess.CompletedProcess[str]]


def binary(name: str) -> Path:
    """Return a Prometheus binary, failing the test with the command that builds it when missing."""
    found = testbed.find_tool(name)
    if found is None:
        pytest.fail(
            f"{name} is missing: build it with `{testbed.TEST_TOOLS_HINT}` "
            "(hack/build-binaries.sh --test), or put Prometheus 3 on PATH",
            pytrace=False,
        )
    return found


@pytest.fixture(scope="session")
def promtool() -> Promtool:
    """Run promtool; returns the finished process (callers assert on returncode and output)."""
    path = binary("promtool")

    def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(path), *args],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=PROMTOOL_TIMEOUT_SECONDS,
            check=False,
        )

    return run


@pytest.fixture(scope="session")
def rules_file(repo_root: Path) -> Path:
    """The one canonical rules file."""
    return repo_root / "charts" / "captchatask" / "files" / "prometheus-rules.yaml"


@pytest.fixture(scope="session")
def rules(rules_file: Path) -> dict[str, Any]:
    """The rules file, parsed."""
    document: dict[str, Any] = yaml.safe_load(rules_file.read_text(encoding="utf-8"))
    return document


@pytest.fixture(scope="session")
def alerts(rules: dict[str, Any]) -> list[dict[str, Any]]:
    """Every alerting rule."""
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


@pytest.fixture(scope="session")
def recorded_names(rules: dict[str, Any]) -> set[str]:
    """Names of the recording rules."""
    return {
        rule["record"] for group in rules["groups"] for rule in group["rules"] if "record" in rule
    }


def _series_from_registry() -> set[str]:
    names: set[str] = set()
    for module_name in METRIC_MODULES:
        module = importlib.import_module(module_name)
        registry = CollectorRegistry()
        try:
            module.Metrics(registry)
        except (AttributeError, TypeError):
            continue  # a changed constructor: the source scan below still finds the names
        for family in registry.collect():
            for suffix in SUFFIXES.get(family.type, ("",)):
                names.add(family.name + suffix)
    return names


def _series_from_source(repo_root: Path) -> set[str]:
    """Fallback: the first string argument of every Counter/Gauge/Histogram/Summary call."""
    names: set[str] = set()
    paths = [p for d in METRIC_SOURCE_DIRS for p in sorted((repo_root / d).rglob("*.py"))]
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if called in CONSTRUCTORS and isinstance(first, ast.Constant):
                base = str(first.value)
                kind = CONSTRUCTORS[called]
                if kind == "counter":
                    base = base.removesuffix("_total")
                names.update(base + suffix for suffix in SUFFIXES[kind])
    return names


@pytest.fixture(scope="session")
def exported_series(repo_root: Path) -> set[str]:
    """Every series name the operator and sidecar can expose (registry, plus a source scan)."""
    return _series_from_registry() | _series_from_source(repo_root)


METRIC_NAME = re.compile(
    r"(?<![\w:$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?=\s*(?:\{|\[|\)|\s|$|[-+*/<>=!]))"
)
PROMQL_WORDS = frozenset(
    [
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "rate",
        "irate",
        "increase",
        "delta",
        "idelta",
        "deriv",
        "histogram_quantile",
        "absent",
        "absent_over_time",
        "abs",
        "ceil",
        "floor",
        "round",
        "clamp",
        "clamp_min",
        "clamp_max",
        "vector",
        "scalar",
        "time",
        "timestamp",
        "label_replace",
        "label_join",
        "sort",
        "sort_desc",
        "changes",
        "resets",
        "avg_over_time",
        "min_over_time",
        "max_over_time",
        "sum_over_time",
        "count_over_time",
        "last_over_time",
        "predict_linear",
        "exp",
        "ln",
        "log2",
        "log10",
        "sqrt",
        "le",
        "inf",
        "nan",
    ]
)


def metric_names(expr: str) -> set[str]:
    """The metric (and recording-rule) names a PromQL expression selects."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    without_matchers = re.sub(r"\{[^}]*\}", "{}", without_strings)
    without_ranges = re.sub(r"\[[^\]]*\]", "[]", without_matchers)
    without_grouping = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", without_ranges
    )
    candidates = set(METRIC_NAME.findall(without_grouping))
    return {
        name
        for name in candidates
        if name.lower() not in PROMQL_WORDS and not re.fullmatch(r"[0-9.e+-]+", name)
    }
