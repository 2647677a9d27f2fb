"""The fairness table and verdicts: each ratio names its baseline, old results still render.

Pure functions of a results document (:mod:`bench.footprint`), so a hand-made one is enough.
``bench`` is a directory of the checkout, imported from the repository root.
"""

from __future__ import annotations

import copy
import re
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.bench.conftest import BenchImport


@pytest.fixture
def footprint(bench_import: BenchImport) -> ModuleType:
    return bench_import("footprint")


def _listing(p99: float, cached_p99: float) -> dict[str, Any]:
    return {
        "requests": 100,
        "errors": 0,
        "p50_ms": p99 / 2,
        "p99_ms": p99,
        "max_ms": p99,
        "cached": {"requests": 100, "p50_ms": cached_p99 / 2, "p99_ms": cached_p99},
    }


def _storm(p99: float, cached_p99: float, pace: int | None = None) -> dict[str, Any]:
    return {
        "priority_levels": {
            "bench-captchatask-components": {
                "requests": 300.0,
                "mean_wait_ms": 12.0,
                "nominal_seats": 3.0,
            }
        },
        "list_pods": _listing(p99, cached_p99) | {"server_p99_ms_at_most": 100.0},
        "pingbacks": {"rate_achieved": 600.0, "p99_ms": 20.0, "errors": 0},
        "cpu_busy": {"core_0": 0.5, "core_1": 0.4},
        "ledger": {"per_second": 45.0},
        "ledger_writes_per_second": pace,
    }


#: A results document as the fairness phase wrote it before the cluster-like planes existed.
QUIESCENT: dict[str, Any] = {
    "fairness": {
        "storm_seconds": 6.0,
        "storm_factor": 2.0,
        "capacity_records_per_second": 300.0,
        "plane_core": 0,
        "idle": _listing(5.0, 4.0),
        "kubernetes_defaults": _storm(150.0, 56.0),
        "chart_apf": _storm(80.0, 44.0),
        "chart_apf_paced": _storm(30.0, 17.0, pace=45),
        "sweep": [],
    }
}


def _with_cluster() -> dict[str, Any]:
    results = copy.deepcopy(QUIESCENT)
    results["fairness"]["cluster_like"] = [
        {
            "key": "cluster",
            "unpinned_plane": True,
            "layout": "etcd and kube-apiserver on every core",
            "idle": _listing(60.0, 4.0),
            "background": {"renewals": 40, "errors": 0, "writes_per_second": 1.1},
            "storms": {"chart_apf_paced": _storm(90.0, 10.0, pace=45)},
        }
    ]
    return results


def _rows(table: str) -> list[str]:
    return [line for line in table.splitlines() if line.startswith("| ")]


def test_old_results_without_cluster_like_planes_render_as_before(footprint: ModuleType) -> None:
    table = footprint.fairness_table(QUIESCENT)
    assert "cluster-like" not in table
    assert "30.0x" in table  # 150 ms against the quiescent idle's 5 ms
    assert all("cluster" not in target for target, _, _ in footprint.verdicts(QUIESCENT))


def test_every_ratio_names_the_baseline_it_is_taken_against(footprint: ModuleType) -> None:
    rows = _rows(footprint.fairness_table(_with_cluster()))
    quiescent = [row for row in rows if "Kubernetes' default" in row]
    assert len(quiescent) == 1
    assert "quiescent idle" in quiescent[0]
    assert "30.0x" in quiescent[0], "the quiescent rows keep their quiescent baseline"
    cluster = [row for row in rows if "cluster-like" in row and "storm" in row]
    assert len(cluster) == 1
    assert "1.5x" in cluster[0], "90 ms against the cluster-like idle's 60 ms"
    assert "2.5x" in cluster[0], "cached: 10 ms against the cluster-like idle's 4 ms"
    assert "cluster-like idle" in cluster[0]
    idle = [row for row in rows if row.startswith("| idle, cluster-like")]
    assert len(idle) == 1, "the cluster-like baseline is a row of its own, beside the quiescent"
    assert [row for row in rows if row.startswith("| idle |")], "the quiescent baseline stays"
    assert len({row.count(" | ") for row in rows}) == 1, "every row has the header's columns"


def test_the_verdicts_judge_each_storm_against_its_own_baseline(footprint: ModuleType) -> None:
    items = {target: (figure, met) for target, figure, met in footprint.verdicts(_with_cluster())}
    quiescent = [t for t in items if "chart APF + pace" in t and "cluster-like" not in t]
    assert quiescent, "the quiescent verdicts stay"
    assert all(items[target][1] is False for target in quiescent)
    cluster = {target: items[target] for target in items if "cluster-like" in target}
    assert len(cluster) == 2  # consistent and cached lists
    consistent = next(value for target, value in cluster.items() if "cached" not in target)
    cached = next(value for target, value in cluster.items() if "cached" in target)
    assert consistent[1] is True, consistent[0]
    assert "1.5x" in consistent[0]
    assert cached[1] is False, cached[0]


def test_a_plane_on_every_core_shows_every_core_busy(footprint: ModuleType) -> None:
    rows = _rows(footprint.fairness_table(_with_cluster()))
    (storm,) = [row for row in rows if "cluster-like" in row and "storm" in row]
    assert "50% / 40%" in storm, "the plane used both cores: one core's share says too little"
    (quiescent,) = [row for row in rows if "Kubernetes' default" in row]
    assert "| 50% |" in quiescent


def test_every_cluster_like_storm_names_its_tasks_apart_and_validly(
    bench_import: BenchImport,
) -> None:
    fairness = bench_import("fairness")
    prefixes = [
        fairness._task_prefix(plane.key, index)
        for planes in fairness.CLUSTER_PLANES.values()
        for plane in planes
        for index, _ in enumerate(plane.storms)
    ]
    full = [
        fairness._task_prefix(plane.key, index)
        for plane in fairness.CLUSTER_PLANES["full"]
        for index, _ in enumerate(plane.storms)
    ]
    assert len(set(full)) == len(full), "two storms' tasks must not share names"
    subdomain = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
    assert all(subdomain.fullmatch(f"{prefix}-00000") for prefix in prefixes), prefixes
