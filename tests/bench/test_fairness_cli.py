"""``python -m bench.fairness --storm``: some of the quiescent storms, with extra receiver flags.

The comparison a docs page quotes (Kubernetes' default FlowSchemas, with and without a deeper
drain) must be one command away; a mistyped storm label must say which labels exist before a
control plane is started. ``bench`` is a directory of the checkout, imported from the
repository root.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.bench.conftest import BenchImport


@pytest.fixture
def fairness(bench_import: BenchImport) -> ModuleType:
    return bench_import("fairness")


def test_only_the_named_storms_run_in_the_phase_order(fairness: ModuleType) -> None:
    every = [variant.label for variant in fairness._variants("full")]
    assert every[0] == "kubernetes_defaults"
    assert "shares_4" in every
    chosen = fairness._variants("full", ["shares_4", "kubernetes_defaults"])
    assert [variant.label for variant in chosen] == ["kubernetes_defaults", "shares_4"]


def test_an_unknown_storm_is_refused_before_anything_starts(
    fairness: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        fairness.main(["--workdir", str(tmp_path / "w"), "--storm", "kubernetes_default"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "unknown storm(s) ['kubernetes_default']" in err
    assert "kubernetes_defaults" in err
    assert not (tmp_path / "w").exists()


def test_only_the_named_cluster_like_plane_runs_and_no_quiescent_storm_unless_named(
    fairness: ModuleType,
) -> None:
    every = [plane.key for plane in fairness._cluster_planes("full", None, None)]
    assert every == ["cluster_one_core", "cluster"]
    # --storm alone: quiescent storms only, as before.
    assert fairness._cluster_planes("full", ["chart_apf"], None) == []
    chosen = fairness._cluster_planes("full", None, ["cluster"])
    assert [plane.key for plane in chosen] == ["cluster"]
    assert chosen[0].unpinned


def test_an_unknown_cluster_like_plane_is_refused_before_anything_starts(
    fairness: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        fairness.main(["--workdir", str(tmp_path / "w"), "--cluster", "clusters"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "unknown cluster-like plane(s) ['clusters']" in err
    assert "'cluster_one_core', 'cluster'" in err
    assert not (tmp_path / "w").exists()
