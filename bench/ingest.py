"""Pingback ingestion and pingback -> app latency.

Servers measured, each pinned to the server core with wrk/the paced client on the other:

* **framework ceiling** — :mod:`bench.baselines.empty_aiohttp`;
* **seed baseline** — the tutorial's Flask handler (:mod:`bench.baselines.seed_flask`) on Flask's
  threaded dev server and under gunicorn ``gthread`` (one worker: "best single-process"); the
  faster of the two is the baseline;
* **ours, ledger path** — the sidecar of a real :class:`~captchatask.stack.Stack` in front of the
  real kube-apiserver; every request goes to a distinct task prepared in ``Submitted``, so each
  pingback records one result (one CAS PATCH);
* **ours, spool path** — the same sidecar with the API server frozen (``SIGSTOP``,
  ``stack.plane.pause()``): the first pingback waits out the 0.5 s ledger budget and opens the
  sidecar's circuit; from then on every pingback is appended to the spool and group-fsync'd
  before ``200`` (default settings: no budget tuning is needed).

The operator is stopped for these runs: nothing but the sidecar and the control plane runs.
Pingback -> app: a long-poll ``GET /v1/tasks/{name}?wait=60`` is parked on the sidecar's local
API, then the pingback is sent; the figure is from sending the pingback to the long-poll's
answer (so it includes the pingback's own acknowledgement).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp

from bench import cluster, cores, profiler, wrk
from bench.loadgen import percentile
from bench.profiles import Profile
from captchatask.decision import Result
from captchatask.ledger import Ledger
from captchatask.model import DeliveredBy
from captchatask.signing import PingbackSigner, load_keys
from captchatask.stack import Stack, StackConfig
from captchatask.testbed import free_ports

NAMESPACE: Final = "bench"
#: A realistic token length (reCAPTCHA tokens are several hundred characters).
TOKEN: Final = "03AFcWeA" + "x7Kq2mZ" * 60
#: Parallel lanes of the pingback -> app measurement (light load, as in production).
LATENCY_LANES: Final = 4
#: Time for the long-poll to be registered before the pingback is sent.
LONG_POLL_SETTLE_SECONDS: Final = 0.05
SERVER_READY_TIMEOUT: Final = 30.0
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


def baselines(profile: Profile, workdir: Path, say: Say) -> dict[str, Any]:
    """Closed-loop wrk against the framework ceiling and the seed's Flask handler."""
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
        port = free_ports(1)[0]
        full = [*argv, f"127.0.0.1:{port}" if "gunicorn" in argv[0] else str(port)]
        if "gunicorn" in argv[0]:
            full.append("bench.baselines.seed_flask:app")
        say(f"ingestion: {name} (wrk, {profile.wrk_seconds:g}s)")
        with _server(full, port=port, log=workdir / f"{name}.log"):
            result = wrk.run(
                f"http://127.0.0.1:{port}",
                path_file,
                seconds=profile.wrk_seconds,
                workdir=workdir,
            )
        out[name] = result.as_json()
        say(f"  {result.requests_per_second:,.0f} req/s, p99 {result.p99_ms:.2f} ms")
    return out


