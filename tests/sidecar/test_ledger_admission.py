"""The real sidecar against a real, frozen API server: a pingback never queues behind the ledger.

Above the API server's capacity a pingback must not wait for its turn at the API server: what
exceeds the ledger writes in flight goes straight to the fsync'd spool, and the drainer applies it
when the API server can take it. Freezing the kube-apiserver (SIGSTOP) is the extreme of "slower
than the pingbacks arrive": every write started hangs, so the test sees exactly which pingbacks
were let through to the ledger and which were diverted.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest

from captchatask import kube
from captchatask.model import DeliveredBy, TaskRef
from captchatask_sidecar.pingback import OUTCOME_HEADER

if TYPE_CHECKING:
    from tests.sidecar.conftest import Cluster, SidecarFactory

UrlFor = Callable[[str, TaskRef], str]
Pause = Callable[[], AbstractContextManager[None]]

#: The ledger writes a fresh sidecar lets through before it has measured anything (the default
#: of the adaptive limit's start).
LIMIT_AT_START = 4
PINGBACKS = 40
#: How long the test waits for something that should happen at once (a hang guard).
PATIENCE_SECONDS = 60.0


async def test_pingbacks_beyond_the_writes_in_flight_are_spooled_without_waiting(
    sidecar: SidecarFactory,
    cluster: Cluster,
    namespace: str,
    http: aiohttp.ClientSession,
    url_for: UrlFor,
    pause_apiserver: Pause,
) -> None:
    tasks = await cluster.many_submitted(namespace, PINGBACKS, prefix="burst")
    # A budget far beyond the test's patience: a pingback that waits for the API server
    # waits until it is thawed, so anything answered while it is frozen did not wait for it.
    process = sidecar(
        kubeconfig=cluster.kubeconfig,
        namespace=namespace,
        flags={"ledger-budget-seconds": "600"},
    )

    async def send(index: int) -> tuple[int, str]:
        async with http.get(
            url_for(process.pingback_url, tasks[index].ref),
            params={"id": str(10_000 + index), "code": f"tok-{index}"},
            timeout=aiohttp.ClientTimeout(total=None),
        ) as response:
            return response.status, response.headers.get(OUTCOME_HEADER, "")

    sent: list[asyncio.Task[tuple[int, str]]] = []
    try:
        with pause_apiserver():
            sent = [asyncio.create_task(send(i)) for i in range(PINGBACKS)]
            answered: set[asyncio.Task[tuple[int, str]]] = set()
            pending: set[asyncio.Task[tuple[int, str]]] = set(sent)
            # Hang guard, not a speed assertion: without the bound every pingback waits here.
            while len(answered) < PINGBACKS - LIMIT_AT_START:
                done, pending = await asyncio.wait(
                    pending, timeout=PATIENCE_SECONDS, return_when=asyncio.FIRST_COMPLETED
                )
                assert done, f"only {len(answered)} pingbacks answered, API server frozen"
                answered |= done
            assert Counter(task.result() for task in answered) == {
                (200, "spooled"): PINGBACKS - LIMIT_AT_START
            }
            assert len(pending) == LIMIT_AT_START  # these wait for the API server, as they should
            metrics = await process.metrics(http)
            diverted = sum(
                metrics[("captchatask_ledger_diverted_total", (reason,))]
                for reason in ("limit", "backlog")
            )
            assert diverted == PINGBACKS - LIMIT_AT_START
            assert metrics[("captchatask_ledger_in_flight", ("pingback",))] == LIMIT_AT_START
        # Thawed: the writes in flight land, the drainer applies the spooled rest.
        finished = await asyncio.gather(*sent)
    finally:
        for task in sent:
            task.cancel()
    assert all(status == 200 for status, _outcome in finished)

    async def all_solved() -> bool:
        listing = await cluster.client.list(kube.TASKS, namespace)
        phases = Counter(item.get("status", {}).get("phase") for item in listing["items"])
        return phases.get("Solved", 0) == PINGBACKS

    await cluster.wait_for(all_solved, what="every result in the ledger")
    for index in range(PINGBACKS):
        view = await cluster.task(namespace, f"burst-{index}")
        assert view is not None
        assert (view.solution_token, view.delivered_by) == (f"tok-{index}", DeliveredBy.PINGBACK)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--ledger-min-in-flight=8", "--ledger-max-in-flight=4"], b"LEDGER_MAX_IN_FLIGHT"),
        (["--ledger-max-in-flight=0"], b"LEDGER_MAX_IN_FLIGHT"),
        (["--ledger-latency-tolerance=0.5"], b"LEDGER_LATENCY_TOLERANCE"),
    ],
)
async def test_a_limit_that_cannot_hold_exits_2_with_the_setting_named(
    sidecar: SidecarFactory, unreachable: Path, flags: list[str], named: bytes
) -> None:
    process = sidecar(kubeconfig=unreachable, namespace="apps", run=False)
    process.argv.extend(flags)
    proc = await asyncio.create_subprocess_exec(
        *process.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _out, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"CAPTCHATASK_" + named in err
