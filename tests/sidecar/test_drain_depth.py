"""How many replays the drainer keeps in flight: deeper once no pingback competes with them.

etcd and the API server take a status patch for less of their CPU when more wait in the queue
(they batch them). The drainer's replays share the receiver's event loop with the pingbacks,
though, and a burst of answers to many replays delays the pingbacks behind it. So the drainer
keeps ``busy_concurrency`` replays in flight while pingbacks arrive, and deepens to
``concurrency`` (the ``--drain-concurrency`` flag, which bounds it always) once none has
arrived for :data:`~captchatask_sidecar.drainer.QUIET_SECONDS` (the spool left behind by a
burst drains faster); the first pingback after that brings it back before another replay
starts. Real API server, real spool; the clock is the recorder's (fake).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from tests.sidecar import records
from tests.sidecar.test_limiter import FakeClock

from captchatask.decision import Result
from captchatask.model import DeliveredBy
from captchatask_sidecar.drainer import BUSY_CONCURRENCY, QUIET_SECONDS, Drainer
from captchatask_sidecar.limiter import GradientLimit, LedgerGate, LimitSettings
from captchatask_sidecar.metrics import Metrics
from captchatask_sidecar.recorder import Recorder
from captchatask_sidecar.settings import load
from captchatask_sidecar.spool import Spool

if TYPE_CHECKING:
    from tests.sidecar.conftest import Cluster

BASE = 2
DEEP = 6
RESULTS = 12


class PeakGate(LedgerGate):
    """The real gate, remembering the most replays it saw in flight at once."""

    peak = 0

    def replay_started(self) -> None:
        super().replay_started()
        self.peak = max(self.peak, self.replaying)


async def _spooled(cluster: Cluster, namespace: str, spool: Spool, prefix: str) -> list[str]:
    tasks = await cluster.many_submitted(namespace, RESULTS, prefix=prefix)
    for task in tasks:
        await spool.append(records.solved(task.ref, task.provider_task_id))
    return [task.ref.name for task in tasks]


async def _drain(
    cluster: Cluster,
    namespace: str,
    tmp_path: Path,
    *,
    quiet_for: float | None,
    concurrency: int = DEEP,
    busy_concurrency: int = BASE,
) -> tuple[int, list[str]]:
    """Drain a spool of ``RESULTS``; (most replays in flight at once, the tasks' phases).

    ``quiet_for``: a pingback was accepted (on the real path) this long before the drainer
    starts; ``None``: none ever was.
    """
    spool = Spool(tmp_path / "spool")
    spool.open()
    names = await _spooled(cluster, namespace, spool, "r")
    clock = FakeClock()
    gate = PeakGate(GradientLimit(LimitSettings(), clock=clock))
    metrics = Metrics(CollectorRegistry())
    recorder = Recorder(
        ledger=cluster.ledger,
        spool=spool,
        metrics=metrics,
        budget=0.5,
        received_by="test",
        gate=gate,
        clock=clock,
    )
    if quiet_for is not None:
        (task,) = await cluster.many_submitted(namespace, 1, prefix="p")
        result = Result.solved(
            token="tok-p",
            delivered_by=DeliveredBy.PINGBACK,
            provider_task_id=str(task.provider_task_id),
        )
        assert await recorder.accept(task.ref, result, source="get") == "recorded"
        clock.advance(quiet_for)
    drainer = Drainer(
        recorder=recorder,
        ledger=cluster.ledger,
        spool=spool,
        metrics=metrics,
        concurrency=concurrency,
        busy_concurrency=busy_concurrency,
    )
    running = asyncio.create_task(drainer.run())
    try:

        async def drained() -> bool:
            return spool.depth == 0

        await cluster.wait_for(drained, what="the drainer to write every result")
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await spool.close()
    phases: list[str] = []
    for name in names:
        task_now = await cluster.ledger.get_task(namespace, name)
        phases.append(str(task_now.phase) if task_now is not None else "gone")
    return gate.peak, phases


async def test_with_no_pingback_arriving_the_drainer_deepens_to_its_maximum(
    tmp_path: Path, cluster: Cluster, namespace: str
) -> None:
    peak, phases = await _drain(cluster, namespace, tmp_path, quiet_for=None)
    assert peak == DEEP
    assert set(phases) == {"Solved"}


async def test_while_pingbacks_arrive_the_drainer_keeps_its_base_concurrency(
    tmp_path: Path, cluster: Cluster, namespace: str
) -> None:
    peak, phases = await _drain(cluster, namespace, tmp_path, quiet_for=QUIET_SECONDS / 2)
    assert peak == BASE
    assert set(phases) == {"Solved"}


async def test_once_the_pingbacks_stop_the_drainer_deepens_again(
    tmp_path: Path, cluster: Cluster, namespace: str
) -> None:
    peak, phases = await _drain(cluster, namespace, tmp_path, quiet_for=QUIET_SECONDS)
    assert peak == DEEP
    assert set(phases) == {"Solved"}


async def test_a_low_drain_concurrency_bounds_the_drainer_even_when_no_pingback_arrives(
    tmp_path: Path, cluster: Cluster, namespace: str
) -> None:
    # The gentle setting docs/operations/api-priority.md describes must stay gentle: the flag is
    # the most replays in flight, never only the depth while pingbacks arrive.
    gentle = load(["--pingback-key-file", "k", "--drain-concurrency", "2"], {}).drain_concurrency
    peak, phases = await _drain(
        cluster,
        namespace,
        tmp_path,
        quiet_for=None,
        concurrency=gentle,
        busy_concurrency=BUSY_CONCURRENCY,
    )
    assert peak == 2
    assert set(phases) == {"Solved"}
