"""Pingback ingestion and pingback -> app latency.

Servers measured, each pinned to the server core with wrk/the paced client on the other:

* **framework ceiling** — :mod:`bench.baselines.empty_aiohttp`;
* **seed baseline** — the tutorial's Flask handler (:mod:`bench.baselines.seed_flask`) on Flask's
  threaded dev server and under gunicorn ``gthread`` (one worker: "best single-process"); the
  faster of the two is the baseline;
* **ours, ledger path** — the sidecar of a real :class:`~captchatask.stack.Stack` in front of the
  real kube-apiserver; the requests go to tasks prepared in ``Submitted`` (one CAS PATCH per
  result); the closed-loop run repeats each task's pingback (wrk cycles through them), and its
  results are counted on both paths into the ledger: the pingback's own write and the spool's
  replay;
* **raw API-server ceiling** — :mod:`bench.ceiling`: a minimal aiohttp client, 64 in flight, one
  status JSON patch per task, against the same etcd + kube-apiserver; every ledger figure below is
  also given as a ratio to it. The same probe again with as many in flight as the receiver's
  drainer keeps (``--drain-concurrency``'s default) says what the API server gives a client of
  that depth, and the overload's ledger rate is held against both;
* **ours, overload** — twice that ceiling offered to the sidecar, open loop
  (:mod:`bench.loadgen`): the pingbacks' p99, their 5xx, and the rate at which the results reach
  the ledger (first pingback sent to the last result applied, pingback path and spool replays
  together) as a ratio of the ceiling;
* **ours, spool path** — the same sidecar with the API server frozen (``SIGSTOP``,
  ``stack.plane.pause()``): the first pingback waits out the 0.5 s ledger budget and opens the
  sidecar's circuit; from then on every pingback is appended to the spool and group-fsync'd
  before ``200`` (default settings: no budget tuning is needed).

The raw ceiling, the straight ledger client and the overload run measure the API server at its
limit: for them the control plane gets a core of its own and the sidecar, the load generator and
the probe clients share the other (:func:`at_the_limit`, :func:`bench.cores.pin_plane`);
``python -m bench.ingest --limit-only`` runs only those rows; ``--spool-only`` runs only the
framework ceiling and the spool path (their ratio and CPU per pingback, for spool-path work).

The operator is stopped for these runs: nothing but the sidecar and the control plane runs.
Pingback -> app: a long-poll ``GET /v1/tasks/{name}?wait=60`` is parked on the sidecar's local
API, then the pingback is sent; the figure is from sending the pingback to the long-poll's
answer (so it includes the pingback's own acknowledgement).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp

from bench import ceiling, cluster, cores, procstat, profiler, rounds, wrk
from bench.loadgen import percentile
from bench.profiles import PROFILES, Profile
from captchatask import kube
from captchatask.decision import Result
from captchatask.ledger import Ledger
from captchatask.model import DeliveredBy, TaskRef
from captchatask.signing import PingbackSigner, load_keys
from captchatask.stack import Stack, StackConfig
from captchatask.testbed import free_ports
from captchatask_sidecar.settings import DEFAULT_DRAIN_CONCURRENCY

NAMESPACE: Final = "bench"
#: A realistic token length (reCAPTCHA tokens are several hundred characters).
TOKEN: Final = "03AFcWeA" + "x7Kq2mZ" * 60
#: Parallel lanes of the pingback -> app measurement (light load, as in production).
LATENCY_LANES: Final = 4
#: Time for the long-poll to be registered before the pingback is sent.
LONG_POLL_SETTLE_SECONDS: Final = 0.05
SERVER_READY_TIMEOUT: Final = 30.0
#: Offered load of the overload run, in multiples of the raw API-server ceiling.
OVERLOAD_FACTOR: Final = 2.0
#: Overload tasks prepared before the ceiling, in multiples of the estimate (from the reference).
OVERLOAD_HEADROOM: Final = 1.25
#: Requests the paced load generator sends to warm its pool before the clock starts (its own).
LOADGEN_WARMUP: Final = 16
#: How often the results' arrival in the ledger is sampled (bounds the error of the rate).
APPLIED_POLL_SECONDS: Final = 0.05
#: Give up waiting for results to reach the ledger after this long without progress.
APPLIED_STALL_SECONDS: Final = 60.0
#: The closed-loop ledger run spools tens of thousands of pingbacks; the drainer needs minutes
#: for them on a slow machine.
SPOOL_DRAIN_PATIENCE_SECONDS: Final = 600.0
GUNICORN_THREADS: Final = 8

Say = Callable[[str], None]


def _wait_port(port: int, *, timeout: float = SERVER_READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


@contextlib.contextmanager
def _server(argv: Sequence[str], *, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as sink:
        process = subprocess.Popen(
            cores.pinned(cores.SERVER_CORE, argv), stdout=sink, stderr=subprocess.STDOUT
        )
        try:
            _wait_port(port)
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _pingback_like_paths(count: int) -> list[str]:
    """Paths shaped like ours (same length) for the servers that ignore them."""
    return [
        f"/v1/pingback/{NAMESPACE}/task-{i:05d}/00000000-0000-4000-8000-{i:012d}/"
        f"AAAAAAAAAAAAAAAAAAAAAAAA?id={7_000_000_000 + i}&code={TOKEN}"
        for i in range(count)
    ]


def baselines(
    profile: Profile, workdir: Path, say: Say, *, only: Sequence[str] | None = None
) -> dict[str, Any]:
    """Closed-loop wrk against the framework ceiling and the seed's Flask handler.

    ``only`` names the rows to run (``--spool-only`` needs just the framework ceiling).
    """
    out: dict[str, Any] = {}
    paths = wrk.write_paths(workdir / "ceiling.paths", _pingback_like_paths(20_000))
    seed_paths = wrk.write_paths(
        workdir / "seed.paths",
        [f"/callback?id={7_000_000_000 + i}&code={TOKEN}" for i in range(200_000)],
    )
    python = sys.executable
    runs: list[tuple[str, list[str], Path]] = [
        ("framework_ceiling", [python, "-m", "bench.baselines.empty_aiohttp", "--port"], paths),
        ("seed_flask_dev", [python, "-m", "bench.baselines.seed_flask", "--port"], seed_paths),
        (
            "seed_gunicorn_gthread",
            [
                str(Path(python).with_name("gunicorn")),
                "-w",
                "1",
                "-k",
                "gthread",
                "--threads",
                str(GUNICORN_THREADS),
                "--log-level",
                "warning",
                "-b",
            ],
            seed_paths,
        ),
    ]
    for name, argv, path_file in runs:
        if only is not None and name not in only:
            continue
        port = free_ports(1)[0]
        full = [*argv, f"127.0.0.1:{port}" if "gunicorn" in argv[0] else str(port)]
        if "gunicorn" in argv[0]:
            full.append("bench.baselines.seed_flask:app")
        say(f"ingestion: {name} (wrk, {profile.wrk_seconds:g}s)")
        with _server(full, port=port, log=workdir / f"{name}.log") as process:
            cpu_before = procstat.cpu_times(process.pid)
            result = wrk.run(
                f"http://127.0.0.1:{port}",
                path_file,
                seconds=profile.wrk_seconds,
                workdir=workdir,
            )
            cpu_after = procstat.cpu_times(process.pid)
        out[name] = result.as_json()
        if "gunicorn" not in argv[0]:  # gunicorn's worker is a child: its CPU is not the pid's
            out[name] |= _cpu_per_request(cpu_before, cpu_after, result.requests)
        say(f"  {result.requests_per_second:,.0f} req/s, p99 {result.p99_ms:.2f} ms")
    return out


def _cpu_per_request(
    before: tuple[float, float], after: tuple[float, float], requests: int
) -> dict[str, float | None]:
    """CPU microseconds per request (every thread of the server process), and the system part.

    ``/proc`` counts in clock ticks (10 ms): over a run of several seconds the error is a few
    tenths of a percent.
    """
    user, system = (end - start for start, end in zip(before, after, strict=True))
    if not requests:
        return {"cpu_us_per_request": None, "system_us_per_request": None}
    return {
        "cpu_us_per_request": round((user + system) / requests * 1e6, 1),
        "system_us_per_request": round(system / requests * 1e6, 1),
    }


def paced(
    base: str, paths_file: Path, *, rate: float, seconds: float, timeout_margin: float = 120.0
) -> dict[str, Any]:
    """Offer ``rate`` pingbacks/s for ``seconds`` (open loop, load-generator core); its result."""
    argv = [
        sys.executable, "-m", "bench.loadgen", "--base", base, "--paths", str(paths_file),
        "--rate", str(rate), "--seconds", str(seconds),
    ]  # fmt: skip
    done = subprocess.run(
        cores.pinned(cores.LOAD_CORE, argv),
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + timeout_margin,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def pingback_outcomes(stack: Stack) -> dict[str, float]:
    """The sidecar's pingback counters by outcome, scraped now."""
    samples = cluster.scrape(stack.sidecar_metrics_url)
    return {
        outcome: cluster.metric_sum(samples, "captchatask_pingbacks_total", outcome=outcome)
        for outcome in ("recorded", "duplicate", "late", "rejected", "spooled", "dead_lettered")
    }