def _paced(base: str, paths_file: Path, *, rate: float, seconds: float) -> dict[str, Any]:
    argv = [
        sys.executable, "-m", "bench.loadgen", "--base", base, "--paths", str(paths_file),
        "--rate", str(rate), "--seconds", str(seconds),
    ]  # fmt: skip
    done = subprocess.run(
        cores.pinned(cores.LOAD_CORE, argv),
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 120,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _outcomes(stack: Stack) -> dict[str, float]:
    samples = cluster.scrape(stack.sidecar_metrics_url)
    return {
        outcome: cluster.metric_sum(samples, "captchatask_pingbacks_total", outcome=outcome)
        for outcome in ("recorded", "duplicate", "late", "rejected", "spooled", "dead_lettered")
    }


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


async def _prepare(stack: Stack, count: int) -> list[cluster.SubmittedTask]:
    async with cluster.kube_session(stack) as client:
        return await cluster.create_submitted_tasks(
            client, NAMESPACE, prefix="ing", count=count, first_id=8_000_000_000
        )


def ours(profile: Profile, workdir: Path, say: Say) -> dict[str, Any]:
    """The sidecar: pingback -> app latency, ledger path, then spool path (API server frozen)."""
    out: dict[str, Any] = {}
    # The spool path's backlog (over 100,000 results in the full profile) would reach the default
    # record bound and be answered 503: the bound is not what this measures, so it is lifted.
    config = StackConfig(
        workdir=workdir / "stack",
        namespace=NAMESPACE,
        sidecar_args=["--spool-max-records", "10000000", "--spool-max-bytes", "16Gi"],
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

        say(f"ledger path: paced {profile.ledger_rate:g} req/s for {profile.paced_seconds:g}s")
        paced_file = wrk.write_paths(workdir / "ledger-paced.paths", paced_paths)
        before = _outcomes(stack)
        out["ledger_paced"] = _paced(
            stack.pingback_url, paced_file, rate=profile.ledger_rate, seconds=profile.paced_seconds
        )
        out["ledger_paced"]["outcomes"] = _delta(_outcomes(stack), before)

        say(f"ledger path: wrk {profile.ledger_wrk_seconds:g}s over {len(wrk_paths)} tasks")
        wrk_file = wrk.write_paths(workdir / "ledger-wrk.paths", wrk_paths)
        before = _outcomes(stack)
        api_before = cluster.apiserver_metrics(stack)
        spy = profiler.Profiler(
            sidecar_pid, workdir / "sidecar-ledger.pyspy", seconds=profile.ledger_wrk_seconds
        )
        with spy:
            result = wrk.run(
                stack.pingback_url,
                wrk_file,
                seconds=profile.ledger_wrk_seconds,
                workdir=workdir,
            )
        outcomes = _delta(_outcomes(stack), before)
        out["ledger_wrk"] = result.as_json() | {
            "outcomes": outcomes,
            "recorded_per_second": round(outcomes["recorded"] / result.seconds, 1),
            "apiserver_patch_status": _patch_latency(api_before, cluster.apiserver_metrics(stack)),
            "profile": spy.summary(),
        }
        say(
            f"  {result.requests_per_second:,.0f} req/s "
            f"({out['ledger_wrk']['recorded_per_second']:,.0f} recorded/s), "
            f"p99 {result.p99_ms:.1f} ms"
        )

        say(f"reference: {len(reference_tasks)} ledger records straight from a client")
        out["apiserver_reference"] = asyncio.run(_direct_records(stack, reference_tasks))
        say(f"  {out['apiserver_reference']['records_per_second']:,.0f} records/s")

        say("spool path: kube-apiserver frozen (SIGSTOP)")
        stack.plane.pause()
        all_file = wrk.write_paths(workdir / "spool.paths", paths)
        # The first pingback waits out the ledger budget and opens the circuit.
        opened = time.perf_counter()
        cluster.fetch_text(stack.pingback_url + paths[0])
        out["spool_circuit_open_ms"] = round((time.perf_counter() - opened) * 1e3, 1)
        before = _outcomes(stack)
        spy = profiler.Profiler(
            sidecar_pid, workdir / "sidecar-spool.pyspy", seconds=profile.wrk_seconds
        )
        with spy:
            result = wrk.run(
                stack.pingback_url, all_file, seconds=profile.wrk_seconds, workdir=workdir
            )
        outcomes = _delta(_outcomes(stack), before)
        out["spool_wrk"] = result.as_json() | {"outcomes": outcomes, "profile": spy.summary()}
        say(f"  {result.requests_per_second:,.0f} req/s, p99 {result.p99_ms:.2f} ms")
        say(f"spool path: paced {profile.spool_rate:g} req/s for {profile.paced_seconds:g}s")
        before = _outcomes(stack)
        out["spool_paced"] = _paced(
            stack.pingback_url, all_file, rate=profile.spool_rate, seconds=profile.paced_seconds
        )
        out["spool_paced"]["outcomes"] = _delta(_outcomes(stack), before)
        # The spool now holds results for tasks that already have theirs: replaying them
        # would only measure duplicates. Stop the sidecar before the API server wakes up.
        stack.kill("sidecar")
        stack.plane.resume()
    finally:
        with contextlib.suppress(Exception):
            stack.plane.resume()
        stack.stop()
    return out


def run(profile: Profile, workdir: Path, say: Say) -> dict[str, Any]:
    """Items 1 and 5."""
    workdir.mkdir(parents=True, exist_ok=True)
    return {"baselines": baselines(profile, workdir, say), "ours": ours(profile, workdir, say)}
