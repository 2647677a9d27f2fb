"""Mass deadlines after an outage: the operator's endings go out with bounded concurrency.

When the API server comes back after an outage longer than many tasks' deadlines, every one of
those deadlines is due at once. Each failure is a GET and a compare-and-set PATCH through the
operator's one connection pool, whose per-request timeout includes the wait for a connection:
hundreds at once would time out in the queue and postpone themselves (``KubeUnavailable``) for
no fault of the API server. The engine runs here in-process against the real kube-apiserver;
its client counts the requests in flight, and the test checks the peak against the bound.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest
from tests.operator.conftest import operator_engine

from captchatask import kube, model, testbed
from captchatask_operator import settings as settings_module
from captchatask_operator.endings import ENDINGS_CONCURRENCY
from captchatask_operator.engine import Engine
from captchatask_operator.records import TaskRecord
from captchatask_operator.schedule import Kind

#: More tasks past their deadline than the bound, by far.
TASKS = 120


class CountingClient(kube.KubeClient):
    """The real client, counting the requests in flight (the peak is what the test reads)."""

    in_flight = 0
    peak = 0

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: object = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
        timeout: float = kube.DEFAULT_TIMEOUT_SECONDS,
    ) -> dict[str, Any]:
        type(self).in_flight += 1
        type(self).peak = max(type(self).peak, type(self).in_flight)
        try:
            return await super().request(
                method, path, body=body, content_type=content_type, params=params, timeout=timeout
            )
        finally:
            type(self).in_flight -= 1


@pytest.fixture
async def engine(
    control_plane: testbed.ControlPlane, namespace: str
) -> AsyncIterator[tuple[Engine, kube.KubeClient]]:
    config = kube.load_config(str(control_plane.kubeconfig))
    settings = settings_module.parse(["--namespace", namespace], {})
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:
        client = CountingClient(config, session)
        yield (
            operator_engine(client, session, settings),
            kube.KubeClient(config, session),
        )


async def test_deadlines_falling_due_together_are_failed_with_bounded_concurrency(
    engine: tuple[Engine, kube.KubeClient], namespace: str
) -> None:
    eng, client = engine
    gate = asyncio.Semaphore(16)

    async def create(index: int) -> dict[str, Any]:
        body = {
            "apiVersion": model.API_VERSION,
            "kind": model.TASK_KIND,
            "metadata": {"name": f"due-{index:03d}", "namespace": namespace},
            "spec": {"type": "Turnstile", "siteKey": "k", "pageURL": "https://a.example/"},
        }
        async with gate:
            return await client.create(kube.TASKS, namespace, body)

    bodies = await asyncio.gather(*(create(i) for i in range(TASKS)))
    now = dt.datetime.now(dt.UTC)
    for body in bodies:
        eng.tasks.put(TaskRecord.from_body(body, now=now))
    CountingClient.peak = 0

    # Every deadline comes due in the same timer tick, as after a long outage.
    eng._dispatch(((Kind.DEADLINE, namespace, b["metadata"]["name"]), 0.0) for b in bodies)
    while eng._ops:
        await asyncio.gather(*list(eng._ops))

    listed = await client.list(kube.TASKS, namespace)
    failures = [(item.get("status") or {}).get("failure", {}) for item in listed["items"]]
    assert [f.get("code") for f in failures] == ["DeadlineExceeded"] * TASKS
    assert 0 < CountingClient.peak <= ENDINGS_CONCURRENCY
