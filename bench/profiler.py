"""Where a component's time goes: ``py-spy`` sampling of a running process, summarised.

``py-spy record --nonblocking`` samples the target's Python stacks from outside (it never pauses
the process), pinned to the load core, so the profile costs the server nothing measurable. The
collapsed stacks are reduced to inclusive and self percentages per function, which is what a miss
in the results is explained with. ``py-spy`` is optional: without it the profile is reported as
unavailable and the figures are unaffected.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Final

from bench.cores import LOAD_CORE, pinned

SAMPLE_RATE: Final = 50
#: Functions listed per profile summary.
TOP: Final = 25
#: Frames in at least this share of busy samples are the trunk, not a finding.
TRUNK_SHARE: Final = 0.9
#: Idle frames: time the event loop spent waiting, shown separately from work.
IDLE_FRAMES: Final = ("select (selectors.py)", "_worker (thread.py)")


def _executable() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    """Sample one process for at most ``seconds`` into ``out`` (collapsed stacks).

    Use as a context manager around the work to profile; leaving it stops sampling.
    """

    def __init__(self, pid: int, out: Path, *, seconds: float) -> None:
        self.pid = pid
        self.out = out
        self.seconds = seconds
        self._process: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self._wall = 0.0

    def __enter__(self) -> Profiler:
        exe = _executable()
        if exe is None:
            return self
        argv = [
            exe, "record", "--nonblocking", "-p", str(self.pid), "-f", "raw",
            "-r", str(SAMPLE_RATE), "-d", str(max(1, round(self.seconds))), "-o", str(self.out),
        ]  # fmt: skip
        self._started = time.monotonic()
        self._process = subprocess.Popen(
            pinned(LOAD_CORE, argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._process is None:
            return
        self._wall = min(time.monotonic() - self._started, self.seconds)
        # SIGINT makes py-spy write what it has so far (SIGTERM would lose it).
        self._process.send_signal(2)
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def summary(self) -> dict[str, Any]:
        """Inclusive/self percentages of the busiest functions (or why there are none)."""
        if self._process is None:
            return {"available": False, "reason": "py-spy not installed"}
        if not self.out.exists():
            return {"available": False, "reason": "py-spy wrote no samples"}
        found = summarise(self.out.read_text(encoding="utf-8"))
        if found.get("available") and self._wall > 0:
            # py-spy records only non-idle samples: their share of all possible samples is how
            # busy the process was (its main thread, which does all the work here).
            found["wall_seconds"] = round(self._wall, 1)
            found["busy_fraction_of_wall"] = round(found["samples"] / (SAMPLE_RATE * self._wall), 2)
        return found


def _frame_key(frame: str) -> str:
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    file = where.split(":")[0].rstrip(")").split("/")[-1]
    return f"{name} ({file})"


def summarise(collapsed: str, *, top: int = TOP) -> dict[str, Any]:
    """Reduce py-spy's collapsed stacks to the top functions by inclusive and self time."""
    total = 0
    idle = 0
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _sep, count_text = line.strip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_key(frame) for frame in stack.split(";")]
        total += count
        if frames[-1].endswith(IDLE_FRAMES):
            idle += count
            continue
        own[frames[-1]] += count
        for key in set(frames):
            inclusive[key] += count
    if total == 0:
        return {"available": False, "reason": "no samples"}
    busy = total - idle

    def pct(value: int) -> float:
        return round(100.0 * value / total, 1)

    # The trunk (runpy, main, the event loop) is in every busy sample and says nothing.
    branches = [(k, v) for k, v in inclusive.most_common() if v < TRUNK_SHARE * busy]
    return {
        "available": True,
        "samples": total,
        "busy_pct": pct(busy),
        "idle_pct": pct(idle),
        "inclusive_pct": [[key, pct(value)] for key, value in branches[:top]],
        "self_pct": [[key, pct(value)] for key, value in own.most_common(top)],
    }
