"""``captchatask testbed up|down|env``: a control plane that outlives the command.

``up`` starts the processes detached (their own sessions; output to log files, never to the
terminal or a pipe, so ``eval "$(captchatask testbed up)"`` returns), records them in
``<state-dir>/testbed.json`` and prints shell ``export`` lines on stdout; progress goes to
stderr. ``down`` and ``env`` find the processes again through that record.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Final

from captchatask.testbed.errors import ControlPlaneError, KubectlError
from captchatask.testbed.node import GATEWAY, Node, NodeNetwork, leftovers
from captchatask.testbed.plane import STATE_FILE, ControlPlane, default_crd_documents
from captchatask.testbed.processes import pid_alive

__all__ = ["DEFAULT_STATE_DIR", "cli_main"]

#: Where ``captchatask testbed`` keeps its state unless told otherwise (git-ignored).
DEFAULT_STATE_DIR: Final = Path(".testbed")


def _stderr(message: str) -> None:
    print(f"[testbed] {message}", file=sys.stderr, flush=True)


def _exports(plane: ControlPlane) -> str:
    """Shell lines that point ``kubectl`` at ``plane`` (for ``eval "$(...)"``).

    PATH gets the pinned binaries and the directory of the ``captchatask`` command itself: the
    hints name it, and after ``eval "$(make -s cluster)"`` no virtualenv is active.
    """
    path = f"{plane.toolchain.bin_dir}:{sysconfig.get_path('scripts')}"
    return (
        f"export KUBECONFIG={shlex.quote(str(plane.kubeconfig))}\n"
        f'export PATH={shlex.quote(path)}:"$PATH"\n'
    )


def _command(verb: str, state_dir: Path) -> str:
    """The ``captchatask testbed VERB`` line a hint prints, runnable as printed from anywhere.

    ``state_dir`` is resolved, so the line names it whenever it is not the default of the
    directory the user is in: a bare ``down`` would look in ``./.testbed`` and miss it.
    """
    command = f"captchatask testbed {verb}"
    if state_dir == DEFAULT_STATE_DIR.resolve():
        return command
    return f"{command} --state-dir {shlex.quote(str(state_dir))}"


def _claim_state_dir(state_dir: Path) -> None:
    """Make ``state_dir`` empty and ours, refusing to wipe a directory we did not create."""
    if state_dir.exists():
        if not (state_dir / STATE_FILE).exists() and any(state_dir.iterdir()):
            raise ControlPlaneError(
                f"{state_dir} is not empty and holds no {STATE_FILE}; refusing to use it as the "
                "test bed's state directory"
            )
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True)


def _cmd_up(state_dir: Path, *, node: bool) -> int:
    existing = ControlPlane.attach(state_dir, progress=_stderr)
    if existing is not None:
        if existing.is_running() and existing.node == node:
            _stderr(f"already running at {existing.server}")
            sys.stdout.write(_exports(existing))
            return 0
        _stderr("found a stale or different test bed; stopping it first")
        _stop_all(existing)
    _claim_state_dir(state_dir)
    network = NodeNetwork(state_dir) if node else None
    plane = (
        ControlPlane(state_dir, address=GATEWAY, node=True, progress=_stderr)
        if node
        else ControlPlane(state_dir, progress=_stderr)
    )
    started: Node | None = None
    try:
        if network is not None:
            network.create()
        plane.start()
        names = plane.install_crds(default_crd_documents())
        _stderr(f"installed {len(names)} CRD(s)" if names else "no CRDs to install")
        if node:
            started = Node(plane, progress=_stderr)
            started.start()
    except BaseException:
        if started is not None:
            started.stop()
        plane.stop()
        if network is not None:
            network.destroy()
        raise
    _stderr(f"logs in {plane.logs_dir}; stop with `{_command('down', state_dir)}`")
    sys.stdout.write(_exports(plane))
    return 0


def _stop_all(plane: ControlPlane) -> dict[str, int]:
    """Stop the node (if any), the control plane and the node's network; return the pids."""
    node = Node.attach(plane, progress=_stderr)
    pids = dict(plane.pids)
    if node is not None:
        pids.update(node.pids)
        node.stop()
    plane.stop()
    if plane.node:
        NodeNetwork(plane.state_dir).destroy()
    return pids


def _cmd_down(state_dir: Path) -> int:
    plane = ControlPlane.attach(state_dir, progress=_stderr)
    if plane is None:
        _stderr(f"no test bed recorded in {state_dir}; nothing to stop")
        return 0
    pids = _stop_all(plane)
    survivors = [f"{name} (pid {pid})" for name, pid in pids.items() if pid_alive(pid)]
    if survivors:
        _stderr(f"still running: {', '.join(survivors)}")
        return 1
    remaining = leftovers(state_dir) if plane.node else []
    if remaining:
        _stderr("left behind: " + "; ".join(remaining))
        return 1
    shutil.rmtree(state_dir)
    _stderr(f"stopped {', '.join(f'{n} (pid {p})' for n, p in pids.items())}; removed {state_dir}")
    return 0


def _cmd_env(state_dir: Path) -> int:
    plane = ControlPlane.attach(state_dir)
    if plane is None or not plane.is_running():
        _stderr(f"no running test bed in {state_dir}; start one with `{_command('up', state_dir)}`")
        return 1
    sys.stdout.write(_exports(plane))
    return 0


def cli_main(argv: list[str]) -> int:
    """Run ``captchatask testbed up|down|env [--state-dir DIR]``.

    Parameters
    ----------
    argv
        The arguments after ``testbed``, e.g. ``["up", "--state-dir", ".testbed"]``.

    Returns
    -------
    int
        The process exit status. Export lines go to stdout (``eval "$(captchatask testbed
        up)"`` works); progress and errors go to stderr.
    """
    parser = argparse.ArgumentParser(
        prog="captchatask testbed",
        description="Run a local etcd + kube-apiserver on 127.0.0.1 for development and tests.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("up", "start the test bed (idempotent), install the CRDs, print export lines"),
        ("down", "stop the test bed and remove its state directory"),
        ("env", "print export lines for the running test bed"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument(
            "--state-dir",
            type=Path,
            default=DEFAULT_STATE_DIR,
            help=f"where the test bed keeps its state (default: ./{DEFAULT_STATE_DIR})",
        )
        if name == "up":
            sub.add_argument(
                "--node",
                action="store_true",
                help="also run a node (containerd, kubelet, controller-manager, scheduler, "
                "kube-proxy) so pods run; needs root and `hack/build-binaries.sh --node`",
            )
    args = parser.parse_args(argv)
    handlers: dict[str, Callable[[Path], int]] = {
        "up": lambda state_dir: _cmd_up(state_dir, node=args.node),
        "down": _cmd_down,
        "env": _cmd_env,
    }
    try:
        return handlers[args.command](args.state_dir.resolve())
    except (ControlPlaneError, KubectlError) as err:
        _stderr(f"error: {err}")
        return 1
