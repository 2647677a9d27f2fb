"""Closed-loop throughput with ``wrk``, pinned to the load generator's core.

``wrk`` (C, epoll) costs a fraction of what it measures, so it finds a server's ceiling without
becoming the bottleneck itself. It runs under ``taskset -c`` on the load core while the server
under test is pinned to the other one (see :mod:`bench.cores`). Every request path comes from a
file, one per line, cycled by a small Lua script: each pingback goes to a distinct task (its own
signed path and provider id), like real traffic, instead of hammering one URL.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from bench.cores import LOAD_CORE, pinned
from captchatask.testbed import TEST_TOOLS_HINT, find_tool

#: Cycles through the lines of $BENCH_PATHS; one wrk thread, so one counter suffices.
LUA_SCRIPT: Final = """\
local paths = {}
for line in io.lines(os.getenv("BENCH_PATHS")) do paths[#paths + 1] = line end
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i - 1) % #paths + 1])
end
"""
#: Same concurrency for every server measured (one setting for all, so the figures compare).
DEFAULT_CONNECTIONS: Final = 64
_UNITS: Final = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_DURATION: Final = re.compile(r"^([\d.]+)(us|ms|s|m)$")


class WrkError(RuntimeError):
    """wrk is missing or its output could not be read."""


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run: throughput and latency in milliseconds."""

    requests: int
    seconds: float
    requests_per_second: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int
    connections: int

    def as_json(self) -> dict[str, Any]:
        """The result as a JSON object."""
        return asdict(self)


def _seconds(text: str) -> float:
    match = _DURATION.match(text.strip())
    if match is None:
        raise WrkError(f"unreadable wrk duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse(output: str, *, connections: int) -> WrkResult:
    """Read wrk's ``--latency`` report.

    Raises
    ------
    WrkError
        A line wrk always prints is missing.
    """
    percentiles = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)$", output, re.MULTILINE))
    latency = re.search(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)", output, re.MULTILINE)
    total = re.search(r"^\s+(\d+) requests in ([\d.]+\w+),", output, re.MULTILINE)
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    if not (latency and total and rate and len(percentiles) == 3):
        raise WrkError(f"unexpected wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return WrkResult(
        requests=int(total.group(1)),
        seconds=_seconds(total.group(2)),
        requests_per_second=float(rate.group(1)),
        p50_ms=_seconds(percentiles["50"]) * 1e3,
        p90_ms=_seconds(percentiles["90"]) * 1e3,
        p99_ms=_seconds(percentiles["99"]) * 1e3,
        max_ms=_seconds(latency.group(3)) * 1e3,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        connections=connections,
    )


def run(
    base_url: str,
    paths_file: Path,
    *,
    seconds: float,
    connections: int = DEFAULT_CONNECTIONS,
    workdir: Path,
) -> WrkResult:
    """Run wrk against ``base_url`` + each line of ``paths_file`` for ``seconds``.

    Raises
    ------
    WrkError
        wrk is not installed or failed.
    """
    wrk = find_tool("wrk")
    if wrk is None:
        raise WrkError(f"wrk is missing: build the tool cache with `{TEST_TOOLS_HINT}`")
    script = workdir / "cycle.lua"
    script.write_text(LUA_SCRIPT, encoding="utf-8")
    argv = [
        str(wrk),
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
        base_url,
    ]
    done = subprocess.run(
        pinned(LOAD_CORE, argv),
        capture_output=True,
        text=True,
        check=False,
        env={"BENCH_PATHS": str(paths_file), "PATH": "/usr/bin:/bin"},
        timeout=seconds + 60,
    )
    if done.returncode != 0:
        raise WrkError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    return parse(done.stdout, connections=connections)


def write_paths(path: Path, lines: list[str]) -> Path:
    """Write request paths, one per line, for :func:`run` and the paced generator."""
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