def _applied(samples: cluster.Samples) -> float:
    """Results in the ledger by this sidecar: on the pingback path or replayed from the spool."""
    return cluster.metric_sum(
        samples, "captchatask_pingbacks_total", outcome="recorded"
    ) + cluster.metric_sum(samples, "captchatask_spool_replays_total", outcome="recorded")


def _replays(stack: Stack) -> dict[str, float]:
    """The drainer's replays by outcome, scraped now."""
    samples = cluster.scrape(stack.sidecar_metrics_url)
    return {
        outcome: cluster.metric_sum(samples, "captchatask_spool_replays_total", outcome=outcome)
        for outcome in ("recorded", "duplicate", "late", "dead_lettered", "retry")
    }


def _diverted(samples: cluster.Samples) -> dict[str, float]:
    return {
        reason: cluster.metric_sum(samples, "captchatask_ledger_diverted_total", reason=reason)
        for reason in ("limit", "backlog")
    }


def _wait_drained(stack: Stack, *, patience: float = APPLIED_STALL_SECONDS) -> None:
    """Wait until the sidecar's spool is empty (earlier runs' results all applied)."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        samples = cluster.scrape(stack.sidecar_metrics_url)
        if not cluster.metric_sum(samples, "captchatask_pingback_spool_depth"):
            return
        time.sleep(APPLIED_POLL_SECONDS)
    raise RuntimeError("the sidecar's spool did not drain")


def _wait_applied(
    stack: Stack, before: float, expected: int, in_flight: list[float]
) -> tuple[float, float]:
    """Wait until ``expected`` more results are in the ledger; (wall time then, how many).

    Each poll also appends the drainer's replays in flight to ``in_flight`` (how hard it pushed).
    """
    last_progress = time.monotonic()
    seen = -1.0
    while True:
        now = time.time()
        samples = cluster.scrape(stack.sidecar_metrics_url)
        applied = _applied(samples) - before
        in_flight.append(
            cluster.metric_sum(samples, "captchatask_ledger_in_flight", writer="replay")
        )
        if applied >= expected:
            return now, applied
        if applied > seen:
            seen, last_progress = applied, time.monotonic()
        elif time.monotonic() - last_progress > APPLIED_STALL_SECONDS:
            return now, applied
        time.sleep(APPLIED_POLL_SECONDS)


def _raw_ceiling(
    stack: Stack,
    tasks: Sequence[cluster.SubmittedTask],
    *,
    in_flight: int = ceiling.PROBE_IN_FLIGHT,
) -> dict[str, Any]:
    """One raw probe, with the CPU each party used meanwhile (the plane's per patch, to hold
    against the overload row's: the same write each)."""
    config = kube.load_config(str(stack.plane.kubeconfig))
    cpu_before = cpu_now(stack)
    out = asyncio.run(ceiling.probe(config, tasks, token=TOKEN, in_flight=in_flight))
    out["cpu_seconds"] = {k: round(v, 2) for k, v in _delta(cpu_now(stack), cpu_before).items()}
    return out


def _overload(
    stack: Stack,
    tasks: Sequence[cluster.SubmittedTask],
    signer: PingbackSigner,
    *,
    rate: float,
    seconds: float,
    workdir: Path,
    spy: bool = False,
) -> dict[str, Any]:
    """Offer ``rate`` pingbacks/s (each to its own task) open loop; follow them into the ledger.

    ``spy`` samples the sidecar with py-spy meanwhile (diagnosis only: the sampler shares the
    load generator's core, so the published rows run without it).
    """
    paths = [signer.path(task.ref) + f"?id={task.provider_task_id}&code={TOKEN}" for task in tasks]
    paths_file = wrk.write_paths(workdir / "overload.paths", paths)
    _wait_drained(stack)
    before_samples = cluster.scrape(stack.sidecar_metrics_url)
    before = _applied(before_samples)
    outcomes_before = pingback_outcomes(stack)
    api_before = cluster.apiserver_metrics(stack)
    sampler = profiler.Profiler(
        stack.processes["sidecar"].pid, workdir / "sidecar-overload.pyspy", seconds=seconds * 4
    )
    cpu_before, busy_before = cpu_now(stack), procstat.core_ticks()
    with sampler if spy else contextlib.nullcontext(sampler):
        run = paced(stack.pingback_url, paths_file, rate=rate, seconds=seconds)
        sent_at, cpu_sent, busy_sent = time.time(), cpu_now(stack), procstat.core_ticks()
        applied_sent = _applied(cluster.scrape(stack.sidecar_metrics_url)) - before
        in_flight: list[float] = []
        done_at, applied = _wait_applied(stack, before, expected=len(tasks), in_flight=in_flight)
    cpu_after, busy_after = cpu_now(stack), procstat.core_ticks()
    cpu = _delta(cpu_after, cpu_before)
    after_samples = cluster.scrape(stack.sidecar_metrics_url)
    api_after = cluster.apiserver_metrics(stack)
    elapsed = done_at - run["started_at"]
    diverted = _diverted(after_samples)
    diverted_before = _diverted(before_samples)
    figures: dict[str, Any] = {
        "outcomes": _delta(pingback_outcomes(stack), outcomes_before),
        "diverted": {key: diverted[key] - diverted_before[key] for key in diverted},
        "results": len(tasks),
        "applied": applied,
        "seconds_to_apply_all": round(elapsed, 3),
        "ledger_per_second": round(applied / elapsed, 1) if elapsed > 0 else None,
        # Where the time went: how many replays the drainer kept in flight, what the API server
        # itself says of the status PATCHes, and whether pingback writes timed out.
        "replays_in_flight_mean": round(sum(in_flight) / len(in_flight), 1) if in_flight else None,
        "apiserver_patch_status": _patch_latency(api_before, api_after),
        # The sidecar's own view of the same pingbacks, from their headers to their answer: the
        # client's p99 minus this is time spent waiting for a CPU or in the sockets.
        "handle_p99_at_most_ms": _handle_quantile(before_samples, after_samples, 0.99),
        # CPU seconds each party used from the first pingback to the last result applied.
        "cpu_seconds": {key: round(value, 2) for key, value in cpu.items()},
        # The same split in two: while the load generator sends, and the drain after it. A
        # ledger rate that falls in the first phase only points at the shared host core; the
        # cores' busy shares come from /proc/stat (every process on the machine, not only ours).
        "phases": {
            "sending": _phase(
                applied_sent,
                sent_at - run["started_at"],
                cpu_sent,
                cpu_before,
                busy_sent,
                busy_before,
            ),
            "draining": _phase(
                applied - applied_sent,
                done_at - sent_at,
                cpu_after,
                cpu_sent,
                busy_after,
                busy_sent,
            ),
        },
        "ledger_errors": {
            reason: cluster.metric_sum(
                after_samples, "captchatask_ledger_write_errors_total", reason=reason
            )
            - cluster.metric_sum(
                before_samples, "captchatask_ledger_write_errors_total", reason=reason
            )
            for reason in ("timeout", "unavailable", "api_error")
        },
    }
    if spy:
        figures["profile"] = sampler.summary()
    return run | figures


def _gc_collections(stack: Stack) -> dict[str, float]:
    """The sidecar's garbage collections so far, by generation (its default registry's)."""
    samples = cluster.scrape(stack.sidecar_metrics_url)
    return {
        generation: cluster.metric_sum(
            samples, "python_gc_collections_total", generation=generation
        )
        for generation in ("0", "1", "2")
    }


def cpu_now(stack: Stack) -> dict[str, float]:
    """CPU seconds used so far by the sidecar, the control plane, this process and its children
    (the load generator, once it has ended). The fairness phase reads it around its storms."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return {
        "sidecar": procstat.cpu_seconds(stack.processes["sidecar"].pid),
        **{name: procstat.cpu_seconds(pid) for name, pid in stack.plane.pids.items()},
        "bench_client": own.ru_utime + own.ru_stime,
        "load_generator": children.ru_utime + children.ru_stime,
    }


def _phase(
    applied: float,
    seconds: float,
    cpu_after: dict[str, float],
    cpu_before: dict[str, float],
    busy_after: dict[int, tuple[int, int]],
    busy_before: dict[int, tuple[int, int]],
) -> dict[str, Any]:
    """One phase of the overload: its ledger rate, our CPU shares and the cores' busy shares."""
    span = max(seconds, 1e-9)
    busy = {
        f"cpu{core}": share for core, share in procstat.busy_shares(busy_before, busy_after).items()
    }
    return {
        "seconds": round(seconds, 3),
        "applied": applied,
        "ledger_per_second": round(applied / span, 1),
        "cpu_share": {
            key: round(value / span, 3) for key, value in _delta(cpu_after, cpu_before).items()
        },
        "core_busy_share": busy,
    }


def _handle_quantile(
    before: cluster.Samples, after: cluster.Samples, fraction: float
) -> float | None:
    """Upper bound (a bucket's edge) of a quantile of the sidecar's pingback handle time, in ms."""
    name = "captchatask_pingback_handle_duration_seconds_bucket"
    counts: dict[float, float] = {}
    for (metric, labels), value in after.items():
        if metric == name:
            edge = float(dict(labels)["le"])
            counts[edge] = value - before.get((metric, labels), 0.0)
    total = counts.get(float("inf"), 0.0)
    if not total:
        return None
    edge = next(edge for edge in sorted(counts) if counts[edge] >= fraction * total)
    return round(edge * 1e3, 2)


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before.get(key, 0.0) for key in after}


