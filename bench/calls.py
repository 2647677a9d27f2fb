"""Provider API calls per task, and recovery delay after the timeout.

Ours and the seed run side by side, each against its own emulator (same seed-independent
settings, so the per-account accounting is not mixed), at the same pingback loss, submitting
20 tasks/s. Every protocol time is multiplied by one factor ``s`` (``Profile.time_scale``):

================================  ==============================  ===========================
time                              seed                            ours
================================  ==============================  ===========================
callback timeout (120 s)          ``120*s`` (``pending`` age)     ``callbackTimeoutSeconds``
poll period (30 s)                sweep every ``30*s``            ``intervalSeconds`` (>= 5,
                                                                  the CRD's minimum)
solve times                       emulator ``--solve-time-scale s`` (both)
================================  ==============================  ===========================

Calls are counted by the emulators, not by the clients: ``in.php`` requests, single ``res.php``
gets (per-task accounting) and bulk gets (one request however many ids), divided by the tasks
submitted. Our operator's account checks (``getbalance``/``threadsinfo``, a few per run) are
reported separately: they do not grow with the number of tasks.

Recovery delay is ``finishedAt - (submittedAt + callbackTimeoutSeconds)`` for every task our
operator recovered by polling, and ``recovered_at - (submitted_at + 120*s)`` for the seed's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import aiohttp

from bench import cluster
from bench.baselines.seed_poller import CALLBACK_TIMEOUT_SECONDS, SWEEP_SECONDS, SeedPoller, serving
from bench.chaos.run import parse_samples
from bench.chaos.verdict import Samples, batch_sizes
from bench.loadgen import percentile
from bench.profiles import Profile
from captchatask import kube, model
from captchatask.stack import Stack, StackConfig
from captchatask.testbed import free_ports

NAMESPACE: Final = "calls"
LOSS_LEVELS: Final = (0.0, 0.3, 1.0)
#: A second provider on the same emulator: the CaptchaAI dialect, which polls one id at a time.
SINGLE_PROVIDER: Final = "single"
#: The CRD's minimum ``intervalSeconds``.
MIN_INTERVAL_SECONDS: Final = 5
#: Both emulators: plenty of threads (the thread cap is not what is measured), no rate limits.
EMULATOR_THREADS: Final = "100000"
#: Give up waiting for a level this long after its last submission (a stuck run still reports).
SETTLE_TIMEOUT_SECONDS: Final = 180.0
SURVEY_PERIOD_SECONDS: Final = 0.5

Say = Callable[[str], None]


def _emulator_args(scale: float) -> list[str]:
    return ["--threads", EMULATOR_THREADS, "--solve-time-scale", f"{scale:.6f}"]


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return json.loads(reply.read())


def _post_json(url: str, body: object) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


@contextlib.contextmanager
def _seed_emulator(stack: Stack, scale: float, log: Path) -> Iterator[str]:
    """A second emulator, for the seed's account (same settings as ours)."""
    port = free_ports(1)[0]
    argv = [
        sys.executable, "-m", "captchatask", "emulator", "--port", str(port), "--seed", "2",
        "--key", stack.api_key, *_emulator_args(scale),
    ]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    _get_json(f"{url}/_emulator/summary")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=10)


def _totals(emulator_url: str) -> dict[str, float]:
    totals: dict[str, float] = _get_json(f"{emulator_url}/_emulator/summary")["totals"]
    return totals


def _task_records(emulator_url: str, ids: set[str]) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = _get_json(f"{emulator_url}/_emulator/tasks")["tasks"]
    return [task for task in tasks if task["id"] in ids]


def _calls(
    before: dict[str, float], after: dict[str, float], records: list[dict[str, Any]], n: int
) -> dict[str, Any]:
    """Provider requests per task from an emulator's accounting."""
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    in_php = delta.get("in_requests", 0)
    single = sum(task["res_calls"] - task["res_bulk_calls"] for task in records)
    bulk = delta.get("res_bulk_requests", 0)
    res_all = delta.get("res_requests", 0)
    account = max(0.0, res_all - single - bulk)
    task_calls = in_php + single + bulk
    return {
        "tasks": n,
        "in_php": in_php,
        "res_single": single,
        "res_bulk": bulk,
        "account_checks": account,
        "calls_per_task": round(task_calls / n, 4) if n else None,
        "calls_per_task_incl_account": round((task_calls + account) / n, 4) if n else None,
    }


def _operator_samples(stack: Stack) -> Samples:
    """One scrape of our operator's /metrics."""
    with urllib.request.urlopen(stack.operator_metrics_url, timeout=30) as reply:
        return parse_samples(reply.read().decode())


