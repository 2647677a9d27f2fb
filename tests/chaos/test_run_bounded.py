"""An overdue chaos run is asked to stop (SIGTERM) before it is killed, so it can reap its stack."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tests.bounded import run_bounded

#: A child that, like ``python -m bench.chaos``, tears down on SIGTERM (here: writes a file).
_TEARS_DOWN = """
import signal, sys, time
from pathlib import Path
def stop(signum, frame):
    Path(sys.argv[1]).write_text("stack stopped")
    raise SystemExit(128 + signum)
signal.signal(signal.SIGTERM, stop)
print("running", flush=True)
time.sleep(60)
"""
#: A child that ignores SIGTERM: it must still not outlive the test.
_IGNORES = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("running", flush=True)
time.sleep(60)
"""
#: Longer than a Python start on a loaded machine: the child's SIGTERM handler is installed.
STARTED = 5.0


def test_an_overdue_run_gets_sigterm_and_tears_its_stack_down(tmp_path: Path) -> None:
    marker = tmp_path / "teardown"
    with pytest.raises(pytest.fail.Exception, match="stopped with SIGTERM") as failed:
        run_bounded([sys.executable, "-c", _TEARS_DOWN, str(marker)], cwd=tmp_path, timeout=STARTED)
    assert marker.read_text() == "stack stopped"
    assert "running" in str(failed.value)


def test_a_run_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match=r"did not stop within 0\.5 s"):
        run_bounded([sys.executable, "-c", _IGNORES], cwd=tmp_path, timeout=STARTED, grace=0.5)


def test_a_run_that_finishes_in_time_returns_its_output(tmp_path: Path) -> None:
    done = run_bounded(
        [sys.executable, "-c", "print('verdict: passed')"], cwd=tmp_path, timeout=30.0
    )
    assert done.returncode == 0
    assert done.stdout.strip() == "verdict: passed"
