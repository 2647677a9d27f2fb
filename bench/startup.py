"""Startup at scale: the operator with 10,000 tasks, a receiver with a 100,000-record spool.

**Operator.** 10,000 tasks are put into ``Submitted`` (the status the operator writes after
``in.php``) while no operator runs, and left until every one is past its callback timeout, so
all of them are due for a fallback poll. Then the operator starts (as a process, like a pod
does, or like a standby taking over: it lists every task, builds its index and schedules the
due polls) and the figure is the time from launching it to the solver's first ``res.php``
request, and to the last of the 10,000 tasks polled (read from the solver's own counters).

**Receiver.** A spool of 100,000 acknowledged results is written in the receiver's own format
(:mod:`captchatask_sidecar.spoolformat`, one segment, as an outage leaves it) and replayed:
``Spool.open()`` on its own in a fresh process (read, check and index every record), and the
receiver process from launch until its ``/metrics`` reports all 100,000 pending (it serves
pingbacks from then on while its drainer applies the backlog at the API server's pace).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Final

from bench import cluster
from bench.profiles import Profile
from captchatask.decision import Result
from captchatask.model import DeliveredBy, TaskRef
from captchatask.stack import Stack, StackConfig
from captchatask_sidecar.spool import SEGMENT_PREFIX, SEGMENT_SUFFIX
from captchatask_sidecar.spoolformat import SpoolRecord, frame

NAMESPACE: Final = "startup"
SIZES: Final = {"full": (10_000, 100_000), "small": (200, 2_000)}
"""Per profile: tasks for the operator, records for the receiver's spool."""
CALLBACK_TIMEOUT_SECONDS: Final = 5
TOKEN: Final = "03AFcWeA" + "x7Kq2mZ" * 60
#: How often the solver's counters are read while waiting for the polls.
SURVEY_SECONDS: Final = 0.05
WAIT_SECONDS: Final = 300.0
_OPEN_SCRIPT: Final = """
import json, sys, time
from pathlib import Path
from captchatask_sidecar.spool import Spool
started = time.perf_counter()
replayed = Spool(Path(sys.argv[1])).open()
print(json.dumps({"replayed": replayed, "seconds": time.perf_counter() - started}))
"""

Say = Callable[[str], None]


def _res_requests(stack: Stack) -> int:
    return int(stack.emulator("summary")["totals"].get("res_requests", 0))


def _polled(stack: Stack) -> float:
    samples = cluster.scrape(stack.operator_metrics_url)
    return sum(
        value for (name, _), value in samples.items() if name == "captchatask_fallback_polls_total"
    )


def operator_first_poll(tasks: int, workdir: Path, say: Say) -> dict[str, float | int | None]:
    """Seconds from launching the operator to its first and its last fallback poll."""
    config = StackConfig(
        workdir=workdir / "operator",
        namespace=NAMESPACE,
        provider_spec={
            "polling": {"callbackTimeoutSeconds": CALLBACK_TIMEOUT_SECONDS, "intervalSeconds": 30}
        },
    )
    stack = Stack(config, progress=say)
    try:
        stack.start()
        stack.kill("operator")
        say(f"startup: preparing {tasks} Submitted tasks with no operator running")

        async def prepare() -> None:
            async with cluster.kube_session(stack) as client:
                await cluster.create_submitted_tasks(
                    client, NAMESPACE, prefix="st", count=tasks, first_id=7_000_000_000
                )

        asyncio.run(prepare())
        time.sleep(CALLBACK_TIMEOUT_SECONDS + 1)  # every task is now due
        before = _res_requests(stack)
        launched = time.monotonic()
        stack.start_component("operator")
        healthy = time.monotonic() - launched
        first = last = None
        deadline = launched + WAIT_SECONDS
        while time.monotonic() < deadline:
            if first is None and _res_requests(stack) > before:
                first = time.monotonic() - launched
            if first is not None and _polled(stack) >= tasks:
                last = time.monotonic() - launched
                break
            time.sleep(SURVEY_SECONDS)
        return {
            "tasks": tasks,
            "healthy_s": round(healthy, 2),
            "first_poll_s": None if first is None else round(first, 2),
            "all_polled_s": None if last is None else round(last, 2),
        }
    finally:
        stack.stop()


def _write_spool(directory: Path, records: int) -> int:
    """One segment of ``records`` results in the receiver's format; its size in bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    chunks = []
    for index in range(records):
        record = SpoolRecord(
            ref=TaskRef(NAMESPACE, f"task-{index:06d}", str(uuid.uuid4())),
            result=Result.solved(
                token=TOKEN,
                delivered_by=DeliveredBy.PINGBACK,
                provider_task_id=str(6_000_000_000 + index),
            ),
            received_at=now,
            received_by="receiver-0",
            source="pingback",
        )
        chunks.append(frame(record.encode()))
    data = b"".join(chunks)
    (directory / f"{SEGMENT_PREFIX}{1:012d}{SEGMENT_SUFFIX}").write_bytes(data)
    return len(data)


def _spool_depth(stack: Stack) -> float:
    return cluster.metric_sum(
        cluster.scrape(stack.sidecar_metrics_url), "captchatask_pingback_spool_depth"
    )


def receiver_replay(records: int, workdir: Path, say: Say) -> dict[str, float | int | None]:
    """Seconds to replay a spool of ``records``: ``Spool.open()`` alone, then the process."""
    say(f"startup: writing a {records}-record spool")
    scratch = workdir / "spool-open"
    size = _write_spool(scratch, records)
    done = subprocess.run(
        [sys.executable, "-c", _OPEN_SCRIPT, str(scratch)],
        capture_output=True,
        text=True,
        check=True,
        timeout=WAIT_SECONDS,
    )
    opened = json.loads(done.stdout)
    config = StackConfig(workdir=workdir / "receiver", namespace=NAMESPACE)
    stack = Stack(config, progress=say)
    try:
        stack.start()
        stack.kill("operator")
        stack.kill("sidecar")
        _write_spool(stack.spool_dir, records)
        launched = time.monotonic()
        stack.start_component("sidecar")
        healthy = time.monotonic() - launched
        ready = None
        deadline = launched + WAIT_SECONDS
        while time.monotonic() < deadline:
            # The drainer starts at once: "replayed" is the depth having reached (most of) it.
            if _spool_depth(stack) > 0:
                ready = time.monotonic() - launched
                break
            time.sleep(SURVEY_SECONDS)
        stack.kill("sidecar")
    finally:
        stack.stop()
    return {
        "records": records,
        "spool_bytes": size,
        "open_s": round(float(opened["seconds"]), 2),
        "open_replayed": int(opened["replayed"]),
        "process_healthy_s": round(healthy, 2),
        "process_serving_backlog_s": None if ready is None else round(ready, 2),
    }


def run(profile: Profile, workdir: Path, say: Say) -> dict[str, object]:
    """Both startup rows."""
    tasks, records = SIZES.get(profile.name, SIZES["small"])
    workdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, object] = {"receiver": receiver_replay(records, workdir, say)}
    say(f"  receiver: {out['receiver']}")
    out["operator"] = operator_first_poll(tasks, workdir, say)
    say(f"  operator: {out['operator']}")
    return out