def _batch_sizes(before: Samples, after: Samples) -> dict[str, Any]:
    """The operator's batch-size histogram (ids per res.php poll request) between two scrapes."""
    return batch_sizes([{key: value - before.get(key, 0.0) for key, value in after.items()}])


def _delay_stats(delays: list[float]) -> dict[str, Any]:
    return {
        "samples": len(delays),
        "p50_s": percentile(delays, 0.50),
        "p99_s": percentile(delays, 0.99),
        "max_s": max(delays) if delays else float("nan"),
    }


async def _ours_level(
    client: kube.KubeClient, *, prefix: str, count: int, rate: float, provider: str = "default"
) -> list[dict[str, Any]]:
    """Create ``count`` tasks at ``rate``/s (the app's side) and wait until all ended."""
    start = time.perf_counter()
    creates = []
    for index in range(count):
        delay = start + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        body = cluster.task_body(
            f"{prefix}-{index:04d}", task_type="RecaptchaV2", providerRef={"name": provider}
        )
        creates.append(asyncio.create_task(client.create(kube.TASKS, NAMESPACE, body)))
    await asyncio.gather(*creates)
    deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
    while True:
        listing = await client.list(kube.TASKS, NAMESPACE)
        mine = [
            item for item in listing["items"] if item["metadata"]["name"].startswith(prefix + "-")
        ]
        phases = [(item.get("status") or {}).get("phase") for item in mine]
        if all(phase in ("Solved", "Failed") for phase in phases) or time.monotonic() > deadline:
            return mine
        await asyncio.sleep(SURVEY_PERIOD_SECONDS)


async def _seed_level(
    poller: SeedPoller, session: aiohttp.ClientSession, *, count: int, rate: float
) -> list[str]:
    """Submit ``count`` tasks at ``rate``/s the tutorial's way and wait until all resolved."""
    start = time.perf_counter()
    submits = []
    for index in range(count):
        delay = start + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        submits.append(
            asyncio.create_task(
                poller.submit_captcha(
                    session, sitekey=cluster.RECAPTCHA_SITE_KEY, pageurl=cluster.PAGE_URL
                )
            )
        )
    ids = [task_id for task_id in await asyncio.gather(*submits) if task_id]
    deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
    while any(task_id in poller.pending_tasks for task_id in ids):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(SURVEY_PERIOD_SECONDS)
    return ids


def _ours_delays(items: list[dict[str, Any]], timeout: float) -> tuple[list[float], dict[str, int]]:
    delays: list[float] = []
    delivered: dict[str, int] = {}
    for item in items:
        status = item.get("status") or {}
        by = str(status.get("deliveredBy") or status.get("phase") or "unfinished")
        delivered[by] = delivered.get(by, 0) + 1
        submitted = model.parse_time(status.get("submittedAt"))
        finished = model.parse_time(status.get("finishedAt"))
        if by == "poll" and submitted and finished:
            delays.append((finished - submitted).total_seconds() - timeout)
    return delays, delivered


async def _levels(
    stack: Stack, seed_url: str, profile: Profile, callback_timeout: int, say: Say
) -> list[dict[str, Any]]:
    scale = profile.time_scale
    callback_port = free_ports(1)[0]
    poller = SeedPoller(
        solver_url=seed_url,
        api_key=stack.api_key,
        callback_url=f"http://127.0.0.1:{callback_port}/callback",
        scale=scale,
    )
    levels: list[dict[str, Any]] = []
    async with (
        cluster.kube_session(stack) as client,
        serving(poller, port=callback_port) as session,
    ):
        for loss in LOSS_LEVELS:
            say(f"api calls: {loss:.0%} pingback loss, {profile.calls_tasks} tasks each system")
            for url in (stack.emulator_url, seed_url):
                _post_json(f"{url}/_emulator/faults", {"pingback_drop_rate": loss})
            ours_before, seed_before = _totals(stack.emulator_url), _totals(seed_url)
            samples_before = _operator_samples(stack)
            started = time.monotonic()
            prefix = f"loss{round(loss * 100):03d}"
            items, seed_ids = await asyncio.gather(
                _ours_level(
                    client, prefix=prefix, count=profile.calls_tasks, rate=profile.submit_rate
                ),
                _seed_level(poller, session, count=profile.calls_tasks, rate=profile.submit_rate),
            )
            elapsed = time.monotonic() - started
            ours_ids = {
                str((item.get("status") or {}).get("providerTaskId"))
                for item in items
                if (item.get("status") or {}).get("providerTaskId")
            }
            ours_calls = _calls(
                ours_before,
                _totals(stack.emulator_url),
                _task_records(stack.emulator_url, ours_ids),
                len(items),
            )
            seed_calls = _calls(
                seed_before,
                _totals(seed_url),
                _task_records(seed_url, set(seed_ids)),
                len(seed_ids),
            )
            ours_calls["batch_sizes"] = _batch_sizes(samples_before, _operator_samples(stack))
            delays, delivered = _ours_delays(items, callback_timeout)
            seed_delays = [
                at - (poller.submitted_at[task_id] + poller.threshold)
                for task_id, at in poller.recovered_at.items()
                if task_id in set(seed_ids)
            ]
            levels.append(
                {
                    "loss": loss,
                    "seconds": round(elapsed, 1),
                    "ours": ours_calls | {"delivered_by": delivered},
                    "seed": seed_calls
                    | {
                        "recovered_by_poll": len(seed_delays),
                        "unresolved": sum(1 for t in seed_ids if t in poller.pending_tasks),
                    },
                    "ours_recovery": _delay_stats(delays),
                    "seed_recovery": _delay_stats(seed_delays),
                }
            )
            say(
                f"  ours {ours_calls['calls_per_task']} calls/task "
                f"({ours_calls['batch_sizes']['mean']} ids per poll request), "
                f"seed {seed_calls['calls_per_task']} calls/task ({elapsed:.0f}s)"
            )
        levels.append(await _ours_single(stack, client, profile, callback_timeout, say))
    return levels