async def _app_latency(
    stack: Stack, tasks: Sequence[cluster.SubmittedTask], signer: PingbackSigner
) -> dict[str, Any]:
    """Pingback sent -> long-poll answered, for each task, in a few parallel lanes."""
    samples: list[float] = []
    ack: list[float] = []
    failures: list[str] = []
    queue = list(tasks)

    async def lane(session: aiohttp.ClientSession) -> None:
        while queue:
            task = queue.pop()
            url = f"{stack.local_api_url}/v1/tasks/{task.ref.name}?wait=60"
            poll = asyncio.create_task(session.get(url))
            await asyncio.sleep(LONG_POLL_SETTLE_SECONDS)
            pingback = (
                stack.pingback_url
                + signer.path(task.ref)
                + f"?id={task.provider_task_id}&code={TOKEN}"
            )
            sent = time.perf_counter()
            async with session.get(pingback) as reply:
                await reply.read()
                acked = time.perf_counter()
            reply_to_app = await poll
            body = await reply_to_app.json()
            answered = time.perf_counter()
            reply_to_app.release()
            if reply.status != 200 or body.get("phase") != "Solved":
                failures.append(f"{reply.status}/{body.get('phase')}")
                continue
            samples.append((answered - sent) * 1e3)
            ack.append((acked - sent) * 1e3)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(lane(session) for _ in range(LATENCY_LANES)))
    return {
        "samples": len(samples),
        "failures": len(failures),
        "p50_ms": percentile(samples, 0.50),
        "p99_ms": percentile(samples, 0.99),
        "max_ms": max(samples) if samples else float("nan"),
        "pingback_ack_p50_ms": percentile(ack, 0.50),
        "pingback_ack_p99_ms": percentile(ack, 0.99),
        "lanes": LATENCY_LANES,
    }


