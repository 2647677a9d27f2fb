"""A real Kubernetes control plane on loopback: etcd plus kube-apiserver as local processes.

Everything captchatask does against Kubernetes is tested against a real kube-apiserver backed by
a real etcd, not a mock. Kind needs Docker, which the build machines do not have, so this module
does what controller-runtime's envtest does: it starts the two binaries built by
``hack/build-binaries.sh`` as child processes on ``127.0.0.1``, wires them with throw-away
certificate authorities (:mod:`captchatask.pki`), waits until they are ready and writes an admin
kubeconfig. The same code serves two callers:

* the pytest fixtures in ``tests/conftest.py`` (:class:`ControlPlane` as a context manager), and
* ``captchatask testbed up|down|env`` (:func:`cli_main`), which leaves the processes running
  detached and records them in a state directory so a later command can find and stop them.

There is no controller-manager, scheduler or kubelet: namespaces never finish deleting, owner
references never cascade, Pods stay Pending and no ``default`` ServiceAccount appears. The
TokenRequest API does work (the apiserver serves it itself), which is what RBAC tests use.

Processes run in their own session, so a ``SIGTERM``/``SIGKILL`` reaches the whole process group
and an interrupted test run cannot leave a half-started tree attached to the terminal. Their
output goes to ``logs/`` in the state directory; start failures quote the tail of those logs.
"""

from captchatask.testbed.cli import DEFAULT_STATE_DIR, cli_main
from captchatask.testbed.errors import ControlPlaneError, KubectlError, MissingBinaryError
from captchatask.testbed.plane import STATE_FILE, ControlPlane, Kubectl, default_crd_documents
from captchatask.testbed.toolchain import (
    BINARIES,
    TEST_TOOLS_HINT,
    TESTBIN_ENV,
    Toolchain,
    checkout_root,
    find_tool,
    free_ports,
    locate_toolchain,
    pinned_versions,
)

__all__ = [
    "BINARIES",
    "DEFAULT_STATE_DIR",
    "STATE_FILE",
    "TESTBIN_ENV",
    "TEST_TOOLS_HINT",
    "ControlPlane",
    "ControlPlaneError",
    "Kubectl",
    "KubectlError",
    "MissingBinaryError",
    "Toolchain",
    "checkout_root",
    "cli_main",
    "default_crd_documents",
    "find_tool",
    "free_ports",
    "locate_toolchain",
    "pinned_versions",
]
