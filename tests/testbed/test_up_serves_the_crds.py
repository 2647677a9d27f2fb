"""``captchatask testbed up`` returns only when the CRDs are served: the first command works.

Discovery lists a new type before the API server can serve it; until the type's watch cache has
filled, a LIST answers ``429 storage is (re)initializing``. The first check below sends a LIST
of every kind with retries switched off, so it fails if ``up`` returned too early even though
the CLI itself would wait that out; the second is what a user types next.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from captchatask import kube, testbed


def _testbed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "captchatask", "testbed", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    state_dir = tmp_path / "testbed"
    yield state_dir
    _testbed("down", "--state-dir", str(state_dir))  # never leave a control plane behind


async def _list_every_kind_once(kubeconfig: Path) -> dict[str, int]:
    """LIST each served version of each CRD, no retries; status per path."""
    config = kube.load_config(str(kubeconfig))
    statuses: dict[str, int] = {}
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:
        client = kube.KubeClient(config, session, retry=kube.RetryPolicy(max_retries=0))
        for crd in testbed.default_crd_documents():
            spec = crd["spec"]
            for version in spec["versions"]:
                resource = kube.Resource(spec["group"], version["name"], spec["names"]["plural"])
                path = resource.path(None)
                try:
                    await client.request("GET", path, params={"limit": "1"})
                    statuses[path] = 200
                except kube.TooManyRequests as exc:
                    statuses[path] = exc.status
    return statuses


@pytest.mark.controlplane
def test_the_cli_works_the_moment_up_returns(state_dir: Path, tmp_path: Path) -> None:
    up = _testbed("up", "--state-dir", str(state_dir))
    assert up.returncode == 0, up.stderr
    kubeconfig = state_dir / "kubeconfig"

    statuses = asyncio.run(_list_every_kind_once(kubeconfig))
    assert statuses, "no CRDs to list"
    assert set(statuses.values()) == {200}, statuses

    dlq = subprocess.run(
        [sys.executable, "-m", "captchatask", "dlq", "list", "-A"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)},
    )
    assert (dlq.returncode, dlq.stdout, dlq.stderr) == (0, "No dead letters.\n", "")
