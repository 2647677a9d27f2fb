"""deploy/ is generated from the chart: re-render it and fail on any difference (drift)."""

from __future__ import annotations

import subprocess
from pathlib import Path

#: helm renders the whole chart a handful of times; generous for a slow machine.
RENDER_TIMEOUT_SECONDS = 180
HEADER = "generated from charts/captchatask by `make manifests`"


def test_deploy_matches_a_fresh_render_of_the_chart(
    repo_root: Path, helm_binary: Path, tmp_path: Path
) -> None:
    result = subprocess.run(
        [str(repo_root / "hack" / "render-manifests.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        env={"HELM": str(helm_binary), "PATH": "/usr/bin:/bin"},
        timeout=RENDER_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    committed = {path.name for path in (repo_root / "deploy").iterdir()}
    rendered = {path.name for path in tmp_path.iterdir()}
    assert committed == rendered, "run `make manifests`"
    stale = [
        name
        for name in sorted(rendered)
        if (tmp_path / name).read_text() != (repo_root / "deploy" / name).read_text()
    ]
    assert stale == [], f"deploy/ is stale ({', '.join(stale)}): run `make manifests`"


def test_every_generated_file_says_so(repo_root: Path) -> None:
    for path in (repo_root / "deploy").iterdir():
        first_line = path.read_text().splitlines()[0]
        assert HEADER in first_line.replace("GENERATED", "generated"), path.name
        assert "do not edit" in first_line, path.name
