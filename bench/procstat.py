"""CPU seconds and memory of a process, straight from ``/proc`` (Linux only, like the bench).

``/proc/<pid>/stat`` fields 14 and 15 are user and system time in clock ticks; ``VmRSS`` is the
resident set now and ``VmHWM`` its peak since the process started, which is what "peak RSS"
means in the results (no sampling gaps). A sampler thread also records the RSS over time so the
scale run can show when memory grew.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import Final

_TICKS: Final = os.sysconf("SC_CLK_TCK")
_UTIME_FIELD: Final = 11  # after the ")" that ends the command name: state is field 0
_STIME_FIELD: Final = 12


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    user, system = cpu_times(pid)
    return user + system


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds the process has used so far (every thread)."""
    raw = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    fields = raw.rsplit(")", 1)[1].split()
    return int(fields[_UTIME_FIELD]) / _TICKS, int(fields[_STIME_FIELD]) / _TICKS


def core_ticks() -> dict[int, tuple[int, int]]:
    """Per core: (busy, total) clock ticks so far, from ``/proc/stat`` (the whole machine's).

    Busy is every field but idle and iowait. Only the first eight fields count: guest and
    guest_nice are already part of user and nice.
    """
    out = {}
    for line in Path("/proc/stat").read_text(encoding="ascii").splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            ticks = [int(field) for field in fields[:8]]
            out[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return out


def busy_shares(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]
) -> dict[int, float]:
    """Share of each core busy between two :func:`core_ticks` readings."""
    return {
        core: round((busy - before[core][0]) / max(1, total - before[core][1]), 3)
        for core, (busy, total) in after.items()
        if core in before
    }


def _status_kib(pid: int, key: str) -> int:
    raw = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    match = re.search(rf"^{key}:\s+(\d+) kB", raw, re.MULTILINE)
    return int(match.group(1)) if match else 0


def rss_bytes(pid: int) -> int:
    """Resident set size now."""
    return _status_kib(pid, "VmRSS") * 1024


def peak_rss_bytes(pid: int) -> int:
    """Peak resident set size since the process started (``VmHWM``)."""
    return _status_kib(pid, "VmHWM") * 1024


class RssSampler:
    """Sample the RSS of some processes every ``interval`` seconds in a daemon thread.

    Parameters
    ----------
    pids
        Name -> pid of the processes to watch.
    interval
        Seconds between samples.
    """

    def __init__(self, pids: dict[str, int], *, interval: float = 1.0) -> None:
        self.pids = dict(pids)
        self.interval = interval
        self.samples: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._start = time.monotonic()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic() - self._start
            for name, pid in self.pids.items():
                try:
                    self.samples[name].append((round(now, 1), rss_bytes(pid)))
                except OSError:
                    continue
            self._stop.wait(self.interval)

    def peak(self, name: str) -> int:
        """Largest sampled RSS of one process."""
        return max((rss for _t, rss in self.samples[name]), default=0)
