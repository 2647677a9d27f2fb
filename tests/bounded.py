"""Running ``python -m bench.chaos`` / ``bench.run`` from a test without leaking a stack on a hang.

``subprocess.run(timeout=...)`` ends an overdue child with SIGKILL, which gives the run no chance
to stop what it started: its emulator, operator, sidecar, etcd and kube-apiserver kept running
after the test failed, loading the machine for every later test. Both entry points stop their
stacks on SIGTERM (they turn it into ``SystemExit``), so an overdue run is sent SIGTERM first and
killed only if it has not finished tearing down after a grace period.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

#: Seconds an overdue run gets to stop its stack after SIGTERM (stopping takes a few seconds).
TEARDOWN_GRACE_SECONDS = 60.0


def run_bounded(
    argv: Sequence[str], *, cwd: Path, timeout: float, grace: float = TEARDOWN_GRACE_SECONDS
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion; past ``timeout``, SIGTERM it, then SIGKILL, then fail."""
    with subprocess.Popen(
        list(argv), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            try:
                output, _ = process.communicate(timeout=grace)
                how = "stopped with SIGTERM (its stack torn down)"
            except subprocess.TimeoutExpired:
                process.kill()
                output, _ = process.communicate()
                how = f"killed: it did not stop within {grace:g} s of SIGTERM"
            pytest.fail(f"{argv[1:4]} ran past {timeout:g} s and was {how}\n{output[-6000:]}")
        return subprocess.CompletedProcess(list(argv), process.returncode, output, "")