def _patch_latency(before: cluster.Samples, after: cluster.Samples) -> dict[str, Any]:
    """Server-side count and mean latency of the task status PATCHes between two scrapes."""
    labels = {"verb": "PATCH", "resource": "captchatasks", "subresource": "status"}
    count = cluster.metric_sum(
        after, "apiserver_request_duration_seconds_count", **labels
    ) - cluster.metric_sum(before, "apiserver_request_duration_seconds_count", **labels)
    seconds = cluster.metric_sum(
        after, "apiserver_request_duration_seconds_sum", **labels
    ) - cluster.metric_sum(before, "apiserver_request_duration_seconds_sum", **labels)
    return {"count": count, "mean_ms": round(seconds / count * 1e3, 2) if count else None}


async def _direct_records(stack: Stack, tasks: Sequence[cluster.SubmittedTask]) -> dict[str, Any]:
    """The ledger path without the sidecar: how many records/s the API server takes at all."""
    async with cluster.kube_session(stack) as client:
        ledger = Ledger(client)
        started = time.perf_counter()
        outcomes = await cluster.bounded(
            (
                ledger.record(
                    task.ref,
                    Result.solved(
                        token=TOKEN,
                        delivered_by=DeliveredBy.PINGBACK,
                        provider_task_id=task.provider_task_id,
                    ),
                )
                for task in tasks
            ),
            limit=wrk.DEFAULT_CONNECTIONS,
        )
        elapsed = time.perf_counter() - started
    recorded = sum(1 for item in outcomes if item.outcome.value == "recorded")
    return {
        "records": len(tasks),
        "recorded": recorded,
        "concurrency": wrk.DEFAULT_CONNECTIONS,
        "seconds": round(elapsed, 3),
        "records_per_second": round(len(tasks) / elapsed, 1),
    }


#: Provider ids of the prepared tasks, per name prefix (each prefix its own range).
_FIRST_IDS: Final = {
    "ing": 8_000_000_000,
    "ceil": 8_100_000_000,
    "over": 8_200_000_000,
    "more": 8_300_000_000,
    "depth": 8_400_000_000,
}


#: Provider ids a round of the limit rows moves each prefix's range by (rounds prepare thousands).
_ROUND_ID_STRIDE: Final = 10_000_000


