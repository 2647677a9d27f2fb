"""The shared task watch behind the local API's long-polls outlives a bug in it.

A long-poll (``GET /v1/tasks/{name}?wait=60``) learns of a result that another writer put in the
ledger (the operator's fallback poll, another replica) only from the shared watch. An unexpected
exception in the watch ended its stream unseen, while the hub still counted it as up, and every
long-poll then waited out its timeout. Real API server; the fault is an exception raised where a
bug in the watch's event handling would raise it.
"""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry
from tests.sidecar.conftest import Cluster

from captchatask.decision import Result
from captchatask.model import DeliveredBy, Phase
from captchatask_sidecar.metrics import Metrics
from captchatask_sidecar.watch import TaskHub

#: A hang guard, never an assertion about speed.
PATIENCE_SECONDS = 30.0


async def test_a_long_poll_sees_a_result_written_after_the_watch_hit_a_bug(
    cluster: Cluster, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = CollectorRegistry()
    hub = TaskHub(cluster.client, namespace, Metrics(registry))
    watch = hub._watch
    faults = 0

    async def faulty_watch(resource_version: str) -> str | None:
        nonlocal faults
        if not faults:
            faults += 1
            raise RuntimeError("a bug in the watch's event handling")
        return await watch(resource_version)

    monkeypatch.setattr(hub, "_watch", faulty_watch)
    task = await cluster.submitted(namespace, "watched", "1200")
    waiter = hub.subscribe("watched")
    waiter.uid = task.ref.uid
    runner = asyncio.create_task(hub.run())
    try:

        async def hit() -> bool:
            return faults == 1

        await cluster.wait_for(hit, what="the watch to hit its bug")
        failed = Result.failed(
            code="ERROR_CAPTCHA_UNSOLVABLE",
            message="unsolvable",
            delivered_by=DeliveredBy.POLL,
            provider_task_id="1200",
        )
        await cluster.ledger.record(task.ref, failed)  # as the operator's poll records it
        view, deleted = await asyncio.wait_for(waiter.future, PATIENCE_SECONDS)
    finally:
        hub.unsubscribe(waiter)
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert not deleted
    assert view.phase is Phase.FAILED
    assert registry.get_sample_value("captchatask_task_watch_restarts_total") == 1
