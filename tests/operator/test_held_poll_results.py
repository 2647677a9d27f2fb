"""A poll answer the API server could not take is kept and written later, not fetched again.

During an API server outage the operator's fallback polls still get answers from the solver,
but cannot record them. Throwing the answer away and polling again two seconds later (as the
operator did) costs a ``res.php`` request per due task every two seconds for the whole outage:
the CaptchaAI-dialect chaos run, with a 40 s outage, sent 2,514 ``res.php`` requests for 1,003
tasks. The answer is authentic and final, so the poller holds it and the retry writes it
without asking the solver again.

The engine runs in-process against the real kube-apiserver and a real emulator; its client
refuses task status writes while ``refusing`` is set, as an API server that does not answer.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from tests.operator.conftest import operator_engine

from captchatask import kube, model, testbed
from captchatask.decision import CONDITION_SUBMITTED, set_condition
from captchatask.emulator.config import DEFAULT_API_KEY
from captchatask.emulator.server import RunningEmulator
from captchatask.ledger import Ledger
from captchatask.model import Phase, TaskView
from captchatask.provider.client import ProviderClient
from captchatask.provider.codes import Dialect
from captchatask_operator import settings as settings_module
from captchatask_operator.actions import ProviderState
from captchatask_operator.engine import Engine
from captchatask_operator.policy import FailureCode
from captchatask_operator.records import ProviderSpec, TaskRecord

#: A hang guard for the waits below, not a timing assertion.
PATIENCE_SECONDS = 60.0
SITE_KEY = "0x4AAAAAAABkMYinukE8nzYS"


class RefusingStatusClient(kube.KubeClient):
    """The real client, except that task status writes fail while ``refusing`` is set."""

    refusing = False

    async def patch(
        self, resource: kube.Resource, namespace: str | None, name: str, body: object, **kw: Any
    ) -> dict[str, Any]:
        if resource is kube.TASKS and kw.get("subresource") == "status" and self.refusing:
            raise kube.KubeUnavailable("PATCH captchatasks/status: the API server is away")
        return await super().patch(resource, namespace, name, body, **kw)


async def _eventually(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + PATIENCE_SECONDS
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)


async def _status(client: kube.KubeClient, namespace: str, name: str) -> dict[str, Any]:
    body = await client.get(kube.TASKS, namespace, name)
    status: dict[str, Any] = body.get("status", {})
    return status


@pytest.fixture
async def setup(
    control_plane: testbed.ControlPlane, namespace: str, emulator: RunningEmulator
) -> AsyncIterator[tuple[Engine, RefusingStatusClient, ProviderState]]:
    config = kube.load_config(str(control_plane.kubeconfig))
    settings = settings_module.parse(["--namespace", namespace], {})
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:
        client = RefusingStatusClient(config, session)
        eng = operator_engine(client, session, settings)
        spec = ProviderSpec.from_body(
            {
                "metadata": {"namespace": namespace, "name": "default", "uid": "uid-p"},
                "spec": {"dialect": "captchaai", "apiKeySecretRef": {"name": "s"}},
            }
        )
        provider = ProviderClient(
            session=session,
            base_url=emulator.base_url,
            api_key=DEFAULT_API_KEY,
            dialect=Dialect.CAPTCHAAI,
        )
        state = ProviderState(spec=spec, ready=True, checked=True, client=provider)
        eng.providers[spec.key] = state
        try:
            yield eng, client, state
        finally:
            for op in list(eng._ops):
                op.cancel()


async def _solved_submitted_task(
    client: kube.KubeClient, namespace: str, state: ProviderState, emulator: RunningEmulator
) -> TaskRecord:
    """A task in ``Submitted`` whose solver task is solved (its pingback never came)."""
    assert state.client is not None
    provider_task_id = await state.client.submit(
        {"method": "turnstile", "sitekey": SITE_KEY, "pageurl": "https://shop.example/login"}
    )
    body = await client.create(
        kube.TASKS,
        namespace,
        {
            "apiVersion": f"{model.GROUP}/v1alpha1",
            "kind": "CaptchaTask",
            "metadata": {"name": "held"},
            "spec": {
                "type": "Turnstile",
                "siteKey": SITE_KEY,
                "pageURL": "https://shop.example/login",
            },
        },
    )
    view = TaskView.from_body(body)
    now = dt.datetime.now(dt.UTC)
    written = await Ledger(client).update_status(
        view,
        {
            "phase": str(Phase.SUBMITTED),
            "providerTaskId": provider_task_id,
            "submittedAt": model.format_time(now),
            "polls": 0,
            "observedGeneration": view.generation,
            "conditions": set_condition(
                [],
                type_=CONDITION_SUBMITTED,
                status="True",
                reason="Submitted",
                message="prepared by the test",
                generation=view.generation,
                now=now,
            ),
        },
    )
    assert written is not None

    async def finished() -> bool:
        return emulator.task(provider_task_id).finished

    await _eventually(finished, "the solver to solve it")
    return TaskRecord.from_view(written, now=now)


async def test_a_poll_answer_the_api_server_refused_is_written_later_without_a_second_poll(
    setup: tuple[Engine, RefusingStatusClient, ProviderState],
    namespace: str,
    emulator: RunningEmulator,
) -> None:
    eng, client, state = setup
    task = await _solved_submitted_task(client, namespace, state, emulator)
    assert task.provider_task_id is not None
    eng.tasks.put(task)
    solver_task = emulator.task(task.provider_task_id)

    eng.poller.held_retry = (0.05, 0.2)  # the back-off's first and largest step, shortened
    client.refusing = True
    await eng.poller.poll_batch(state.spec.key, [task.key])
    assert solver_task.res_calls == 1
    assert task.key in eng.poller.held, "the answer is held, not dropped"

    # A poll of that task comes due while the API server is still away: the solver is not asked
    # again for an answer the operator holds.
    await eng.poller.poll_batch(state.spec.key, [task.key])
    assert solver_task.res_calls == 1, "the solver was asked again for an answer already held"

    client.refusing = False

    async def solved() -> bool:
        return (await _status(client, namespace, task.ref.name)).get("phase") == "Solved"

    await _eventually(solved, "the held answer to be written")
    status = await _status(client, namespace, task.ref.name)
    assert status["deliveredBy"] == "poll"
    assert solver_task.res_calls == 1
    assert task.key not in eng.poller.held
    polls = eng.metrics.registry.get_sample_value(
        "captchatask_fallback_polls_total",
        {"namespace": namespace, "provider": "default", "outcome": "solved"},
    )
    assert polls == 1, "one poll went out, so one poll is counted"


async def test_a_held_answer_that_came_before_the_deadline_replaces_the_deadline_failure(
    setup: tuple[Engine, RefusingStatusClient, ProviderState],
    namespace: str,
    emulator: RunningEmulator,
) -> None:
    """The operator fails the task on its own while the answer waits: the answer still wins.

    The answer arrived before the failure, so it is the task's outcome (the rule a spooled
    pingback follows); without its receipt time the ledger would see it as later than the
    failure and turn it into a ``TaskFailed`` dead letter.
    """
    eng, client, state = setup
    task = await _solved_submitted_task(client, namespace, state, emulator)
    eng.tasks.put(task)
    eng.poller.held_retry = (2.0, 2.0)  # the held answer waits while the task is failed below
    client.refusing = True
    await eng.poller.poll_batch(state.spec.key, [task.key])
    assert task.key in eng.poller.held

    client.refusing = False
    await eng.fail(task.ref, FailureCode.DEADLINE_EXCEEDED, "deadline passed (the test says so)")
    assert (await _status(client, namespace, task.ref.name))["phase"] == "Failed"

    async def solved() -> bool:
        return (await _status(client, namespace, task.ref.name)).get("phase") == "Solved"

    await _eventually(solved, "the held answer to replace the failure")
    status = await _status(client, namespace, task.ref.name)
    assert "failure" not in status
    assert status["deliveredBy"] == "poll"
    assert not (await client.list(kube.DEAD_LETTERS, namespace)).get("items")


async def test_a_held_answer_is_written_once_the_api_server_answers_again_not_after_its_back_off(
    setup: tuple[Engine, RefusingStatusClient, ProviderState],
    namespace: str,
    emulator: RunningEmulator,
    control_plane: testbed.ControlPlane,
) -> None:
    """The operator's API-server probe wakes the writers of held answers when it answers again.

    Held answers were retried on their own back-off (1 s doubling to 4 s), so an answer held
    through an outage reached the ledger up to 4 s after the API server was back, and an
    operator killed in those seconds lost it (its successor had to poll again). Here the
    back-off is longer than the test's patience: only the probe can get the answer written.
    """
    eng, client, state = setup
    task = await _solved_submitted_task(client, namespace, state, emulator)
    eng.tasks.put(task)
    eng.poller.held_retry = (3600.0, 3600.0)
    eng.spawn(eng._probe_ledger())

    await asyncio.to_thread(control_plane.stop_apiserver, grace=2.0)
    try:
        await eng.poller.poll_batch(state.spec.key, [task.key])
        assert task.key in eng.poller.held, "the answer is held while the API server is away"
    finally:
        await asyncio.to_thread(control_plane.start_apiserver)

    async def solved() -> bool:
        return (await _status(client, namespace, task.ref.name)).get("phase") == "Solved"

    async def written_and_let_go() -> bool:
        # The poller lets the answer go after the write's reply, a moment after the API server
        # has the status: both are waited for, the order between them is not the point.
        return await solved() and task.key not in eng.poller.held

    await _eventually(
        written_and_let_go, "the held answer to be written once the API server is back"
    )
    assert emulator.task(task.provider_task_id or "").res_calls == 1