async def _delete(stack: Stack, tasks: Sequence[cluster.SubmittedTask]) -> None:
    """Delete prepared tasks (each by name and uid)."""
    async with cluster.kube_session(stack) as client:
        await cluster.bounded(
            client.delete(kube.TASKS, task.ref.namespace, task.ref.name, uid=task.ref.uid)
            for task in tasks
        )


async def _prepare(
    stack: Stack, count: int, *, prefix: str = "ing", round_number: int = 0
) -> list[cluster.SubmittedTask]:
    """``count`` ``Submitted`` tasks named ``{prefix}{round_number or ''}-NNNNN``."""
    name = f"{prefix}{round_number}" if round_number else prefix
    first_id = _FIRST_IDS[prefix] + round_number * _ROUND_ID_STRIDE
    async with cluster.kube_session(stack) as client:
        return await cluster.create_submitted_tasks(
            client, NAMESPACE, prefix=name, count=count, first_id=first_id
        )


def ours(profile: Profile, workdir: Path, say: Say) -> dict[str, Any]:
    """The sidecar: pingback -> app latency, the API server's ceiling and overload, ledger path,
    then spool path (API server frozen)."""
    out: dict[str, Any] = {}
    # The spool path's backlog (over 100,000 results in the full profile) would reach the default
    # record bound and be answered 503: the bound is not what this measures, so it is lifted.
    config = StackConfig(
        workdir=workdir / "stack",
        namespace=NAMESPACE,
        sidecar_args=list(SPOOL_SIDECAR_ARGS),
    )
    stack = Stack(config, progress=say)
    try:
        stack.start()  # inside: a component failing to start still stops the rest
        out["versions"] = cluster.versions(stack)
        # Only the sidecar and the control plane run: the prepared tasks are the operator's
        # work already done, and an operator would start polling them.
        stack.kill("operator")
        sidecar_pid = stack.processes["sidecar"].pid
        out["sidecar_pinned"] = cores.pin_process(sidecar_pid, cores.SERVER_CORE)
        reference = profile.ledger_tasks // 4
        total = (
            profile.latency_samples + profile.paced_ledger_tasks + profile.ledger_tasks + reference
        )
        say(f"preparing {total} Submitted tasks")
        started = time.monotonic()
        tasks = asyncio.run(_prepare(stack, total))
        out["prepare_seconds"] = round(time.monotonic() - started, 2)
        signer = PingbackSigner(load_keys(stack.key_file))
        paths = [
            signer.path(task.ref) + f"?id={task.provider_task_id}&code={TOKEN}" for task in tasks
        ]
        reference_tasks = tasks[-reference:]
        tasks, paths = tasks[:-reference], paths[:-reference]
        latency_tasks = tasks[: profile.latency_samples]
        paced_paths = paths[profile.latency_samples : -profile.ledger_tasks]
        wrk_paths = paths[-profile.ledger_tasks :]

        say(f"pingback -> app: {len(latency_tasks)} long-polls")
        out["app_latency"] = asyncio.run(_app_latency(stack, latency_tasks, signer))

        # The API server's own ceiling and the overload run come before the ledger runs: those
        # leave a spool backlog whose replays would compete with them.
        out |= at_the_limit(stack, profile, reference_tasks, signer, workdir=workdir, say=say)

        say(f"ledger path: paced {profile.ledger_rate:g} req/s for {profile.paced_seconds:g}s")
        paced_file = wrk.write_paths(workdir / "ledger-paced.paths", paced_paths)
        before = pingback_outcomes(stack)
        out["ledger_paced"] = paced(
            stack.pingback_url, paced_file, rate=profile.ledger_rate, seconds=profile.paced_seconds
        )
        out["ledger_paced"]["outcomes"] = _delta(pingback_outcomes(stack), before)

        _wait_drained(stack)  # the paced run's spooled results: applied before wrk starts
        say(f"ledger path: wrk {profile.ledger_wrk_seconds:g}s over {len(wrk_paths)} tasks")
        wrk_file = wrk.write_paths(workdir / "ledger-wrk.paths", wrk_paths)
        before = pingback_outcomes(stack)
        applied_before = _applied(cluster.scrape(stack.sidecar_metrics_url))
        replays_before = _replays(stack)
        api_before = cluster.apiserver_metrics(stack)
        spy = profiler.Profiler(
            sidecar_pid, workdir / "sidecar-ledger.pyspy", seconds=profile.ledger_wrk_seconds
        )
        wrk_started = time.time()
        with spy:
            result = wrk.run(
                stack.pingback_url,
                wrk_file,
                seconds=profile.ledger_wrk_seconds,
                workdir=workdir,
            )
        # Results reach the ledger on two paths: the pingback's own write and, for those the
        # gate diverted, a spool replay; both count (the spool is the ledger path under load).
        applied_in_run = _applied(cluster.scrape(stack.sidecar_metrics_url)) - applied_before
        outcomes = _delta(pingback_outcomes(stack), before)
        out["ledger_wrk"] = result.as_json() | {
            "outcomes": outcomes,
            "results": min(result.requests, len(wrk_paths)),  # wrk cycles through the tasks
            "recorded_in_run": applied_in_run,
            "recorded_per_second": round(applied_in_run / result.seconds, 1),
            "apiserver_patch_status": _patch_latency(api_before, cluster.apiserver_metrics(stack)),
            "profile": spy.summary(),
        }
        say(
            f"  {result.requests_per_second:,.0f} req/s "
            f"({out['ledger_wrk']['recorded_per_second']:,.0f} results/s into the ledger), "
            f"p99 {result.p99_ms:.1f} ms"
        )

        # Until the last distinct result is in the ledger (the repeats come after it in the
        # spool, in wrk's order), then until the spool is empty (the repeats replayed too).
        ledger = out["ledger_wrk"]
        done_at, applied_all = _wait_applied(
            stack, applied_before, expected=ledger["results"], in_flight=[]
        )
        ledger["recorded_until_all"] = applied_all
        ledger["seconds_to_apply_all"] = round(done_at - wrk_started, 1)
        ledger["ledger_per_second"] = round(applied_all / (done_at - wrk_started), 1)
        # The closed-loop ledger run spools most of what it sends: let the drainer apply it all
        # (it is the ledger path too), so the spool path below starts from an empty spool.
        drain_started = time.monotonic()
        _wait_drained(stack, patience=SPOOL_DRAIN_PATIENCE_SECONDS)
        ledger["drain_seconds"] = round(time.monotonic() - drain_started, 1)
        # wrk sends each task's pingback several times: the repeats are acknowledged (spooled)
        # too, and their replays come back duplicate; they cost API calls, not results.
        ledger["replays"] = _delta(_replays(stack), replays_before)
        say(
            f"  all {ledger['recorded_until_all']:,.0f} results in the ledger after "
            f"{ledger['seconds_to_apply_all']:g} s ({ledger['ledger_per_second']:,.0f}/s); "
            f"the spool's repeats drained {ledger['drain_seconds']:g} s later"
        )

        out |= spool_rows(stack, paths, profile, workdir=workdir, say=say, spy=True)
    finally:
        with contextlib.suppress(Exception):
            stack.plane.resume()
        stack.stop()
    return out


