"""Startup at scale: the operator with 10,000 tasks, a receiver with a 100,000-record spool.

**Operator.** 10,000 tasks are put into ``Submitted`` (the status the operator writes after
``in.php``) while no operator runs, and left until every one is past its callback timeout, so
all of them are due for a fallback poll. Then the operator starts (as a process, like a pod
does, or like a standby taking over: it lists every task, builds its index and schedules the
due polls) and the figure is the time from launching it to the solver's first ``res.php``
request, and to the last of the 10,000 tasks polled (read from the solver's own counters).

**Standby takeover.** Two operator replicas with kopf peering, as the chart's HA mode runs
them: the active one is SIGKILLed (a node lost), then the 10,000 tasks are put into
``Submitted`` while the standby waits for the dead replica's peering record to expire (its
``--peering-lifetime``, long enough here to cover the preparation, so nobody is active while
the tasks are written), and the figure is the time from the dead replica's peering record
expiring (its ``lastseen`` + lifetime, the earliest a standby may take over) to the standby's
first ``res.php`` request: kopf noticing, the engine listing every task, scheduling the due
polls. Kill to expiry is the peering lifetime, a setting.

**Receiver.** A spool of 100,000 acknowledged results is written in the receiver's own format
(:mod:`captchatask_sidecar.spoolformat`, one segment, as an outage leaves it) and replayed:
``Spool.open()`` on its own in a fresh process (read, check and index every record), and the
receiver process from launch until its ``/metrics`` reports all 100,000 pending (it serves
pingbacks from then on while its drainer applies the backlog at the API server's pace).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Final

from bench import cluster
from bench.profiles import Profile
from captchatask import testbed
from captchatask.decision import Result
from captchatask.model import DeliveredBy, TaskRef
from captchatask.stack import OPERATOR_IMAGE_ENV, Stack, StackConfig
from captchatask.testbed.processes import ManagedProcess
from captchatask_sidecar.spool import SEGMENT_PREFIX, SEGMENT_SUFFIX
from captchatask_sidecar.spoolformat import SpoolRecord, frame

NAMESPACE: Final = "startup"
SIZES: Final = {"full": (10_000, 100_000), "small": (200, 2_000)}
"""Per profile: tasks for the operator, records for the receiver's spool."""
PEERING_LIFETIMES: Final = {"full": 240, "small": 15}
"""Per profile: the replicas' ``--peering-lifetime``; it must outlast preparing the tasks."""
PEERING: Final = "captchatask"
PEERING_CRD: Final = (
    Path(__file__).resolve().parents[1] / "operator" / "captchatask_operator" / "peering-crd.yaml"
)
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


def _polling_stack(workdir: Path, say: Say) -> Stack:
    """A stack whose tasks are due for a fallback poll CALLBACK_TIMEOUT_SECONDS after submission."""
    config = StackConfig(
        workdir=workdir,
        namespace=NAMESPACE,
        provider_spec={
            "polling": {"callbackTimeoutSeconds": CALLBACK_TIMEOUT_SECONDS, "intervalSeconds": 30}
        },
    )
    return Stack(config, progress=say)


def operator_first_poll(tasks: int, workdir: Path, say: Say) -> dict[str, float | int | None]:
    """Seconds from launching the operator to its first and its last fallback poll."""
    stack = _polling_stack(workdir / "operator", say)
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


def _readiness(port: int) -> dict[str, object] | None:
    """An operator replica's ``/readyz`` body (``None`` while it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as reply:
            body: dict[str, object] = json.loads(reply.read())
    except urllib.error.HTTPError as exc:  # 503 while not ready still carries the body
        body = json.loads(exc.read() or b"{}")
    except (OSError, ValueError):
        return None
    return body


def _replica(
    stack: Stack, name: str, *, priority: int, lifetime: int
) -> tuple[ManagedProcess, int]:
    """Start one operator replica with kopf peering, as the chart's HA mode does; its port."""
    port = testbed.free_ports(1)[0]
    argv = [arg for arg in stack.argv("operator") if arg != "--standalone"]
    argv[argv.index("--admin-port") + 1] = str(port)
    argv += ["--peering", PEERING, "--peering-priority", str(priority)]
    argv += ["--peering-lifetime", str(lifetime)]
    process = ManagedProcess.launch(
        name=name,
        argv=argv,
        log=stack.workdir / "logs" / f"{name}.log",
        marker=str(stack.workdir),
        env=stack.env() | OPERATOR_IMAGE_ENV,
    )
    return process, port


