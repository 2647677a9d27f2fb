"""Errors of the test bed: what went wrong is in the message, including the fix when known."""

from __future__ import annotations

import subprocess

__all__ = ["ControlPlaneError", "KubectlError", "MissingBinaryError"]


class ControlPlaneError(RuntimeError):
    """The control plane could not be started, reached or stopped."""


class MissingBinaryError(ControlPlaneError):
    """A required binary is not installed; the message says how to build it."""


class KubectlError(subprocess.CalledProcessError):
    """kubectl exited non-zero; unlike the base class, ``str()`` includes its stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {self.stderr}\nstdout: {self.output}"
