"""``make e2e`` in its small profile, as part of ``make test``: the chart on a real node.

``bench.e2e`` brings up the test bed's node, imports the images, installs the chart with two
peered operators and two receivers, runs 100 tasks through the emulator with pingbacks dropped
and duplicated while the active operator is force-deleted, a receiver deleted and kube-apiserver
restarted, then 50 more during a ``helm upgrade`` that rolls every pod, judges against the
emulator's accounting (lost, recorded twice, submitted twice, wrong token), runs ``helm test``,
runs an app pod made from the chart's sidecar snippet that gets a token through its sidecar, and
checks that ``helm uninstall`` keeps the CRDs and the tasks. This test
runs it and checks the verdict it wrote; a missing binary or package makes it fail with the
command that provides it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from captchatask import testbed
from captchatask.testbed.node import locate_node_toolchain

pytestmark = [pytest.mark.controlplane, pytest.mark.node, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(1800)
def test_the_chart_on_a_node_loses_no_task(tmp_path: Path) -> None:
    try:
        locate_node_toolchain(testbed.locate_toolchain().bin_dir)
    except testbed.MissingBinaryError as err:
        pytest.fail(str(err), pytrace=False)
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}  # always the test bed node

    argv = [
        sys.executable, "-m", "bench.e2e",
        "--state-dir", str(tmp_path / "node"), "--results", str(tmp_path / "e2e.json"),
    ]  # fmt: skip
    run = subprocess.run(
        argv,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1700,
        check=False,
    )

    assert run.returncode == 0, f"make e2e failed:\n{run.stderr[-6000:]}\n{run.stdout}"
    summary = json.loads((tmp_path / "e2e.json").read_text())
    assert all(pod["ready"] for pod in summary["pods"])
    assert summary["disruptions"]["takeover_seconds"] is not None
    assert summary["helm_test"]["passed"], summary["helm_test"]
    app = summary["sidecar_app"]
    assert app["native_sidecar"], app
    assert app["sidecar_running"], app
    assert (app["phase"], app["token_matches"]) == ("Solved", True), app
    assert app["created_by"] == app["pod"]  # created through the sidecar's local API
    verdict = summary["verdict"]
    # 100, then 50 during helm upgrade, and the app's task through its sidecar
    assert verdict["tasks"] == verdict["solved"] == 151
    assert (verdict["lost"], verdict["submitted_twice"], verdict["wrong_token"]) == (0, 0, 0)
    assert verdict["recorded_twice"] == 0, verdict["recorded_twice_examples"]
    # The faults were real: pingbacks reached the receivers, some twice, some never.
    assert verdict["emulator_pingbacks_delivered"] > 0
    assert verdict["emulator_duplicates_sent"] > 0
    assert verdict["emulator_pingbacks_dropped"] > 0
    assert verdict["delivered_by_pingback"] > 0
    assert verdict["recovered_by_poll"] > 0
    uninstall = summary["uninstall"]
    assert uninstall["left_behind"] == []
    assert uninstall["tasks_kept"] == 151
    assert len(uninstall["crds_kept"]) == 3
