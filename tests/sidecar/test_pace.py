"""A ceiling on ledger writes per second: the receiver leaves the API server's CPU to others.

API Priority and Fairness shares seats, not CPU, so a receiver that must stay a light user of the
API server during a pingback storm needs a rate: ``--ledger-writes-per-second``. What it may
never cost is an acknowledgement or a result: beyond the rate a pingback is answered from the
fsync'd spool (diverted with reason ``pace``) and the drainer writes it when the rate allows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from tests.sidecar import records
from tests.sidecar.test_limiter import FakeClock

from captchatask.model import DeliveredBy, TaskRef
from captchatask_sidecar.drainer import Drainer
from captchatask_sidecar.limiter import Decision, GradientLimit, LedgerGate, LimitSettings
from captchatask_sidecar.metrics import Metrics
from captchatask_sidecar.pace import WritePace
from captchatask_sidecar.pingback import OUTCOME_HEADER
from captchatask_sidecar.recorder import Recorder
from captchatask_sidecar.settings import SettingsError, load
from captchatask_sidecar.spool import Entry, Spool

if TYPE_CHECKING:
    from tests.sidecar.conftest import Cluster, SidecarFactory

UrlFor = Callable[[str, TaskRef], str]
RATE = 2.0
RESULTS = 6


def test_the_bucket_allows_a_burst_then_refills_at_its_rate() -> None:
    clock = FakeClock()
    pace = WritePace(2.0, 3, clock=clock)
    assert [pace.take() for _ in range(4)] == [True, True, True, False]
    assert pace.seconds_until_next() == pytest.approx(0.5)
    clock.advance(0.5)
    assert pace.take()
    assert not pace.take()
    clock.advance(60.0)  # an idle minute does not save up more than the burst
    assert pace.available == 3


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_a_pace_that_cannot_write_is_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        WritePace(rate, burst, clock=FakeClock())


def test_the_gate_diverts_to_the_spool_when_the_rate_is_used_up() -> None:
    clock = FakeClock()
    limit = GradientLimit(LimitSettings(initial=16, maximum=16), clock=clock)
    gate = LedgerGate(limit, WritePace(1.0, 2, clock=clock))
    assert [gate.decide() for _ in range(3)] == [Decision.WRITE, Decision.WRITE, Decision.PACE]
    assert limit.in_flight == 2  # a paced result takes no write slot
    clock.advance(1.0)
    assert gate.decide() is Decision.WRITE


def test_the_rate_is_read_from_flags_and_env_and_bad_values_are_refused() -> None:
    settings = load(
        ["--pingback-key-file", "k", "--ledger-writes-per-second", "50"],
        {"CAPTCHATASK_LEDGER_WRITES_BURST": "5"},
    )
    assert (settings.ledger_writes_per_second, settings.ledger_writes_burst) == (50.0, 5)
    assert load(["--pingback-key-file", "k"], {}).ledger_writes_per_second == 0  # off
    with pytest.raises(SettingsError, match="CAPTCHATASK_LEDGER_WRITES_PER_SECOND"):
        load(["--pingback-key-file", "k", "--ledger-writes-per-second", "-1"], {})


async def test_results_beyond_the_rate_are_acknowledged_from_the_spool_and_written_later(
    sidecar: SidecarFactory,
    cluster: Cluster,
    namespace: str,
    http: aiohttp.ClientSession,
    url_for: UrlFor,
) -> None:
    tasks = await cluster.many_submitted(namespace, RESULTS, prefix="paced")
    process = sidecar(
        kubeconfig=cluster.kubeconfig,
        namespace=namespace,
        flags={"ledger-writes-per-second": str(RATE), "ledger-writes-burst": "1"},
    )

    async def deliver(index: int, task_ref: TaskRef) -> str:
        params = {"id": str(10_000 + index), "code": f"tok-paced-{index}"}
        async with http.get(url_for(process.pingback_url, task_ref), params=params) as response:
            assert response.status == 200
            return response.headers.get(OUTCOME_HEADER, "")

    started = time.monotonic()
    outcomes = await asyncio.gather(*(deliver(i, task.ref) for i, task in enumerate(tasks)))
    views = await asyncio.gather(*(cluster.task(namespace, task.ref.name) for task in tasks))
    elapsed = time.monotonic() - started
    solved_early = sum(1 for view in views if view is not None and view.solution_token)
    # One result at once (the burst) and RATE per second after it, however slow this machine.
    assert solved_early <= 1 + RATE * elapsed + 1
    assert outcomes.count("spooled") >= RESULTS - (1 + RATE * elapsed + 1)

    async def all_solved() -> bool:
        found = await asyncio.gather(*(cluster.task(namespace, t.ref.name) for t in tasks))
        return all(view is not None and view.solution_token for view in found)

    await cluster.wait_for(all_solved, what="every paced result in the ledger")
    for index, task in enumerate(tasks):
        view = await cluster.task(namespace, task.ref.name)
        assert view is not None
        assert (view.solution_token, view.delivered_by) == (
            f"tok-paced-{index}",
            DeliveredBy.PINGBACK,
        )
    metrics = await process.metrics(http)
    assert metrics[("captchatask_ledger_diverted_total", ("pace",))] >= 1
    assert metrics[("captchatask_pingback_spool_depth", ())] == 0
    assert await cluster.dead_letters(namespace) == []


class CountingSpool(Spool):
    """A real spool that counts how often the drainer asks it for due results."""

    asked = 0

    async def due(self, now: float, limit: int) -> list[Entry]:
        self.asked += 1
        return await super().due(now, limit)


async def test_a_paced_drainer_sleeps_until_its_next_write_instead_of_spinning(
    tmp_path: Path, cluster: Cluster, namespace: str
) -> None:
    # Spooled results were due while the pace had no write left: the drainer must sleep until
    # the next one, not go round its loop (it once did, taking a whole core while it drained).
    tasks = await cluster.many_submitted(namespace, 3, prefix="drain")
    spool = CountingSpool(tmp_path / "spool")
    spool.open()
    for task in tasks:
        await spool.append(records.solved(task.ref, task.provider_task_id))
    metrics = Metrics(CollectorRegistry())
    gate = LedgerGate(
        GradientLimit(LimitSettings(), clock=time.monotonic),
        WritePace(RATE, 1, clock=time.monotonic),
    )
    recorder = Recorder(
        ledger=cluster.ledger,
        spool=spool,
        metrics=metrics,
        budget=0.5,
        received_by="test",
        gate=gate,
    )
    drainer = Drainer(
        recorder=recorder, ledger=cluster.ledger, spool=spool, metrics=metrics, concurrency=8
    )
    running = asyncio.create_task(drainer.run())
    try:

        async def drained() -> bool:
            return spool.depth == 0

        await cluster.wait_for(drained, what="the paced drainer to write every result")
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await spool.close()
    # Three results at one write at once and RATE per second after it: about a second of
    # waiting, a handful of wake-ups. A spinning loop asks thousands of times in that second.
    assert spool.asked < 100