def spool_rows(
    stack: Stack,
    paths: Sequence[str],
    profile: Profile,
    *,
    workdir: Path,
    say: Say,
    spy: bool,
) -> dict[str, Any]:
    """The spool-path rows: the API server frozen, wrk closed loop, then the paced run.

    ``paths`` are signed pingback paths (the API server is frozen: their tasks are never
    looked up). The sidecar is killed before the API server resumes, and the API server is
    resumed whatever happens (the caller stops the stack).
    """
    out: dict[str, Any] = {}
    sidecar_pid = stack.processes["sidecar"].pid
    say("spool path: kube-apiserver frozen (SIGSTOP)")
    stack.plane.pause()
    try:
        all_file = wrk.write_paths(workdir / "spool.paths", list(paths))
        # The first pingback waits out the ledger budget and opens the circuit.
        opened = time.perf_counter()
        cluster.fetch_text(stack.pingback_url + paths[0])
        out["spool_circuit_open_ms"] = round((time.perf_counter() - opened) * 1e3, 1)
        before = pingback_outcomes(stack)
        gc_before = _gc_collections(stack)
        sampler = profiler.Profiler(
            sidecar_pid, workdir / "sidecar-spool.pyspy", seconds=profile.wrk_seconds
        )
        cpu_before = procstat.cpu_times(sidecar_pid)
        with sampler if spy else contextlib.nullcontext(sampler):
            result = wrk.run(
                stack.pingback_url, all_file, seconds=profile.wrk_seconds, workdir=workdir
            )
        cpu_after = procstat.cpu_times(sidecar_pid)
        outcomes = _delta(pingback_outcomes(stack), before)
        # Every thread of the sidecar (the spool's writer too), from wrk's start to its end.
        out["spool_wrk"] = (
            result.as_json()
            | {"outcomes": outcomes}
            | _cpu_per_request(cpu_before, cpu_after, result.requests)
            # Garbage collections during the run, by generation (CPU not in any profile frame).
            | {"gc_collections": _delta(_gc_collections(stack), gc_before)}
        )
        if spy:
            out["spool_wrk"]["profile"] = sampler.summary()
        say(f"  {result.requests_per_second:,.0f} req/s, p99 {result.p99_ms:.2f} ms")
        say(f"spool path: paced {profile.spool_rate:g} req/s for {profile.paced_seconds:g}s")
        before = pingback_outcomes(stack)
        out["spool_paced"] = paced(
            stack.pingback_url, all_file, rate=profile.spool_rate, seconds=profile.paced_seconds
        )
        out["spool_paced"]["outcomes"] = _delta(pingback_outcomes(stack), before)
        # The spool now holds results for tasks that already have theirs (or none at all):
        # replaying them would only measure duplicates. Stop the sidecar before the API server
        # wakes up.
        stack.kill("sidecar")
    finally:
        stack.plane.resume()
    return out


def at_the_limit(
    stack: Stack,
    profile: Profile,
    reference_tasks: Sequence[cluster.SubmittedTask],
    signer: PingbackSigner,
    *,
    workdir: Path,
    say: Say,
    pin: bool = True,
    spy: bool = False,
) -> dict[str, Any]:
    """The "API server at its limit" rows: straight ledger client, raw ceiling, overload.

    The control plane has a core of its own for these (:func:`bench.cores.pin_plane`, as on
    control-plane machines in a real cluster), and the sidecar, the paced load generator and
    this process's probe clients share the other one: otherwise the load under which the API
    server is measured would also take its CPU. Afterwards the usual layout is restored.
    ``pin=False`` keeps the usual layout (control plane unpinned), for comparison only.
    """
    if not pin:
        return {"limit_layout": {"layout": cores.describe()}} | _limit_rows(
            stack, profile, reference_tasks, signer, workdir=workdir, say=say, spy=spy
        )
    sidecar_pid = stack.processes["sidecar"].pid
    layout = {
        "layout": cores.describe_plane(),
        "plane_pinned": cores.pin_plane(stack.plane),
        "sidecar_pinned": cores.pin_process(sidecar_pid, cores.HOST_CORE),
    }
    out: dict[str, Any] = {"limit_layout": layout}
    try:
        with cores.on_core(cores.HOST_CORE):
            out |= _limit_rows(
                stack, profile, reference_tasks, signer, workdir=workdir, say=say, spy=spy
            )
    finally:
        cores.release_plane(stack.plane)
        cores.pin_process(sidecar_pid, cores.SERVER_CORE)
    return out


