"""`captchatask demo --ci` end to end: the newcomer's first command must report nothing lost."""

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_runs_unattended_and_loses_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "captchatask",
            "demo",
            "--ci",
            "--tasks",
            "12",
            "--timeout",
            "180",
            "--workdir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    summary = out[out.index("== summary") :]
    lines = {
        line.split("  ")[1].strip(): line.split()[-1]
        for line in summary.splitlines()[1:]
        if line.startswith("  ") and not line.startswith("  LOST")
    }
    assert lines["lost"] == "0"
    assert lines["tasks"] == "12"
    assert "freezing the kube-apiserver" in out
    assert "stopping everything" in out
