"""Shared fixtures: a real etcd + kube-apiserver for every test that asks for one.

The control plane starts lazily, once per session, the first time a test requests
``control_plane`` (directly or through ``kube_env``, ``kubectl`` or ``namespace``), so pure unit
tests run without the binaries. When the binaries are missing, those fixtures *fail* with a
message naming ``make testbin``: a skipped Kubernetes test would hide exactly the regressions the
suite exists to catch. Every test that uses the control plane is marked ``controlplane``
automatically, so ``pytest -m "not controlplane"`` selects the unit tier.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from captchatask import testbed

#: Where the fixture's startup time is kept for the terminal summary.
STARTUP_SECONDS = pytest.StashKey[float]()

#: The fixtures that need the real control plane.
CONTROL_PLANE_FIXTURE = "control_plane"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that (transitively) uses the control plane as ``controlplane``."""
    for item in items:
        if CONTROL_PLANE_FIXTURE in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.controlplane)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Report how long the session's control plane took to become ready (measured, not asserted)."""
    seconds = terminalreporter.config.stash.get(STARTUP_SECONDS, None)
    if seconds is not None:
        terminalreporter.write_line(
            f"control plane (etcd + kube-apiserver) ready in {seconds:.2f}s"
        )


@pytest.fixture(scope="session")
def control_plane(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[testbed.ControlPlane]:
    """Start a control plane for the session, with captchatask's CRDs installed and Established."""
    plane = testbed.ControlPlane(tmp_path_factory.mktemp("control-plane"))
    try:
        plane.start()
    except testbed.MissingBinaryError as err:
        pytest.fail(str(err), pytrace=False)
    try:
        assert plane.startup_seconds is not None
        request.config.stash[STARTUP_SECONDS] = plane.startup_seconds
        plane.install_crds(testbed.default_crd_documents())
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def kube_env(control_plane: testbed.ControlPlane) -> dict[str, str]:
    """Return an environment for subprocesses: ``KUBECONFIG`` (admin) and the pinned binaries."""
    return control_plane.env()


@pytest.fixture
def kubectl(control_plane: testbed.ControlPlane) -> testbed.Kubectl:
    """Return a callable that runs the real kubectl as cluster admin against the test bed."""
    return control_plane.kubectl


@pytest.fixture
def namespace(control_plane: testbed.ControlPlane) -> Iterator[str]:
    """Create a fresh ``ct-<random>`` namespace; delete it afterwards without waiting.

    Without a controller-manager a namespace never finishes deleting, so the delete is only
    issued (``--wait=false``); random names keep tests independent of each other's leftovers.
    """
    name = f"ct-{secrets.token_hex(4)}"
    control_plane.kubectl("create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """Return the checkout root (tests always run from a checkout)."""
    root = testbed.checkout_root()
    assert root is not None, "tests run from a source checkout"
    return root
