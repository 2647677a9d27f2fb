"""What one task costs the API server: writes by kind and bytes in etcd, by delivery path.

Four runs of the whole system (each its own :class:`~captchatask.stack.Stack`): every result by
pingback, then every pingback dropped so every result comes from the operator's fallback poll;
each once with the defaults and once as before them (``--routine-events
--no-strip-managed-fields``: the ``Submitted``/``Solved`` Events posted, managedFields kept).

Per finished task, from the API server's own ``apiserver_request_duration_seconds_count`` and
from etcd:

* writes: ``POST captchatasks`` (the app's create), ``PATCH captchatasks`` (the operator's read
  that drops managedFields), ``PATCH captchatasks/status`` (the ledger's compare-and-set writes),
  ``POST events``; and the reads (``GET captchatasks``) beside them;
* bytes: etcd's database growth per task after compaction + defragmentation (the steady state)
  and as written (with the MVCC history), the current values under the tasks' and the Events'
  key prefixes, and the task's JSON as the API server returns it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from bench import cluster
from bench.profiles import Profile
from captchatask import kube, model
from captchatask.stack import Stack, StackConfig

NAMESPACE: Final = "writes"
SIZES: Final = {"full": 1000, "small": 30}
"""Tasks per run, per profile."""
CALLBACK_TIMEOUT_SECONDS: Final = 3
#: Far above any task count: the solver's thread cap (ERROR_NO_SLOT_AVAILABLE, then retries
#: with their own writes and Warning Events) is not what is measured.
EMULATOR_THREADS: Final = "1000000"
SOLVE_SECONDS: Final = "1:2"
#: The operator's Event queue is posted by one background task: give it this long to finish.
EVENT_SETTLE_SECONDS: Final = 3.0
WAIT_SECONDS: Final = 300.0
BEFORE_FLAGS: Final = ("--routine-events", "--no-strip-managed-fields")
RUNS: Final = (
    ("pingback", 0.0, ()),
    ("poll", 1.0, ()),
    ("pingback_before", 0.0, BEFORE_FLAGS),
    ("poll_before", 1.0, BEFORE_FLAGS),
)
#: The requests reported per task (verb resource[/subresource]); writes first.
REQUESTS: Final = (
    "POST captchatasks",
    "PATCH captchatasks",
    "PATCH captchatasks/status",
    "POST events",
    "GET captchatasks",
)
WRITES: Final = REQUESTS[:4]
ETCD_PREFIXES: Final = {
    "captchatasks": f"/registry/{model.GROUP}/captchatasks/{NAMESPACE}/",
    "events": f"/registry/events/{NAMESPACE}/",
}

Say = Callable[[str], None]


def _requests(stack: Stack) -> dict[str, float]:
    out: dict[str, float] = {}
    for (name, labels), value in cluster.apiserver_metrics(stack).items():
        if name != "apiserver_request_duration_seconds_count":
            continue
        tags = dict(labels)
        key = f"{tags.get('verb')} {tags.get('resource')}"
        if tags.get("subresource"):
            key += "/" + tags["subresource"]
        out[key] = out.get(key, 0.0) + value
    return out


async def _create(stack: Stack, count: int) -> None:
    async with cluster.kube_session(stack) as client:
        await cluster.bounded(
            client.create(kube.TASKS, NAMESPACE, cluster.task_body(f"w-{index:05d}"))
            for index in range(count)
        )


async def _finished(stack: Stack) -> list[dict[str, Any]]:
    async with cluster.kube_session(stack) as client:
        items: list[dict[str, Any]] = (await client.list(kube.TASKS, NAMESPACE, timeout=120))[
            "items"
        ]
    return items


def _one(
    name: str, drop: float, flags: tuple[str, ...], tasks: int, workdir: Path, say: Say
) -> dict[str, Any]:
    config = StackConfig(
        workdir=workdir / name,
        namespace=NAMESPACE,
        emulator_args=[
            *("--threads", EMULATOR_THREADS),
            *("--solve-time", f"turnstile={SOLVE_SECONDS}"),
            *("--pingback-drop-rate", f"{drop:g}"),
        ],
        operator_args=flags,
        provider_spec={
            "polling": {"callbackTimeoutSeconds": CALLBACK_TIMEOUT_SECONDS, "intervalSeconds": 5}
        },
    )
    stack = Stack(config, progress=say)
    try:
        stack.start()
        cluster.etcd_compact_and_defragment(stack)
        etcd_before = cluster.etcd_sizes(stack)
        before = _requests(stack)
        say(f"writes/{name}: {tasks} tasks, pingback drop rate {drop:g}, flags {list(flags)}")
        asyncio.run(_create(stack, tasks))
        deadline = time.monotonic() + WAIT_SECONDS
        items: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            items = asyncio.run(_finished(stack))
            done = [
                i for i in items if (i.get("status") or {}).get("phase") in ("Solved", "Failed")
            ]
            if len(done) >= tasks:
                break
            time.sleep(1.0)
        time.sleep(EVENT_SETTLE_SECONDS)
        after = _requests(stack)
        delivered: dict[str, int] = {}
        for item in items:
            by = str((item.get("status") or {}).get("deliveredBy") or "unfinished")
            delivered[by] = delivered.get(by, 0) + 1
        per_task = {
            key: round((after.get(key, 0.0) - before.get(key, 0.0)) / tasks, 3) for key in REQUESTS
        }
        etcd_after = cluster.etcd_sizes(stack)
        objects = {
            kind: cluster.etcd_prefix_bytes(stack, prefix) for kind, prefix in ETCD_PREFIXES.items()
        }
        cluster.etcd_compact_and_defragment(stack)
        etcd_compacted = cluster.etcd_sizes(stack)
        sizes = [len(json.dumps(item, separators=(",", ":"))) for item in items]
        return {
            "tasks": tasks,
            "flags": list(flags),
            "delivered_by": delivered,
            "per_task": per_task,
            "writes_per_task": round(sum(per_task[key] for key in WRITES), 3),
            "task_json_bytes": round(sum(sizes) / len(sizes)) if sizes else None,
            "etcd_values_per_task": {
                kind: round(value["value_bytes"] / tasks) for kind, value in objects.items()
            },
            "events_per_task": round(objects["events"]["keys"] / tasks, 3),
            "bytes_per_task_as_written": round(
                (etcd_after["db_total_bytes"] - etcd_before["db_total_bytes"]) / tasks
            ),
            "bytes_per_task_compacted": round(
                (etcd_compacted["db_total_bytes"] - etcd_before["db_total_bytes"]) / tasks
            ),
        }
    finally:
        stack.stop()


def run(profile: Profile, workdir: Path, say: Say) -> dict[str, Any]:
    """The writes-per-task rows: each delivery path, now and as before."""
    tasks = SIZES.get(profile.name, SIZES["small"])
    workdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    # The small profile (inside ``make test``) checks that the phase runs: the two rows of
    # today's behaviour; the flags of the "as before" rows have tests of their own.
    runs = RUNS if profile.name == "full" else RUNS[:2]
    for name, drop, flags in runs:
        out[name] = _one(name, drop, flags, tasks, workdir, say)
        row = out[name]
        say(
            f"  {row['writes_per_task']} writes/task {row['per_task']}; "
            f"{row['bytes_per_task_compacted']:,} B/task compacted, task {row['task_json_bytes']} B"
        )
    return out
