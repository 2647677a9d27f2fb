"""``python -m bench.run --profile small``: the benchmark harness works and its results are whole.

This checks the harness, never a speed: every phase runs against the real control plane, the
emulator, the sidecar and the operator, and the results document carries the machine, the
versions and every figure the README tables are built from, as finite numbers. How large those
numbers are is the benchmark's business, not the test's.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from tests.bounded import run_bounded

from captchatask_sidecar.settings import DEFAULT_DRAIN_CONCURRENCY

if TYPE_CHECKING:
    from tests.bench.conftest import BenchImport

REPO = Path(__file__).resolve().parents[2]
TABLES = (
    "### 1. Pingback ingestion",
    "### 2. Provider API calls per task",
    "### 3. Recovery delay after the callback timeout",
    "### 4. Scale",
    "### 5. Pingback → app",
    "### 6. API-server writes and etcd bytes per task",
    "### 7. API Priority and Fairness",
    "### 8. Startup at scale",
    "### Targets",
)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, str]:
    """Run the small profile once; return the results, the Markdown and stdout."""
    out = tmp_path_factory.mktemp("bench-results")
    argv = [
        sys.executable, "-m", "bench.run", "--profile", "small",
        "--results-dir", str(out), "--workdir", str(out / "work"),
    ]  # fmt: skip
    done = run_bounded(argv, cwd=REPO, timeout=1020)
    assert done.returncode == 0, done.stdout[-8000:]
    results = json.loads((out / "small.json").read_text(encoding="utf-8"))
    return results, (out / "small.md").read_text(encoding="utf-8"), done.stdout


@pytest.mark.slow
@pytest.mark.timeout(1140)
def test_every_phase_ran_without_error(small_run: tuple[dict[str, Any], str, str]) -> None:
    results, _markdown, _stdout = small_run
    for phase in ("ingestion", "calls", "scale", "writes", "fairness", "startup"):
        assert phase in results
        assert "error" not in results[phase], results[phase].get("error")


@pytest.mark.slow
@pytest.mark.timeout(1140)
def test_the_results_name_the_machine_and_the_versions(
    small_run: tuple[dict[str, Any], str, str],
) -> None:
    machine = small_run[0]["machine"]
    assert machine["cpu_model"]
    assert machine["cores"] >= 1
    assert machine["ram_bytes"] > 0
    assert machine["kernel"]
    assert machine["python"]
    assert machine["packages"]["aiohttp"]
    assert machine["packages"]["kopf"]
    assert machine["kubernetes"]["kube_apiserver"].startswith("v")


@pytest.mark.slow
@pytest.mark.timeout(1140)
def test_ingestion_figures_are_finite_for_every_server(
    small_run: tuple[dict[str, Any], str, str],
) -> None:
    ingestion = small_run[0]["ingestion"]
    runs = [*ingestion["baselines"].values()]
    runs += [ingestion["ours"][key] for key in ("spool_wrk", "ledger_wrk")]
    for run in runs:
        for key in ("requests_per_second", "p50_ms", "p99_ms", "max_ms"):
            assert _finite(run[key]), (key, run)
    for key in ("spool_paced", "ledger_paced", "app_latency"):
        assert _finite(ingestion["ours"][key]["p99_ms"]), key
    assert ingestion["ours"]["spool_wrk"]["outcomes"]["spooled"] > 0
    assert ingestion["ours"]["ledger_wrk"]["outcomes"]["recorded"] > 0
    # Every result the closed loop sent reached the ledger, on either path (most by replay), and
    # the row counts them all: it once counted only the pingback path's own writes.
    ledger = ingestion["ours"]["ledger_wrk"]
    assert ledger["recorded_until_all"] >= ledger["results"] > 0
    assert ledger["recorded_in_run"] >= ledger["outcomes"]["recorded"]


@pytest.mark.slow
@pytest.mark.timeout(1140)
def test_the_api_ceiling_and_the_overload_run_are_whole(
    small_run: tuple[dict[str, Any], str, str], bench_import: BenchImport
) -> None:
    small = bench_import("profiles").SMALL
    ours = small_run[0]["ingestion"]["ours"]
    raw, overload = ours["raw_ceiling"], ours["overload"]
    assert raw["ok"] == raw["patches"] > 0
    assert _finite(raw["patches_per_second"])
    assert overload["rate_target"] == pytest.approx(2 * raw["patches_per_second"])
    for key in ("p50_ms", "p99_ms", "ledger_per_second", "seconds_to_apply_all"):
        assert _finite(overload[key]), key
    assert overload["applied"] >= overload["results"]  # every result reached the ledger
    shallow = ours["raw_ceiling_at_drain_depth"]
    assert shallow["ok"] == shallow["patches"] == raw["patches"]
    assert shallow["in_flight"] == DEFAULT_DRAIN_CONCURRENCY < raw["in_flight"]
    assert "the same probe with the drainer's depth" in small_run[1]
    assert ours["limit_layout"]["layout"]
    assert "API server at its limit" in small_run[1]
    # Every round ran whole, on tasks of its own; the rows above are the median round's.
    done = ours["limit_rounds"]
    assert len(done) == small.limit_rounds > 1
    for round_ in done:
        assert round_["raw_ceiling"]["ok"] == round_["raw_ceiling"]["patches"] > 0
        assert round_["overload"]["applied"] >= round_["overload"]["results"]
    assert done[ours["limit_median_round"]]["overload"] == overload
    assert f"{small.limit_rounds} rounds, each on tasks of its own" in small_run[1]


@pytest.mark.slow
@pytest.mark.timeout(1140)
def test_calls_and_recovery_cover_every_loss_level(
    small_run: tuple[dict[str, Any], str, str],
) -> None:
    calls = small_run[0]["calls"]
    levels = [level for level in calls["levels"] if not level.get("variant")]
    assert [level["loss"] for level in levels] == [0.0, 0.3, 1.0]
    for level in levels:
        assert _finite(level["ours"]["calls_per_task"])
        assert _finite(level["seed"]["calls_per_task"])
    full_loss = levels[-1]
    assert full_loss["ours_recovery"]["samples"] > 0
    assert full_loss["seed_recovery"]["samples"] > 0


@pytest.mark.slow
@pytest.mark.timeout(1140)
def test_scale_accounts_for_every_task(small_run: tuple[dict[str, Any], str, str]) -> None:
    results = small_run[0]
    scale = results["scale"]
    assert scale["listed"] == results["settings"]["scale_tasks"]
    for key in ("operator_peak_rss_bytes", "sidecar_peak_rss_bytes", "operator_cpu_seconds"):
        assert _finite(scale[key]), key
    assert _finite(scale["etcd"]["bytes_per_task_as_written"])


@pytest.mark.slow
@pytest.mark.timeout(1140)
def test_all_five_tables_are_printed_and_written(
    small_run: tuple[dict[str, Any], str, str],
) -> None:
    _results, markdown, stdout = small_run
    for title in TABLES:
        assert title in markdown
        assert title in stdout


@pytest.mark.slow
@pytest.mark.timeout(1140)
def test_the_api_server_footprint_phases_account_for_every_task(
    small_run: tuple[dict[str, Any], str, str],
) -> None:
    writes = small_run[0]["writes"]
    for path in ("pingback", "poll"):
        run = writes[path]
        assert run["delivered_by"] == {path: run["tasks"]}
        assert _finite(run["bytes_per_task_compacted"])
        assert run["per_task"]["POST captchatasks"] == 1
    fairness = small_run[0]["fairness"]
    # The small profile runs one storm per kind: the quiescent plane's, the cluster-like one's.
    (plane,) = fairness["cluster_like"]
    for run in (fairness["chart_apf"], plane["storms"]["chart_apf"]):
        assert run["list_pods"]["requests"] > 0
        assert run["list_pods"]["cached"]["requests"] > 0
        assert run["pingbacks"]["ok"] > 0
        assert run["ledger"]["drained"]
        assert run["cpu_seconds"]["kube-apiserver"] > 0  # what the storm's writes cost the plane
    # The pinned plane's Go runtime follows the affinity mask: one P, as on a one-core machine.
    unpinned = len(os.sched_getaffinity(0))
    assert fairness["apiserver_gomaxprocs"] == (1 if fairness["pinned"]["plane"] else unpinned)
    assert plane["idle"]["requests"] > 0
    assert plane["background"]["renewals"] > 0
    assert plane["background"]["errors"] == 0
    assert fairness["apf_objects"] == ["PriorityLevelConfiguration", "FlowSchema"]
    startup = small_run[0]["startup"]
    assert _finite(startup["operator"]["first_poll_s"])
    assert startup["receiver"]["open_replayed"] == startup["receiver"]["records"]
    assert _finite(startup["receiver"]["process_serving_backlog_s"])
    takeover = startup["takeover"]
    assert _finite(takeover["takeover_to_first_poll_s"])
    assert takeover["kill_to_takeover_s"] >= takeover["prepare_s"], "nobody active while preparing"
    assert takeover["kill_to_first_poll_s"] >= takeover["kill_to_record_expiry_s"]
