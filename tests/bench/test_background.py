"""The fairness phase's cluster-like background: which Lease renewal is due when, and its body.

Pure functions only; the writer itself runs in ``python -m bench.run --only fairness`` against
the real API server. ``bench`` is a directory of the checkout, imported from the repository root.
"""

from __future__ import annotations

import datetime as dt
import itertools
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.bench.conftest import BenchImport

NOW = dt.datetime(2026, 5, 4, 3, 2, 1, 234567, tzinfo=dt.UTC)


@pytest.fixture
def background(bench_import: BenchImport) -> ModuleType:
    return bench_import("background")


def test_a_one_node_cluster_renews_two_leader_leases_every_2s_and_its_node_lease_every_10s(
    background: ModuleType,
) -> None:
    due = background.schedule(background.CLUSTER, 20.0)
    by_component: dict[str, list[float]] = {}
    for offset, index in due:
        by_component.setdefault(background.CLUSTER[index].component, []).append(offset)
    assert {name: len(times) for name, times in by_component.items()} == {
        "kube-controller-manager": 10,
        "kube-scheduler": 10,
        "kubelet": 2,
    }
    for renewer in background.CLUSTER:
        times = by_component[renewer.component]
        gaps = {round(b - a, 6) for a, b in itertools.pairwise(times)}
        assert gaps == {renewer.period_seconds}
    namespaces = {(r.component, r.namespace) for r in background.CLUSTER}
    assert ("kubelet", "kube-node-lease") in namespaces
    assert ("kube-scheduler", "kube-system") in namespaces


def test_the_renewals_come_in_time_order_and_never_all_at_once(background: ModuleType) -> None:
    due = background.schedule(background.CLUSTER, 20.0)
    offsets = [offset for offset, _ in due]
    assert offsets == sorted(offsets)
    assert all(0 <= offset < 20.0 for offset in offsets)
    assert len(set(offsets)) == len(offsets), "components started at different moments"


def test_nothing_is_due_without_renewers_or_time(background: ModuleType) -> None:
    assert background.schedule((), 60.0) == []
    assert background.schedule(background.CLUSTER, 0.0) == []


def test_a_renewal_writes_back_the_same_lease_version_with_a_new_renew_time(
    background: ModuleType,
) -> None:
    renewer = background.CLUSTER[0]
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": renewer.lease, "namespace": "kube-system", "resourceVersion": "41"},
        "spec": {"acquireTime": "2026-05-04T03:00:00.000000Z", "leaseTransitions": 0},
    }
    body = background.renewed(lease, renewer, NOW)
    assert body["metadata"]["resourceVersion"] == "41", "an Update of the version last read"
    assert body["spec"]["renewTime"] == "2026-05-04T03:02:01.234567Z"
    assert body["spec"]["acquireTime"] == "2026-05-04T03:00:00.000000Z"
    assert body["spec"]["leaseDurationSeconds"] == renewer.lease_duration_seconds
    assert body["spec"]["holderIdentity"]
    assert "renewTime" not in lease["spec"], "the lease read is left as it was"
