"""Many tasks in flight on the real control plane, every pingback dropped.

One :class:`~captchatask.stack.Stack` with the emulator's rate limits off (the default), a thread
cap far above the task count, long solve times (the tasks stay in flight) and a pingback drop
rate of 1, so every result must come from the operator's fallback polling. The benchmark creates
all tasks at once (as fast as the API server takes them) and measures:

* time to submit all: from the first create to the last ``submittedAt``;
* operator and sidecar peak RSS (``VmHWM``), sampled RSS over time;
* operator CPU-seconds per 1,000 tasks (``/proc``, whole run: submit, poll, record);
* recovery: per task ``finishedAt - (submittedAt + callbackTimeoutSeconds)`` and the time from
  the last task's callback deadline until the last task was Solved;
* etcd bytes per finished task: growth of ``etcd_mvcc_db_total_size_in_bytes`` per task, as
  written (with the MVCC history of every status write) and after compaction + defragmentation
  (the steady state that sizing should use);
* API-server requests per task and their server-side latency (its own ``/metrics``), and a
  ``py-spy`` profile of the operator during submission: where the time goes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from bench import cluster, procstat, profiler
from bench.loadgen import percentile
from bench.profiles import Profile
from captchatask import kube, model
from captchatask.stack import Stack, StackConfig

NAMESPACE: Final = "scale"
#: Far above any task count: the solver's thread cap is not what is measured.
EMULATOR_THREADS: Final = "1000000"
SURVEY_PERIOD_SECONDS: Final = 1.0
#: Give up this long after the expected end (a stuck run still reports what it saw).
GRACE_SECONDS: Final = 240.0
#: Longest operator profile (py-spy), taken from the start of submission.
PROFILE_SECONDS: Final = 60.0
TERMINAL: Final = ("Solved", "Failed")
IN_FLIGHT: Final = ("Pending", "Queued", "Submitted")
#: Where a finished task's bytes live in etcd: the object itself and the Events about it.
ETCD_PREFIXES: Final = {
    "captchatasks": f"/registry/{model.GROUP}/captchatasks/{NAMESPACE}/",
    "events": f"/registry/events/{NAMESPACE}/",
}

Say = Callable[[str], None]


def _phases(stack: Stack) -> dict[str, float]:
    samples = cluster.scrape(stack.operator_metrics_url)
    out: dict[str, float] = {}
    for (name, labels), value in samples.items():
        if name == "captchatask_tasks":
            phase = dict(labels).get("phase", "?")
            out[phase] = out.get(phase, 0.0) + value
    return out


def _apiserver_requests(samples: cluster.Samples) -> dict[str, tuple[float, float]]:
    """(verb resource/subresource) -> (count, seconds) from apiserver_request_duration_seconds."""
    out: dict[str, tuple[float, float]] = {}
    for (name, labels), value in samples.items():
        if name not in (
            "apiserver_request_duration_seconds_count",
            "apiserver_request_duration_seconds_sum",
        ):
            continue
        tags = dict(labels)
        if tags.get("verb") in ("WATCH", "CONNECT"):
            continue
        key = f"{tags.get('verb')} {tags.get('resource')}"
        if tags.get("subresource"):
            key += "/" + tags["subresource"]
        count, seconds = out.get(key, (0.0, 0.0))
        if name.endswith("_count"):
            count += value
        else:
            seconds += value
        out[key] = (count, seconds)
    return out


def _api_delta(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], tasks: int
) -> list[dict[str, Any]]:
    rows = []
    for key, (count, seconds) in after.items():
        c0, s0 = before.get(key, (0.0, 0.0))
        calls = count - c0
        if calls < 1:
            continue
        rows.append(
            {
                "request": key,
                "calls": int(calls),
                "per_task": round(calls / tasks, 2),
                "mean_ms": round((seconds - s0) / calls * 1e3, 2),
            }
        )
    return sorted(rows, key=lambda row: -row["calls"])


async def _create(stack: Stack, count: int) -> float:
    """Create the tasks as fast as the API server takes them; return the seconds it took."""
    started = time.monotonic()
    async with cluster.kube_session(stack) as client:
        await cluster.bounded(
            client.create(kube.TASKS, NAMESPACE, cluster.task_body(f"s-{index:05d}"))
            for index in range(count)
        )
    return time.monotonic() - started


async def _list(stack: Stack) -> list[dict[str, Any]]:
    async with cluster.kube_session(stack) as client:
        listing = await client.list(kube.TASKS, NAMESPACE, timeout=300)
    items: list[dict[str, Any]] = listing["items"]
    return items


def _recovery(items: list[dict[str, Any]], timeout: int, created_at: float) -> dict[str, Any]:
    lateness: list[float] = []
    submitted: list[float] = []
    finished: list[float] = []
    delivered: dict[str, int] = {}
    for item in items:
        status = item.get("status") or {}
        by = str(status.get("deliveredBy") or status.get("phase") or "unfinished")
        delivered[by] = delivered.get(by, 0) + 1
        sub = model.parse_time(status.get("submittedAt"))
        fin = model.parse_time(status.get("finishedAt"))
        if sub is not None:
            submitted.append(sub.timestamp())
        if sub is not None and fin is not None and by == "poll":
            finished.append(fin.timestamp())
            lateness.append(fin.timestamp() - sub.timestamp() - timeout)
    last_deadline = max(submitted) + timeout if submitted else float("nan")
    return {
        "delivered_by": delivered,
        "submit_all_seconds": round(max(submitted) - created_at, 1) if submitted else None,
        "submit_rate_per_second": (
            round(len(submitted) / (max(submitted) - created_at), 1) if submitted else None
        ),
        "lateness_p50_s": percentile(lateness, 0.50),
        "lateness_p99_s": percentile(lateness, 0.99),
        "lateness_max_s": max(lateness) if lateness else float("nan"),
        "recover_all_after_last_deadline_s": (
            round(max(finished) - last_deadline, 2) if finished else None
        ),
        "first_create_to_all_solved_s": (
            round(max(finished) - created_at, 1) if finished else None
        ),
    }


def _task_bytes(items: list[dict[str, Any]]) -> float:
    """Mean JSON size of a finished task as stored (managedFields included, as etcd has it)."""
    sizes = [len(json.dumps(item, separators=(",", ":"))) for item in items]
    return sum(sizes) / len(sizes) if sizes else float("nan")


def run(profile: Profile, workdir: Path, say: Say) -> dict[str, Any]:
    """Item 4."""
    workdir.mkdir(parents=True, exist_ok=True)
    n = profile.scale_tasks
    timeout = profile.scale_callback_timeout
    low, high = profile.scale_solve_seconds
    config = StackConfig(
        workdir=workdir / "stack",
        namespace=NAMESPACE,
        emulator_args=[
            *("--threads", EMULATOR_THREADS),
            *("--solve-time", f"turnstile={low:g}:{high:g}"),
            *("--pingback-drop-rate", "1"),
        ],
        provider_spec={"polling": {"callbackTimeoutSeconds": timeout, "intervalSeconds": 30}},
    )
    stack = Stack(config, progress=say)
    out: dict[str, Any] = {
        "tasks": n,
        "callback_timeout_s": timeout,
        "solve_seconds": [low, high],
    }
    try:
        stack.start()  # inside: a component failing to start still stops the rest
        out["versions"] = cluster.versions(stack)
        operator_pid = stack.processes["operator"].pid
        sidecar_pid = stack.processes["sidecar"].pid
        # Start from a compacted database, so before and after are measured alike.
        cluster.etcd_compact_and_defragment(stack)
        etcd_before = cluster.etcd_sizes(stack)
        api_before = _apiserver_requests(cluster.apiserver_metrics(stack))
        cpu_before = procstat.cpu_seconds(operator_pid)
        sidecar_cpu_before = procstat.cpu_seconds(sidecar_pid)
        pids = {"operator": operator_pid, "sidecar": sidecar_pid}
        spy = profiler.Profiler(
            operator_pid, workdir / "operator-submit.pyspy", seconds=PROFILE_SECONDS
        )
        say(f"scale: creating {n} tasks (callback timeout {timeout}s, every pingback dropped)")
        created_at = time.time()
        peak_in_flight = 0.0
        peak_submitted = 0.0
        timeline: list[list[float]] = []
        with procstat.RssSampler(pids) as sampler, spy:
            out["create_seconds"] = round(asyncio.run(_create(stack, n)), 2)
            say(f"  created in {out['create_seconds']}s; waiting for submission and recovery")
            expected_end = time.monotonic() + n / 20 + timeout + high + GRACE_SECONDS
            last_report = 0.0
            while True:
                phases = _phases(stack)
                in_flight = sum(phases.get(phase, 0.0) for phase in IN_FLIGHT)
                done = sum(phases.get(phase, 0.0) for phase in TERMINAL)
                peak_in_flight = max(peak_in_flight, in_flight)
                peak_submitted = max(peak_submitted, phases.get("Submitted", 0.0))
                elapsed = time.time() - created_at
                timeline.append([round(elapsed, 1), phases.get("Submitted", 0.0), in_flight, done])
                if time.monotonic() - last_report > 15:
                    last_report = time.monotonic()
                    say(
                        f"  t={elapsed:4.0f}s submitted={phases.get('Submitted', 0):.0f} "
                        f"in flight={in_flight:.0f} done={done:.0f} "
                        f"operator RSS={procstat.rss_bytes(operator_pid) / 2**20:.0f} MiB"
                    )
                if done >= n or time.monotonic() > expected_end:
                    break
                time.sleep(SURVEY_PERIOD_SECONDS)
        out["profile_operator_submit"] = spy.summary()
        cpu = procstat.cpu_seconds(operator_pid) - cpu_before
        out["operator_cpu_seconds"] = round(cpu, 1)
        out["operator_cpu_seconds_per_1000"] = round(cpu / n * 1000, 2)
        out["sidecar_cpu_seconds"] = round(
            procstat.cpu_seconds(sidecar_pid) - sidecar_cpu_before, 1
        )
        out["operator_peak_rss_bytes"] = procstat.peak_rss_bytes(operator_pid)
        out["sidecar_peak_rss_bytes"] = procstat.peak_rss_bytes(sidecar_pid)
        out["operator_rss_samples"] = sampler.samples["operator"][:: max(1, len(timeline) // 60)]
        out["peak_in_flight"] = peak_in_flight
        out["peak_submitted"] = peak_submitted
        out["timeline"] = timeline[:: max(1, len(timeline) // 120)]
        api_after = _apiserver_requests(cluster.apiserver_metrics(stack))
        out["apiserver_requests"] = _api_delta(api_before, api_after, n)
        say("  reading every task")
        items = asyncio.run(_list(stack))
        out["listed"] = len(items)
        out |= _recovery(items, timeout, created_at)
        out["task_json_bytes"] = round(_task_bytes(items))
        etcd_after = cluster.etcd_sizes(stack)
        out["etcd_objects"] = {
            kind: cluster.etcd_prefix_bytes(stack, prefix) for kind, prefix in ETCD_PREFIXES.items()
        }
        out["compacted"] = cluster.etcd_compact_and_defragment(stack)
        etcd_compacted = cluster.etcd_sizes(stack)
        out["etcd"] = {
            "before": etcd_before,
            "after": etcd_after,
            "after_compaction": etcd_compacted,
            "bytes_per_task_as_written": round(
                (etcd_after["db_total_bytes"] - etcd_before["db_total_bytes"]) / n
            ),
            "bytes_per_task_compacted": round(
                (etcd_compacted["db_total_bytes"] - etcd_before["db_total_bytes"]) / n
            ),
        }
    finally:
        stack.stop()
    return out
