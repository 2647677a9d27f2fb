"""Where the control-plane binaries and their pinned versions are, and free loopback ports.

The binaries come from ``hack/build-binaries.sh`` (``make testbin``), which links them into one
``bin/`` folder of a cache keyed by version; ``hack/versions.env`` pins the versions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from captchatask.testbed.errors import ControlPlaneError, MissingBinaryError

__all__ = [
    "BINARIES",
    "LOOPBACK",
    "TESTBIN_ENV",
    "TEST_TOOLS_HINT",
    "Toolchain",
    "checkout_root",
    "find_tool",
    "free_ports",
    "locate_toolchain",
    "pinned_versions",
]

#: Every process and every certificate lives on this address: test traffic never leaves loopback.
LOOPBACK: Final = "127.0.0.1"

#: The environment variable that points at the binary cache (``$TESTBIN_DIR/bin`` holds links).
TESTBIN_ENV: Final = "TESTBIN_DIR"

#: The binaries the control plane needs; helm is built too but only chart tests use it.
BINARIES: Final = ("etcd", "kube-apiserver", "kubectl")

#: The command a user runs to build the binaries; every "missing binary" message names it.
BUILD_HINT: Final = "make testbin"

#: The command that adds what only the tests and benchmarks need (helm, promtool, prometheus, wrk).
TEST_TOOLS_HINT: Final = "make testtools"


def checkout_root() -> Path | None:
    """Return the repository root when this module runs from a source checkout.

    Returns
    -------
    Path or None
        The checkout root (the directory holding ``hack/versions.env``), or None for an
        installed package.
    """
    root = Path(__file__).resolve().parents[3]  # src/captchatask/testbed/toolchain.py
    return root if (root / "hack" / "versions.env").is_file() else None


def pinned_versions(root: Path | None = None) -> dict[str, str]:
    """Read the pinned tool versions from ``hack/versions.env``.

    Parameters
    ----------
    root
        The checkout root; defaults to :func:`checkout_root`.

    Returns
    -------
    dict of str to str
        E.g. ``{"KUBERNETES_VERSION": "1.36.3", "ETCD_VERSION": "3.6.16", ...}``.
    """
    root = root or checkout_root()
    if root is None:
        raise ControlPlaneError("hack/versions.env is only available in a source checkout")
    versions: dict[str, str] = {}
    for raw in (root / "hack" / "versions.env").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            versions[key.strip()] = value.strip().strip("'\"")
    return versions


@dataclass(frozen=True)
class Toolchain:
    """Resolved paths of the control-plane binaries.

    Attributes
    ----------
    etcd
        The etcd server.
    kube_apiserver
        kube-apiserver.
    kubectl
        kubectl.
    bin_dir
        The directory to put first on ``PATH`` so ``kubectl`` (and helm) resolve to the pinned
        builds in a user's shell.
    """

    etcd: Path
    kube_apiserver: Path
    kubectl: Path
    bin_dir: Path


def _search_dirs() -> tuple[list[Path] | None, str]:
    """Return the directories to search (None means ``PATH``) and a description for errors."""
    testbin = os.environ.get(TESTBIN_ENV)
    if testbin:
        return [Path(testbin) / "bin"], f"${TESTBIN_ENV}/bin ({Path(testbin) / 'bin'})"
    root = checkout_root()
    if root is not None and (root / ".testbin" / "bin").is_dir():
        return [root / ".testbin" / "bin"], f"the checkout's .testbin/bin ({root / '.testbin/bin'})"
    return None, "PATH"


def locate_toolchain() -> Toolchain:
    """Find etcd, kube-apiserver and kubectl.

    Lookup order: ``$TESTBIN_DIR/bin`` if the variable is set, else ``<checkout>/.testbin/bin``
    if it exists, else ``PATH``. Only the first applicable place is searched, so a stray older
    kubectl on ``PATH`` never mixes with the pinned builds.

    Returns
    -------
    Toolchain
        The resolved binaries.

    Raises
    ------
    MissingBinaryError
        If any binary is missing; the message names the place searched and ``make testbin``.
    """
    dirs, where = _search_dirs()
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in BINARIES:
        if dirs is None:
            hit = shutil.which(name)
            path = Path(hit) if hit else None
        else:
            candidate = dirs[0] / name
            path = candidate if os.access(candidate, os.X_OK) else None
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        raise MissingBinaryError(
            f"control-plane binaries not found in {where}: {', '.join(missing)}. "
            f"Build them with `{BUILD_HINT}` (hack/build-binaries.sh), or point "
            f"${TESTBIN_ENV} at a cache whose bin/ holds them."
        )
    bin_dir = dirs[0] if dirs is not None else found["kubectl"].parent
    return Toolchain(
        etcd=found["etcd"],
        kube_apiserver=found["kube-apiserver"],
        kubectl=found["kubectl"],
        bin_dir=bin_dir.resolve(),
    )


def find_tool(name: str) -> Path | None:
    """Find a tool the project installs itself (helm, promtool, prometheus, wrk, ...).

    The binary cache comes first, for the same reason as in :func:`locate_toolchain`: the pinned
    build must win over whatever older copy a machine has on ``PATH``. ``PATH`` is the fallback,
    so a user who installed the tool another way (a distribution package) still runs the tests.

    Parameters
    ----------
    name
        The executable's name.

    Returns
    -------
    Path or None
        The executable, or None when neither the cache nor ``PATH`` has it (callers fail with
        :data:`TEST_TOOLS_HINT` in the message).
    """
    dirs, _ = _search_dirs()
    for folder in dirs or []:
        candidate = folder / name
        if os.access(candidate, os.X_OK):
            return candidate
    hit = shutil.which(name)
    return Path(hit) if hit else None


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct free TCP ports on loopback.

    All sockets are held open until every port is chosen, so the ports are distinct; another
    process may still grab one before our server binds it, which is why starts are retried.

    Parameters
    ----------
    count
        How many ports.

    Returns
    -------
    list of int
        The ports.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOOPBACK, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports
