"""What the figures were measured on: CPU, cores, RAM, kernel and every relevant version.

Benchmark figures mean nothing without the machine, so every result file carries this record.
Everything is read from ``/proc``, ``platform`` and the installed distributions; the Kubernetes
and etcd versions come from the running test bed (their ``/version`` endpoints), because the
binaries are built by ``hack/build-binaries.sh`` and may differ from what a reader assumes.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Final

from captchatask.testbed import find_tool

#: Distributions whose versions shape the figures (server stack, operator framework, baselines).
DISTRIBUTIONS: Final = ("aiohttp", "kopf", "flask", "werkzeug", "gunicorn", "prometheus-client")


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.processor() or "unknown"


def _ram_bytes() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text(encoding="utf-8")
    except OSError:
        return None
    match = re.search(r"^MemTotal:\s*(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _wrk_version() -> str | None:
    wrk = find_tool("wrk")
    if wrk is None:
        return None
    # wrk prints its version banner (to stdout) on an invalid invocation and exits non-zero.
    done = subprocess.run([str(wrk), "-v"], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0] if first else None


def machine_info(*, kubernetes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Describe this machine and the software under test.

    Parameters
    ----------
    kubernetes
        Versions reported by the test bed (``kube-apiserver`` ``/version``, etcd ``/version``),
        filled in by the caller once a control plane runs.
    """
    uname = platform.uname()
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_bytes": _ram_bytes(),
        "kernel": f"{uname.system} {uname.release}",
        "machine": uname.machine,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "packages": {name: _version(name) for name in DISTRIBUTIONS},
        "captchatask": _version("captchatask"),
        "wrk": _wrk_version(),
        "kubernetes": kubernetes or {},
    }
