"""Fixtures for the chart tests: the pinned helm, rendering, and CRDs the chart's objects need.

``helm`` is the binary ``hack/build-binaries.sh`` built next to kubectl; a missing helm *fails*
the tests that need it (a skipped chart test would hide a broken chart). Rendering always passes
``--kube-version`` from ``hack/versions.env``: helm built from source reports a placeholder
Kubernetes version that the chart's ``kubeVersion`` constraint would reject.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from captchatask import testbed

#: helm finishes a render in well under a second; a hung helm must not hang the suite.
HELM_TIMEOUT_SECONDS = 120

Render = Callable[..., list[dict[str, Any]]]
Helm = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def chart_dir(repo_root: Path) -> Path:
    """The chart under test."""
    return repo_root / "charts" / "captchatask"


@pytest.fixture(scope="session")
def ci_values_files(chart_dir: Path) -> list[Path]:
    """The chart-testing scenarios, ``ci/*-values.yaml``."""
    files = sorted((chart_dir / "ci").glob("*-values.yaml"))
    assert files, "the chart has ci/*-values.yaml scenarios"
    return files


@pytest.fixture(scope="session")
def kube_version(repo_root: Path) -> str:
    """The Kubernetes version the test bed runs (and renders are checked against)."""
    return testbed.pinned_versions(repo_root)["KUBERNETES_VERSION"]


@pytest.fixture(scope="session")
def helm_binary(repo_root: Path) -> Path:
    """The pinned helm from the binary cache (``make testtools``), else ``PATH``."""
    found = testbed.find_tool("helm")
    if found is None:
        pytest.fail(
            f"helm is missing: run `{testbed.TEST_TOOLS_HINT}` (hack/build-binaries.sh --test)",
            pytrace=False,
        )
    return found


def _run(
    argv: Sequence[str], *, env: dict[str, str] | None, check: bool
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        env=env,
        timeout=HELM_TIMEOUT_SECONDS,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def helm(helm_binary: Path) -> Helm:
    """Run helm without a cluster (lint, template)."""

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([str(helm_binary), *args], env=None, check=check)

    return run


@pytest.fixture
def cluster_helm(helm_binary: Path, kube_env: dict[str, str]) -> Helm:
    """Run helm against the test control plane (install, upgrade, uninstall)."""

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([str(helm_binary), *args], env=kube_env, check=check)

    return run


def documents(text: str) -> list[dict[str, Any]]:
    """Parse a multi-document YAML stream, dropping empty documents."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="session")
def render(helm: Helm, chart_dir: Path, kube_version: str) -> Render:
    """Render the chart (``helm template``) and return its objects (cached per arguments)."""
    cache: dict[tuple[Any, ...], str] = {}

    def run(
        *values_files: Path,
        namespace: str = "captchatask",
        release: str = "ct",
        sets: Sequence[str] = (),
        include_crds: bool = False,
    ) -> list[dict[str, Any]]:
        args = ["template", release, str(chart_dir), "--namespace", namespace]
        args += ["--kube-version", kube_version]
        for values in values_files:
            args += ["--values", str(values)]
        for item in sets:
            args += ["--set", item]
        if include_crds:
            args.append("--include-crds")
        key = tuple(args)
        if key not in cache:
            cache[key] = helm(*args).stdout
        return documents(cache[key])

    return run


@pytest.fixture(scope="session")
def support_crds(control_plane: testbed.ControlPlane, repo_root: Path, chart_dir: Path) -> None:
    """Install the CRDs that the chart's optional objects are instances of, once per session.

    kopf's peering CRDs come from the chart itself (``charts/kopf-peering``). The Prometheus
    Operator's ServiceMonitor and PrometheusRule are stand-ins (tests/chart/data): the real CRDs
    are not available offline, so dry-runs of those two objects prove the API group, version,
    kind and scope, while their content is proven by promtool (tests/monitoring).
    """
    docs: list[dict[str, Any]] = []
    for path in sorted((chart_dir / "charts" / "kopf-peering" / "crds").glob("*.yaml")):
        docs += documents(path.read_text(encoding="utf-8"))
    stand_ins = repo_root / "tests" / "chart" / "data" / "prometheus-operator-crds.yaml"
    docs += documents(stand_ins.read_text(encoding="utf-8"))
    control_plane.install_crds(docs)