async def _ours_single(
    stack: Stack, client: kube.KubeClient, profile: Profile, callback_timeout: int, say: Say
) -> dict[str, Any]:
    """Ours with one ``res.php`` per task (the CaptchaAI dialect: bulk ``ids`` unconfirmed)."""
    loss = LOSS_LEVELS[-1]
    say(f"api calls: {loss:.0%} loss, provider {SINGLE_PROVIDER!r} (CaptchaAI dialect, no bulk)")
    before = _totals(stack.emulator_url)
    started = time.monotonic()
    items = await _ours_level(
        client,
        prefix="single",
        count=profile.calls_tasks,
        rate=profile.submit_rate,
        provider=SINGLE_PROVIDER,
    )
    ids = {
        str((item.get("status") or {}).get("providerTaskId"))
        for item in items
        if (item.get("status") or {}).get("providerTaskId")
    }
    calls = _calls(
        before, _totals(stack.emulator_url), _task_records(stack.emulator_url, ids), len(items)
    )
    delays, delivered = _ours_delays(items, callback_timeout)
    say(f"  ours (no bulk) {calls['calls_per_task']} calls/task")
    return {
        "loss": loss,
        "variant": "ours_no_bulk",
        "seconds": round(time.monotonic() - started, 1),
        "ours": calls | {"delivered_by": delivered},
        "ours_recovery": _delay_stats(delays),
    }


def run(profile: Profile, workdir: Path, say: Say) -> dict[str, Any]:
    """Items 2 and 3."""
    workdir.mkdir(parents=True, exist_ok=True)
    scale = profile.time_scale
    callback_timeout = max(1, round(CALLBACK_TIMEOUT_SECONDS * scale))
    interval = max(MIN_INTERVAL_SECONDS, round(SWEEP_SECONDS * scale))
    polling = {"callbackTimeoutSeconds": callback_timeout, "intervalSeconds": interval}
    config = StackConfig(
        workdir=workdir / "stack",
        namespace=NAMESPACE,
        emulator_args=_emulator_args(scale),
        # The 2captcha dialect documents bulk ``ids=``; the same emulator serves both dialects.
        provider_spec={"dialect": "2captcha", "polling": polling | {"bulk": True}},
    )
    stack = Stack(config, progress=say)
    try:
        stack.start()  # inside: a component failing to start still stops the rest
        single = stack.provider_manifests()[1]
        single["metadata"] = {"name": SINGLE_PROVIDER}
        single["spec"] = single["spec"] | {"dialect": "captchaai", "polling": polling}
        stack.apply([single])
        with _seed_emulator(stack, scale, workdir / "seed-emulator.log") as seed_url:
            levels = asyncio.run(_levels(stack, seed_url, profile, callback_timeout, say))
    finally:
        stack.stop()
    return {
        "time_scale": scale,
        "submit_rate": profile.submit_rate,
        "ours_callback_timeout_s": callback_timeout,
        "ours_interval_s": interval,
        "seed_threshold_s": CALLBACK_TIMEOUT_SECONDS * scale,
        "seed_sweep_s": SWEEP_SECONDS * scale,
        "levels": levels,
    }
