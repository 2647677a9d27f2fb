"""Keep the load generator off the server's core, and the control plane off both.

On a small machine a load generator that shares the server's core measures itself. The server
under test runs on :data:`SERVER_CORE` and every load generator (``wrk``, the paced client) on
:data:`LOAD_CORE`, both with ``taskset``. The control plane (etcd, kube-apiserver) is left
unpinned there: it takes whatever both cores have left, which is stated next to the ledger-path
figures.

Where the API server's own limit is the subject (its raw ceiling, a ledger client straight to
it, the sidecar overloading it) an unpinned control plane would be starved by the very load it
is measured under, so its capacity would depend on our load generator's appetite. In a real
cluster the control plane runs on machines of its own: :func:`pin_plane` models that by moving
every thread of etcd and kube-apiserver to :data:`PLANE_CORE`, and the sidecar, the load
generator and the probe clients share :data:`HOST_CORE` (:func:`describe_plane`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from typing import Final, Protocol

SERVER_CORE: Final = 0
LOAD_CORE: Final = 1
#: The control plane's own core while the API server's limit is measured (:func:`pin_plane`).
PLANE_CORE: Final = 0
#: Everything else meanwhile: the sidecar, the load generator and the probe clients.
HOST_CORE: Final = 1
_MIN_CORES: Final = 2


def can_pin() -> bool:
    """Whether two distinct cores and ``taskset`` are available."""
    return shutil.which("taskset") is not None and len(os.sched_getaffinity(0)) >= _MIN_CORES


def pinned(core: int, argv: Sequence[str]) -> list[str]:
    """Prefix ``argv`` with ``taskset -c core`` when pinning is possible."""
    if not can_pin():
        return list(argv)
    return ["taskset", "-c", str(core), *argv]


def pin_process(pid: int, core: int) -> bool:
    """Move every thread of a running process to ``core``; ``False`` if pinning is unavailable."""
    if not can_pin():
        return False
    done = subprocess.run(
        ["taskset", "-a", "-p", "-c", str(core), str(pid)],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


class Plane(Protocol):
    """What :func:`pin_plane` needs of a control plane (``captchatask.testbed.ControlPlane``)."""

    @property
    def pids(self) -> Mapping[str, int]:
        """Process ids by component (etcd, kube-apiserver)."""
        ...


def pin_plane(plane: Plane) -> bool:
    """Move every thread of etcd and kube-apiserver to :data:`PLANE_CORE`.

    Call it again after a component was restarted (a new process starts unpinned). ``False``
    when pinning is unavailable or a component could not be pinned.
    """
    pinned_each = [pin_process(pid, PLANE_CORE) for pid in plane.pids.values()]  # every one
    return bool(pinned_each) and all(pinned_each)


def release_plane(plane: Plane) -> bool:
    """Let etcd and kube-apiserver run on every core again (undoes :func:`pin_plane`)."""
    if not can_pin():
        return False
    cores = ",".join(str(core) for core in sorted(os.sched_getaffinity(0)))
    done = [
        subprocess.run(
            ["taskset", "-a", "-p", "-c", cores, str(pid)], capture_output=True, check=False
        ).returncode
        == 0
        for pid in plane.pids.values()
    ]
    return bool(done) and all(done)


@contextlib.contextmanager
def on_core(core: int) -> Iterator[bool]:
    """Run the calling thread (an in-process probe client) on ``core`` for the block."""
    if not can_pin():
        yield False
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield True
    finally:
        os.sched_setaffinity(0, before)


def describe_plane() -> str:
    """One line for the report: the layout while the API server's limit is measured."""
    if not can_pin():
        return "not pinned (taskset or a second core unavailable)"
    return (
        f"etcd and kube-apiserver on core {PLANE_CORE} (every thread, taskset), as on control "
        f"plane machines of their own; sidecar, load generator and probe clients on core "
        f"{HOST_CORE}"
    )


def describe() -> str:
    """One line for the report: how server and load were kept apart."""
    if not can_pin():
        return "not pinned (taskset or a second core unavailable)"
    return (
        f"server under test on core {SERVER_CORE}, load generator on core {LOAD_CORE} "
        "(taskset); etcd and kube-apiserver unpinned, except where the API server's limit is "
        f"measured: there it has core {PLANE_CORE} to itself and sidecar, load generator and "
        f"probe clients share core {HOST_CORE}"
    )
