"""A poll result for a vanished task is kept until its dead letter is written, however long.

The task of a fallback poll can be deleted while the ``res.php`` request is in flight; the
answer is authentic and paid for, and no later poll will fetch it again (its task is gone), so
the operator must hold it until the ``CaptchaDeadLetter`` exists. The engine runs in-process
against the real kube-apiserver; its client refuses dead-letter creations (as an API server
that does not answer would) for longer than any fixed number of attempts, then lets them
through. The held results are visible in ``captchatask_dead_letters_unwritten``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from tests.operator.conftest import operator_engine

from captchatask import kube, model, testbed
from captchatask.provider.replies import Solution
from captchatask_operator import settings as settings_module
from captchatask_operator.actions import ProviderState
from captchatask_operator.engine import Engine
from captchatask_operator.records import ProviderSpec, TaskRecord

#: Refused creations before the API server "answers" again: more than the old 5 attempts.
REFUSALS = 8
#: A hang guard for the waits below, not a timing assertion.
PATIENCE_SECONDS = 60.0


class RefusingClient(kube.KubeClient):
    """The real client, except that dead-letter creations fail while ``refusals`` lasts."""

    refusals = 0
    creates = 0

    async def create(
        self, resource: kube.Resource, namespace: str | None, body: Any, **kw: Any
    ) -> dict[str, Any]:
        if resource is kube.DEAD_LETTERS:
            type(self).creates += 1
            if type(self).refusals > 0:
                type(self).refusals -= 1
                raise kube.KubeUnavailable("POST captchadeadletters: the API server is away")
        return await super().create(resource, namespace, body, **kw)


@pytest.fixture
async def engine(
    control_plane: testbed.ControlPlane, namespace: str
) -> AsyncIterator[tuple[Engine, kube.KubeClient]]:
    config = kube.load_config(str(control_plane.kubeconfig))
    settings = settings_module.parse(["--namespace", namespace], {})
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:
        client = RefusingClient(config, session)
        eng = operator_engine(client, session, settings)
        try:
            yield eng, kube.KubeClient(config, session)
        finally:
            for op in list(eng._ops):
                op.cancel()


async def eventually(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + PATIENCE_SECONDS
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)


async def test_a_poll_result_for_a_vanished_task_is_held_until_its_dead_letter_is_written(
    engine: tuple[Engine, kube.KubeClient], namespace: str
) -> None:
    eng, client = engine
    eng.poller.letter_retry = (0.05, 0.2)  # the back-off's first and largest step, shortened
    spec = ProviderSpec.from_body(
        {
            "metadata": {"namespace": namespace, "name": "default", "uid": "uid-p"},
            "spec": {"dialect": "captchaai", "apiKeySecretRef": {"name": "s"}},
        }
    )
    state = ProviderState(spec=spec, ready=True, checked=True)
    # The task as the poller saw it when the poll went out; it was deleted since (never here).
    vanished = TaskRecord.from_body(
        {
            "metadata": {
                "namespace": namespace,
                "name": "vanished",
                "uid": "0b7c6f1e-6a5e-4d2b-9c1a-2f3e4d5c6b7a",
                "resourceVersion": "5",
                "creationTimestamp": model.format_time(dt.datetime.now(dt.UTC)),
            },
            "spec": {"type": "Turnstile", "providerTaskId": "9100000001"},
        },
        now=dt.datetime.now(dt.UTC),
    )
    RefusingClient.refusals = REFUSALS
    RefusingClient.creates = 0
    unwritten = eng.metrics.registry.get_sample_value

    await eng.poller.apply(state, vanished, Solution(token="tok-paid-for"))

    assert unwritten("captchatask_dead_letters_unwritten", {"namespace": namespace}) == 1

    async def written() -> bool:
        listed = await client.list(kube.DEAD_LETTERS, namespace)
        return bool(listed.get("items"))

    await eventually(written, "the dead letter to be written once the API server answers")
    (letter,) = (await client.list(kube.DEAD_LETTERS, namespace))["items"]
    assert letter["spec"]["payload"] == {"code": "tok-paid-for", "source": "poll"}
    assert letter["spec"]["reason"] == "TaskNotFound"
    assert RefusingClient.creates == REFUSALS + 1
    assert unwritten("captchatask_dead_letters_unwritten", {"namespace": namespace}) == 0
