"""The chaos suite in the 2captcha dialect, inside ``make test``: bulk polling under every fault.

The CI profile (``test_chaos_ci.py``) speaks the CaptchaAI dialect, which polls one id per
request. This runs the small ``smoke`` profile against a 2captcha-dialect provider, where bulk
``ids=`` polling is on, exactly as ``python -m bench.chaos --profile smoke --dialect 2captcha``
does, and checks that every phase ran: nothing lost under the faults, bulk requests really
went out, and the batch-size histogram accounts for every poll request. It asserts nothing
about how many calls per task that takes (that figure belongs to ``make chaos``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from tests.bounded import TEARDOWN_GRACE_SECONDS, run_bounded

pytestmark = [pytest.mark.controlplane, pytest.mark.slow]

DEFAULT_SEED = "20261206"
#: Hang guard for the smoke profile (under a minute and a half on 2 cores).
RUN_TIMEOUT_SECONDS = 420


@pytest.mark.timeout(RUN_TIMEOUT_SECONDS + TEARDOWN_GRACE_SECONDS + 60)
def test_the_2captcha_dialect_polls_in_bulk_and_loses_nothing(
    repo_root: Path, tmp_path: Path
) -> None:
    seed = os.environ.get("CAPTCHATASK_CHAOS_SEED", DEFAULT_SEED)
    figures_file = tmp_path / "chaos-smoke-2captcha.json"
    argv = [sys.executable, "-m", "bench.chaos", "--profile", "smoke", "--dialect", "2captcha"]
    argv += ["--seed", seed, "--workdir", str(tmp_path / "stack"), "--json", str(figures_file)]
    run = run_bounded(argv, cwd=repo_root, timeout=RUN_TIMEOUT_SECONDS)
    output = run.stdout
    assert run.returncode == 0, output[-6000:]
    document = json.loads(figures_file.read_text())
    figures = document["figures"]
    assert document["dialect"] == "2captcha"
    assert document["passed"], document["violations"]
    assert figures["lost"] == 0
    assert figures["duplicates_recorded"] == 0
    assert figures["submitted_twice"] == 0
    assert figures["delivered_by"]["poll"] > 0
    assert figures["provider_calls"]["res_php_bulk"] > 0
    batches = figures["poll_batch_sizes"]
    assert batches["requests"] > 0
    assert sum(batches["histogram"].values()) == batches["requests"]
    assert "provider dialect" in output
    assert "poll batch sizes" in output