def _limit_rows(
    stack: Stack,
    profile: Profile,
    reference_tasks: Sequence[cluster.SubmittedTask],
    signer: PingbackSigner,
    *,
    workdir: Path,
    say: Say,
    spy: bool = False,
) -> dict[str, Any]:
    """The straight client once, then ``profile.limit_rounds`` rounds of probes and overload.

    The result's ``raw_ceiling``, ``raw_ceiling_at_drain_depth`` and ``overload`` are those of
    the round whose ledger ratio is the median (:mod:`bench.rounds`); ``limit_rounds`` holds
    every round, in the order they ran.
    """
    out: dict[str, Any] = {}
    say(f"reference: {len(reference_tasks)} ledger records straight from a client")
    out["apiserver_reference"] = asyncio.run(_direct_records(stack, reference_tasks))
    reference_rate = out["apiserver_reference"]["records_per_second"]
    say(f"  {reference_rate:,.0f} records/s")
    done: list[dict[str, Any]] = []
    for number in range(1, profile.limit_rounds + 1):
        say(f"round {number} of {profile.limit_rounds}")
        done.append(
            _limit_round(
                stack,
                profile,
                reference_rate,
                signer,
                number=number,
                workdir=workdir,
                say=say,
                spy=spy,
            )
        )
    median = rounds.median_index(done)
    if len(done) > 1:
        middle = rounds.figures(done[median])
        say(
            f"median ledger ratio: round {median + 1}, {middle.ratio:.0%} "
            f"(rounds: {' / '.join(f'{rounds.figures(r).ratio:.0%}' for r in done)})"
        )
    return out | done[median] | {"limit_rounds": done, "limit_median_round": median}


def _limit_round(
    stack: Stack,
    profile: Profile,
    reference_rate: float,
    signer: PingbackSigner,
    *,
    number: int,
    workdir: Path,
    say: Say,
    spy: bool,
) -> dict[str, Any]:
    """Round ``number`` (from 1): the raw ceiling at 64 and at the drainer's depth, then the
    overload at 2x it, each on tasks of the round's own."""

    def prepare(count: int, prefix: str) -> list[cluster.SubmittedTask]:
        return asyncio.run(_prepare(stack, count, prefix=prefix, round_number=number))

    out: dict[str, Any] = {}
    say(
        f"raw API-server ceiling: {profile.ceiling_tasks} status patches, "
        f"{ceiling.PROBE_IN_FLIGHT} in flight"
    )
    ceiling_tasks = prepare(profile.ceiling_tasks, "ceil")
    depth_tasks = prepare(profile.ceiling_tasks, "depth")
    # The overload's tasks exist before the ceiling is probed: the API server's CPU per status
    # patch grows with the objects it holds, so both sides of the ratio must see the same store.
    # Their number comes from the reference (about the ceiling) with headroom; a shortfall is
    # topped up after the probe (and then only the top-up is missing from the probe's store).
    estimate = (
        round(OVERLOAD_FACTOR * OVERLOAD_HEADROOM * reference_rate * profile.overload_seconds)
        + LOADGEN_WARMUP
    )
    say(f"overload: preparing {estimate} tasks before the ceiling (the same store for both)")
    overload_tasks = prepare(estimate, "over")
    raw = out["raw_ceiling"] = _raw_ceiling(stack, ceiling_tasks)
    say(f"  {raw['patches_per_second']:,.0f} patches/s, p99 {raw['p99_ms']:.1f} ms")
    say(f"  again with the drainer's {DEFAULT_DRAIN_CONCURRENCY} in flight")
    shallow = out["raw_ceiling_at_drain_depth"] = _raw_ceiling(
        stack, depth_tasks, in_flight=DEFAULT_DRAIN_CONCURRENCY
    )
    say(
        f"  {shallow['patches_per_second']:,.0f} patches/s "
        f"({shallow['patches_per_second'] / raw['patches_per_second']:.0%} of the ceiling)"
    )
    rate = OVERLOAD_FACTOR * raw["patches_per_second"]
    count = round(rate * profile.overload_seconds) + LOADGEN_WARMUP
    topped_up = max(0, count - len(overload_tasks))
    if topped_up:
        say(f"overload: {topped_up} more tasks (the estimate fell short)")
        overload_tasks += prepare(topped_up, "more")
    say(f"overload: {rate:,.0f} req/s for {profile.overload_seconds:g}s (open loop)")
    out["overload"] = _overload(
        stack,
        overload_tasks[:count],
        signer,
        rate=rate,
        seconds=profile.overload_seconds,
        workdir=workdir,
        spy=spy,
    ) | {
        "factor": OVERLOAD_FACTOR,
        "ceiling_per_second": raw["patches_per_second"],
        "tasks_prepared_after_ceiling": topped_up,
    }
    over = out["overload"]
    say(
        f"  p99 {over['p99_ms']:.2f} ms, {over['http_5xx']} 5xx; "
        f"{over['ledger_per_second']:,.0f} results/s into the ledger "
        f"({over['ledger_per_second'] / raw['patches_per_second']:.0%} of the ceiling)"
    )
    # Every round starts from the same store, and the rows after these see the store they would
    # without them: the API server's CPU per write grows with the objects it holds.
    _wait_drained(stack)
    prepared = [*ceiling_tasks, *depth_tasks, *overload_tasks]
    say(f"  deleting the round's {len(prepared):,} tasks")
    asyncio.run(_delete(stack, prepared))
    return out