def _record_expiry(stack: Stack, *, priority: int) -> float:
    """When the peering record of the replica with ``priority`` expires (epoch seconds).

    kopf keeps ``lastseen`` and ``lifetime`` per peer in the peering object; a standby may take
    over once the higher-priority peer's record is older than its lifetime.
    """
    body = stack.get_json("kopfpeering", PEERING)
    for record in (body.get("status") or {}).values():
        if isinstance(record, dict) and record.get("priority") == priority:
            lastseen = dt.datetime.fromisoformat(str(record["lastseen"]))
            return lastseen.timestamp() + float(record["lifetime"])
    raise RuntimeError(f"no peering record with priority {priority}: {body.get('status')}")


def _wait_role(process: ManagedProcess, port: int, *, active: bool) -> float:
    """Wait until a replica reports the role; the monotonic time it was first seen."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited\n{process.log_tail()}")
        body = _readiness(port)
        if body is not None and body.get("started") and body.get("active") is active:
            return time.monotonic()
        time.sleep(SURVEY_SECONDS)
    raise RuntimeError(f"{process.name} never became {'active' if active else 'standby'}")


def standby_takeover(
    tasks: int, lifetime: int, workdir: Path, say: Say
) -> dict[str, float | int | None]:
    """Seconds from a standby's takeover (and from the active replica's death) to its first poll."""
    stack = _polling_stack(workdir / "takeover", say)
    replicas: list[ManagedProcess] = []
    try:
        stack.start()
        stack.kill("operator")
        stack.plane.kubectl("apply", "-f", str(PEERING_CRD))
        stack.plane.kubectl(
            "wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev", "--timeout=60s"
        )
        stack.apply(
            [{"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}}]
        )
        active, active_port = _replica(stack, "operator-a", priority=200, lifetime=lifetime)
        replicas.append(active)
        _wait_role(active, active_port, active=True)
        standby, standby_port = _replica(stack, "operator-b", priority=100, lifetime=lifetime)
        replicas.append(standby)
        _wait_role(standby, standby_port, active=False)
        active.signal(signal.SIGKILL)
        killed, killed_at = time.monotonic(), time.time()
        expires = killed + _record_expiry(stack, priority=200) - killed_at
        say(
            f"startup: active replica killed; preparing {tasks} Submitted tasks while the "
            f"standby waits out the {lifetime} s peering lifetime"
        )

        async def prepare() -> None:
            async with cluster.kube_session(stack) as client:
                await cluster.create_submitted_tasks(
                    client, NAMESPACE, prefix="tk", count=tasks, first_id=8_000_000_000
                )

        asyncio.run(prepare())
        prepared = time.monotonic() - killed
        body = _readiness(standby_port) or {}
        if body.get("active"):
            raise RuntimeError(
                f"the standby took over after {prepared:.0f} s, before the tasks were prepared: "
                "raise PEERING_LIFETIMES"
            )
        before = _res_requests(stack)
        took_over = _wait_role(standby, standby_port, active=True)
        first = None
        deadline = took_over + WAIT_SECONDS
        while time.monotonic() < deadline:
            if _res_requests(stack) > before:
                first = time.monotonic()
                break
            time.sleep(SURVEY_SECONDS)
        return {
            "tasks": tasks,
            "peering_lifetime_s": lifetime,
            "prepare_s": round(prepared, 1),
            "kill_to_record_expiry_s": round(expires - killed, 2),
            "kill_to_takeover_s": round(took_over - killed, 2),
            # From the dead replica's peering record expiring (the earliest a standby may take
            # over) to the standby's first poll: kopf noticing, the engine listing every task
            # and scheduling the due polls.
            "takeover_to_first_poll_s": None if first is None else round(first - expires, 2),
            "kill_to_first_poll_s": None if first is None else round(first - killed, 2),
        }
    finally:
        for process in replicas:
            with contextlib.suppress(testbed.ControlPlaneError):
                process.terminate()
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
    lifetime = PEERING_LIFETIMES.get(profile.name, PEERING_LIFETIMES["small"])
    out["takeover"] = standby_takeover(tasks, lifetime, workdir, say)
    say(f"  standby takeover: {out['takeover']}")
    return out
