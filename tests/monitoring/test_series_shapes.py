"""The promtool tests feed series shaped exactly like a real scrape of the components.

A promtool case proves an alert only for the series it was given. If those series are
hand-written with labels the components do not expose (a ``namespace`` the operator never put
on ``captchatask_provider_ready``, say), the test passes and the alert is wrong in production.
So the shape of every input series is taken from a scrape: both components' ``Metrics`` are
built on fresh registries, given the namespaces and providers the cases use, and exposed with
``generate_latest`` as ``/metrics`` serves them; Prometheus then adds its target labels.

An input series must have exactly the label names of a scraped series of that name plus the
target labels (``job``, ``instance``, and ``namespace`` where the series has none of its own),
and every label value other than the object identities (``namespace``, ``provider``) must be a
value the component really exposes (``phase="Pending"``, ``outcome="recorded"``, ...).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from captchatask_operator.metrics import Metrics as OperatorMetrics
from captchatask_operator.metrics import failure_label
from captchatask_sidecar.metrics import Metrics as SidecarMetrics

#: Labels Prometheus adds to every scraped series (the chart's ServiceMonitor and the e2e's
#: static config both give these; `namespace` only where the series has none, honor_labels).
TARGET_LABELS = frozenset({"job", "instance"})
#: Labels whose values name objects (free in the tests); every other value must be real.
IDENTITY_LABELS = frozenset({"namespace", "provider"})
SERIES = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>.*)\}$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Shape = tuple[str, frozenset[tuple[str, str]]]


def _value(key: str, value: str) -> str:
    """Identity values are free; a failure code is real if the operator labels it as itself."""
    if key in IDENTITY_LABELS or (key == "code" and failure_label(value) == value):
        return "*"
    return value


def _shape(labels: dict[str, str]) -> frozenset[tuple[str, str]]:
    return frozenset((k, _value(k, v)) for k, v in labels.items())


def scrape() -> set[Shape]:
    """Every sample of both components as /metrics exposes it, minus identity label values."""
    operator_registry, sidecar_registry = CollectorRegistry(), CollectorRegistry()
    operator = OperatorMetrics(operator_registry)
    operator.ensure_provider("any", "any")
    sidecar = SidecarMetrics(sidecar_registry)
    sidecar.serve(["any"])
    shapes: set[Shape] = set()
    for registry in (operator_registry, sidecar_registry):
        text = generate_latest(registry).decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                shapes.add((sample.name, _shape(sample.labels)))
    return shapes


def input_series(repo_root: Path) -> Iterator[tuple[str, str]]:
    for path in sorted((repo_root / "tests" / "monitoring").glob("*_test.yaml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        for case in document["tests"]:
            for item in case.get("input_series", []):
                yield case["name"], item["series"]


def test_every_promtool_input_series_has_the_shape_of_a_real_scrape(repo_root: Path) -> None:
    shapes = scrape()
    names = {name for name, _ in shapes}
    wrong = []
    checked = 0
    for case, series in input_series(repo_root):
        match = SERIES.match(series)
        assert match, f"{case}: cannot parse {series}"
        name = match["name"]
        labels = dict(LABEL.findall(match["labels"]))
        if name == "up":
            continue  # made by Prometheus itself: only target labels
        if name not in names:
            wrong.append(f"{case}: {name} is not exposed by any component")
            continue
        missing = TARGET_LABELS - labels.keys()
        if missing:
            wrong.append(f"{case}: {series} lacks the target labels {sorted(missing)}")
            continue
        own = {k: v for k, v in labels.items() if k not in TARGET_LABELS}
        candidates = [
            _shape(own),
            # A series without a namespace of its own gets the target's (the pod's).
            _shape({k: v for k, v in own.items() if k != "namespace"}),
        ]
        if not any((name, shape) in shapes for shape in candidates):
            exposed = sorted(sorted(k for k, _ in shape) for n, shape in shapes if n == name)[:1]
            wrong.append(f"{case}: {series} does not match what is exposed, e.g. {exposed}")
        checked += 1
    assert wrong == [], "\n".join(wrong)
    assert checked > 20


@pytest.mark.parametrize(
    "series",
    [
        # The shape the issue found in the old tests: a namespace the operator never exposed.
        'captchatask_dead_letters{job="j",instance="i",namespace="shop",reason="Nope",phase="Pending"}',
        'captchatask_tasks{job="j",instance="i",namespace="shop",phase="Pending"}',
    ],
)
def test_the_shape_check_rejects_series_no_component_exposes(series: str) -> None:
    match = SERIES.match(series)
    assert match
    own = {k: v for k, v in LABEL.findall(match["labels"]) if k not in TARGET_LABELS}
    assert (match["name"], _shape(own)) not in scrape()