def limit_only(
    profile: Profile,
    workdir: Path,
    say: Say,
    *,
    pin: bool = True,
    spy: bool = False,
    sidecar_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Only :func:`at_the_limit`, on a stack of its own (``python -m bench.ingest --limit-only``).

    The whole ingestion phase takes minutes; this is the part a change to the sidecar's overload
    behaviour needs, with the same tasks, layout and figures.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config = StackConfig(
        workdir=workdir / "stack", namespace=NAMESPACE, sidecar_args=list(sidecar_args)
    )
    stack = Stack(config, progress=say)
    try:
        stack.start()
        stack.kill("operator")
        cores.pin_process(stack.processes["sidecar"].pid, cores.SERVER_CORE)
        reference_tasks = asyncio.run(_prepare(stack, profile.ledger_tasks // 4))
        signer = PingbackSigner(load_keys(stack.key_file))
        return {"versions": cluster.versions(stack)} | at_the_limit(
            stack, profile, reference_tasks, signer, workdir=workdir, say=say, pin=pin, spy=spy
        )
    finally:
        stack.stop()


#: ``make bench``'s spool path: the sidecar arguments of :func:`ours` (the bound lifted).
SPOOL_SIDECAR_ARGS: Final = ("--spool-max-records", "10000000", "--spool-max-bytes", "16Gi")


def spool_only(
    profile: Profile,
    workdir: Path,
    say: Say,
    *,
    spy: bool = False,
    sidecar_args: Sequence[str] = (),
) -> dict[str, Any]:
    """The framework ceiling and the spool path only (``python -m bench.ingest --spool-only``).

    The same wrk runs, profile and sidecar settings as in :func:`run`, on a stack of its own;
    what a change to the spool path's CPU per pingback needs, in a minute instead of the whole
    ingestion phase. The pingbacks go to as many tasks as :func:`ours` sends them to, signed
    for tasks that are never created: the API server is frozen before the first one, so the
    sidecar never looks them up. ``ratio`` is the spool path's req/s over the ceiling's.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "baselines": baselines(profile, workdir, say, only=("framework_ceiling",))
    }
    config = StackConfig(
        workdir=workdir / "stack",
        namespace=NAMESPACE,
        sidecar_args=[*SPOOL_SIDECAR_ARGS, *sidecar_args],
    )
    stack = Stack(config, progress=say)
    try:
        stack.start()
        out["versions"] = cluster.versions(stack)
        stack.kill("operator")
        out["sidecar_pinned"] = cores.pin_process(stack.processes["sidecar"].pid, cores.SERVER_CORE)
        signer = PingbackSigner(load_keys(stack.key_file))
        count = profile.latency_samples + profile.paced_ledger_tasks + profile.ledger_tasks
        first = _FIRST_IDS["ing"]
        paths = [
            signer.path(TaskRef(namespace=NAMESPACE, name=f"ing-{i:05d}", uid=str(uuid.uuid4())))
            + f"?id={first + i}&code={TOKEN}"
            for i in range(count)
        ]
        out |= spool_rows(stack, paths, profile, workdir=workdir, say=say, spy=spy)
    finally:
        stack.stop()
    ceiling_rps = out["baselines"]["framework_ceiling"]["requests_per_second"]
    out["ratio"] = round(out["spool_wrk"]["requests_per_second"] / ceiling_rps, 4)
    return out


def run(profile: Profile, workdir: Path, say: Say) -> dict[str, Any]:
    """Items 1 and 5."""
    workdir.mkdir(parents=True, exist_ok=True)
    return {"baselines": baselines(profile, workdir, say), "ours": ours(profile, workdir, say)}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.ingest --limit-only | --spool-only``: a few of the rows, as JSON.

    ``--limit-only``: the "API server at its limit" rows. ``--spool-only``: the framework
    ceiling and the spool path, and their ratio.
    """

    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=main.__doc__)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--limit-only", action="store_true")
    mode.add_argument("--spool-only", action="store_true")
    parser.add_argument("--workdir", type=Path, required=True, help="scratch directory")
    parser.add_argument(
        "--unpinned-plane",
        action="store_true",
        help="leave etcd and kube-apiserver unpinned (the layout before pin_plane; comparison)",
    )
    parser.add_argument(
        "--sidecar-arg",
        action="append",
        default=[],
        help="an extra sidecar argument (repeatable; e.g. --sidecar-arg=--drain-concurrency=8)",
    )
    parser.add_argument(
        "--spy",
        action="store_true",
        help="sample the sidecar with py-spy during the overload (--spool-only: the spool wrk run)",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()

    def say(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    if args.spool_only:
        say(cores.describe())
        result = spool_only(
            PROFILES[args.profile], args.workdir, say, spy=args.spy, sidecar_args=args.sidecar_arg
        )
        spool = result["spool_wrk"]
        ceiling_row = result["baselines"]["framework_ceiling"]
        say(
            f"spool path {spool['requests_per_second']:,.0f} req/s = {result['ratio']:.1%} of the "
            f"ceiling ({ceiling_row['requests_per_second']:,.0f} req/s); CPU per pingback "
            f"{spool['cpu_us_per_request']} us, {spool['system_us_per_request']} us of it system "
            f"(ceiling {ceiling_row['cpu_us_per_request']} us, "
            f"{ceiling_row['system_us_per_request']} us)"
        )
        print(json.dumps(result, indent=1))
        return 0
    pin = not args.unpinned_plane
    say(cores.describe_plane() if pin else cores.describe())
    result = limit_only(
        PROFILES[args.profile],
        args.workdir,
        say,
        pin=pin,
        spy=args.spy,
        sidecar_args=args.sidecar_arg,
    )
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
