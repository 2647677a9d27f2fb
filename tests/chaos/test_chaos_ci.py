"""The chaos suite's CI profile, inside ``make test``: every fault at once, nothing lost.

Runs ``python -m bench.chaos --profile ci`` exactly as a person would (a separate process that
starts its own control plane, emulator, sidecar and operator), then reads the figures it wrote.
The run itself checks everything against the emulator's accounting and exits non-zero on any
violation; this test re-asserts the headline figures so a failure names them. The seed is fixed
for a reproducible CI (override with ``CAPTCHATASK_CHAOS_SEED``); the run prints its replay
command either way. ``make chaos`` runs the full profile (1,000 tasks).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from tests.bounded import TEARDOWN_GRACE_SECONDS, run_bounded

pytestmark = [pytest.mark.controlplane, pytest.mark.slow]

DEFAULT_SEED = "20261128"
#: Hang guard for the whole CI profile (it takes about two minutes on 2 cores).
RUN_TIMEOUT_SECONDS = 480


@pytest.mark.timeout(RUN_TIMEOUT_SECONDS + TEARDOWN_GRACE_SECONDS + 60)
def test_ci_profile_loses_nothing_duplicates_nothing_and_leaks_no_secret(
    repo_root: Path, tmp_path: Path
) -> None:
    seed = os.environ.get("CAPTCHATASK_CHAOS_SEED", DEFAULT_SEED)
    figures_file = tmp_path / "chaos-ci.json"
    argv = [sys.executable, "-m", "bench.chaos", "--profile", "ci", "--seed", seed]
    argv += ["--workdir", str(tmp_path / "stack"), "--json", str(figures_file)]
    run = run_bounded(argv, cwd=repo_root, timeout=RUN_TIMEOUT_SECONDS)
    output = run.stdout
    assert run.returncode == 0, output[-6000:]
    document = json.loads(figures_file.read_text())
    figures = document["figures"]
    assert document["passed"], document["violations"]
    assert figures["lost"] == 0
    assert figures["duplicates_recorded"] == 0
    assert figures["mixed_up"] == 0
    assert figures["submitted_twice"] == 0
    assert figures["past_deadline"] == 0
    assert figures["secret_leaks"] == 0
    assert figures["spool_bytes_left"] == 0
    late = figures["late_outage"]
    # The planted letters, and the answers of late tasks acknowledged only after their deadline.
    assert figures["dead_letters"] == (
        figures["faults"]["planted_dead_letters"] + late["task_failed_letters"]
    )
    # The faults really happened (a run that injected nothing would prove nothing).
    faults = figures["faults"]
    assert faults["pingbacks_dropped"] > 0
    assert faults["pingbacks_duplicated"] > 0
    assert faults["pingbacks_delayed_past_threshold"] > 0
    assert faults["unsolvable"] > 0
    assert faults["res_php_html_502"] > 0
    assert faults["in_php_replies_lost"] > 0  # tasks created whose in.php reply was lost
    # The profile's, and the late-outage fault's two (the bound lifted, the receiver down).
    assert faults["sidecar_sigkills"] == 2 + 2
    assert faults["operator_sigkills"] == 1
    assert figures["timings"]["apiserver_outage_seconds"] > 0
    assert figures["timings"]["max_spool_depth"] > 0, "the outage spooled nothing"
    # The receiver's spool bound was reached in the outage: it refused (503) what it could not
    # hold, and the fallback poll recovered those results (lost is 0 above).
    assert faults["spool_full_503s"] > 0
    assert figures["timings"]["max_spool_depth_bounded"] <= faults["spool_bound_records"]
    assert figures["delivered_by"]["poll"] > 0
    assert figures["delivered_by"]["pingback"] > 0
    # Results acknowledged while the API server was away past their tasks' deadlines.
    assert late["tasks"] == 3
    assert late["acknowledged_before_deadline"] > 0
    assert late["failures_replaced"] > 0, "no spooled result met a DeadlineExceeded failure"
    assert late["solved"] + late["failed"] == late["tasks"]
