"""The raw API-server ceiling: what the test bed's own etcd + kube-apiserver take at all.

Every ledger figure of the ingestion phase is a ratio to this one, so the probe must make the
same write per result as a pingback does, and nothing else of ours. The write: exactly one
status JSON patch per prepared ``Submitted`` CaptchaTask, built by the ledger's own
:func:`captchatask.decision.fast_path_patch` and encoded by :func:`captchatask.kube.encode_body`,
so the bytes are a pingback's (the compare-and-set ``test`` ops, the solved fields and the
appended Complete condition; a hand-written, smaller patch measured a cheaper write and made the
ratio flatter than it is). Nothing else: no ledger, no retry policy, no sidecar; one ``aiohttp``
session with :data:`PROBE_IN_FLIGHT` requests in flight. :mod:`bench.ingest` runs it a second
time with as many in flight as the receiver's drainer keeps, to tell what the API server gives a
client of that depth from what the receiver adds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import aiohttp

from bench.cluster import SubmittedTask
from bench.loadgen import percentile
from captchatask import kube
from captchatask.decision import Result, fast_path_patch
from captchatask.ledger import utcnow
from captchatask.model import DeliveredBy

#: Requests in flight: the same as wrk's connections on the ingestion runs (one setting for all).
PROBE_IN_FLIGHT: Final = 64
REQUEST_TIMEOUT_SECONDS: Final = 30.0


def solved_body(task: SubmittedTask, *, token: str, now: dt.datetime) -> str:
    """One result as the request body a pingback's ledger write sends (see the module doc)."""
    result = Result.solved(
        token=token, delivered_by=DeliveredBy.PINGBACK, provider_task_id=task.provider_task_id
    )
    return kube.encode_body(fast_path_patch(task.ref, result, now))


def _headers(config: kube.KubeConfig) -> dict[str, str]:
    headers = {"Accept": "application/json", "Content-Type": kube.JSON_PATCH}
    if config.token:
        headers["Authorization"] = f"Bearer {config.token}"
    return headers


async def probe(
    config: kube.KubeConfig,
    tasks: Sequence[SubmittedTask],
    *,
    token: str,
    in_flight: int = PROBE_IN_FLIGHT,
    clock: Callable[[], dt.datetime] = utcnow,
) -> dict[str, Any]:
    """PATCH each task's status once with ``in_flight`` requests outstanding; return the figures.

    The rate is successful patches over the wall time of the whole run (first request sent to
    last answer), so stragglers count against it as they would against a receiver. ``clock``
    stamps the results (tests fix it to compare bodies).
    """
    headers = _headers(config)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    failures: list[str] = []
    queue = iter(tasks)
    connector = aiohttp.TCPConnector(ssl=kube.ssl_context(config), limit=in_flight)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)

    async def worker(session: aiohttp.ClientSession) -> None:
        for task in queue:
            url = f"{config.server}{kube.TASKS.path(task.ref.namespace, task.ref.name)}/status"
            body = solved_body(task, token=token, now=clock())
            sent = time.perf_counter()
            try:
                async with session.patch(url, data=body, headers=headers) as reply:
                    await reply.read()
                    status = reply.status
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                failures.append(type(exc).__name__)
                continue
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                latencies.append((time.perf_counter() - sent) * 1e3)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(in_flight)))
        elapsed = time.perf_counter() - started
    return {
        "patches": len(tasks),
        "ok": len(latencies),
        "statuses": {str(code): count for code, count in sorted(statuses.items())},
        "client_errors": len(failures),
        "in_flight": in_flight,
        "seconds": round(elapsed, 3),
        "patches_per_second": round(len(latencies) / elapsed, 1) if elapsed > 0 else None,
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
    }
