"""Keep the load generator off the server's core.

On a small machine a load generator that shares the server's core measures itself. The server
under test runs on :data:`SERVER_CORE` and every load generator (``wrk``, the paced client) on
:data:`LOAD_CORE`, both with ``taskset``. The control plane (etcd, kube-apiserver) is left
unpinned: in production it is another machine, here it takes whatever both cores have left,
which is stated next to the ledger-path figures.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from typing import Final, Protocol

SERVER_CORE: Final = 0
LOAD_CORE: Final = 1
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


#: The control plane's core (etcd and kube-apiserver): in a cluster they run on machines of their
#: own, so phases that measure the API server's side keep them off the core of the components.
PLANE_CORE: Final = 0


class _Plane(Protocol):
    """What :func:`pin_plane` needs of a :class:`captchatask.testbed.ControlPlane`."""

    @property
    def pids(self) -> dict[str, int]: ...


def pin_plane(plane: _Plane) -> bool:
    """Move etcd and kube-apiserver (every thread) to :data:`PLANE_CORE`; ``False`` if not done.

    Pin again after the API server restarts: a new process starts on every core.
    """
    done = [pin_process(pid, PLANE_CORE) for pid in plane.pids.values()]  # each, no short cut
    return bool(done) and all(done)


def describe() -> str:
    """One line for the report: how server and load were kept apart."""
    if not can_pin():
        return "not pinned (taskset or a second core unavailable)"
    return (
        f"server under test on core {SERVER_CORE}, load generator on core {LOAD_CORE} "
        "(taskset); etcd and kube-apiserver unpinned"
    )
