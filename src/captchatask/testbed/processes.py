"""Child processes that can also be found again, by pid, from a later command.

A :class:`ManagedProcess` is either our own child (we hold its ``Popen`` and reap it) or a
process recorded in a state file by an earlier ``captchatask testbed up``, which exited long
ago; then only the pid is known, so every signal is preceded by a check that the pid still runs
a command line naming our state directory (pids get recycled). Each process leads its own
session and process group, so signals reach anything it might spawn.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from captchatask.testbed.errors import ControlPlaneError

__all__ = ["POLL_INTERVAL", "ManagedProcess", "pid_alive"]

#: Seconds a process gets between SIGTERM and SIGKILL (kube-apiserver drains in about one).
STOP_TIMEOUT: Final = 15.0

#: Poll period while waiting for a process (and for readiness, as in envtest).
POLL_INTERVAL: Final = 0.1

#: Lines of a process log quoted in a start-failure message.
LOG_TAIL_LINES: Final = 40


def pid_alive(pid: int) -> bool:
    """Tell whether ``pid`` is a live process.

    A zombie counts as gone: after ``down`` the stopped processes belong to init, and a minimal
    init (e.g. in a container or micro-VM) may reap them late or never.

    Parameters
    ----------
    pid
        The process id.

    Returns
    -------
    bool
        True while the process runs or is stopped (SIGSTOP).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # The state letter follows the parenthesised command name, which may itself hold spaces.
    state = stat.rpartition(")")[2].split()[0]
    return state not in {"Z", "X"}


def _cmdline(pid: int) -> str | None:
    """Return the command line of ``pid`` (NUL separators as spaces), or None if unknown."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None


def _tail(path: Path, *, offset: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last ``lines`` lines written to a log after ``offset`` (this run's output)."""
    try:
        with path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class ManagedProcess:
    """A control-plane process: our child (``popen``) or one recorded by an earlier command."""

    name: str
    argv: list[str]
    log: Path
    pid: int
    #: A string in the process's command line that proves a recorded pid is still ours (the
    #: state directory), so a recycled pid is never signalled.
    marker: str
    #: Size of the (appended) log when this process started: its own output begins there.
    log_offset: int = 0
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def launch(
        cls,
        *,
        name: str,
        argv: list[str],
        log: Path,
        marker: str,
        env: Mapping[str, str] | None = None,
    ) -> ManagedProcess:
        """Start ``argv`` in a new session, appending its output to ``log``.

        Parameters
        ----------
        name
            The component name used in messages.
        argv
            The command line.
        log
            The log file (appended to, so restarts keep the earlier output).
        marker
            See the attribute of the same name.
        env
            The environment (default: inherit this process's).

        Returns
        -------
        ManagedProcess
            The running process, owned by the caller.
        """
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as sink:
            sink.write(f"\n===== {time.strftime('%H:%M:%S')} starting {name}\n".encode())
            sink.flush()
            offset = sink.tell()
            popen = subprocess.Popen(  # noqa: S603 - argv is built here from resolved binaries
                argv,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=None if env is None else dict(env),
            )
        return cls(
            name=name,
            argv=argv,
            log=log,
            pid=popen.pid,
            marker=marker,
            log_offset=offset,
            popen=popen,
        )

    def log_tail(self) -> str:
        """Return the end of this run's output, for error messages."""
        return f"last lines of {self.log}:\n{_tail(self.log, offset=self.log_offset)}"

    def alive(self) -> bool:
        """Tell whether the process still runs (a zombie, or a recycled pid, does not count)."""
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_alive(self.pid) and self._ours()

    def _ours(self) -> bool:
        cmdline = _cmdline(self.pid)
        return cmdline is None or self.marker in cmdline

    def signal(self, signum: signal.Signals) -> None:
        """Send ``signum`` to the process group (its own session; see module docstring)."""
        if self.popen is None and not (pid_alive(self.pid) and self._ours()):
            return
        with contextlib.suppress(ProcessLookupError):
            try:
                os.killpg(self.pid, signum)
            except PermissionError:
                os.kill(self.pid, signum)

    def terminate(self, timeout: float = STOP_TIMEOUT, *, grace: float | None = None) -> None:
        """SIGTERM, wait up to ``grace`` (default ``timeout``), then SIGKILL; return once gone."""
        if not self.alive():
            self._reap()
            return
        self.signal(signal.SIGTERM)
        self.signal(signal.SIGCONT)  # a paused process must run to handle SIGTERM
        if not self._wait(timeout if grace is None else grace):
            self.signal(signal.SIGKILL)
            if not self._wait(timeout):
                raise ControlPlaneError(f"{self.name} (pid {self.pid}) survived SIGKILL")

    def _wait(self, timeout: float) -> bool:
        if self.popen is not None:
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_INTERVAL)
        return True

    def _reap(self) -> None:
        if self.popen is not None:
            self.popen.poll()

    def to_json(self) -> dict[str, Any]:
        """Return the record written to the state file."""
        return {
            "pid": self.pid,
            "argv": self.argv,
            "log": str(self.log),
            "log_offset": self.log_offset,
            "marker": self.marker,
        }

    @classmethod
    def from_json(cls, name: str, data: Mapping[str, Any]) -> ManagedProcess:
        """Rebuild a handle (without ``popen``) from :meth:`to_json`'s record."""
        return cls(
            name=name,
            argv=list(data["argv"]),
            log=Path(data["log"]),
            pid=int(data["pid"]),
            marker=str(data["marker"]),
            log_offset=int(data.get("log_offset", 0)),
        )
