"""The ledger against the real API server: compare-and-set, exactly one outcome, dead letters."""

import asyncio
import datetime as dt
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from captchatask import kube, model, testbed
from captchatask.deadletters import LetterView, RequeueOutcome, requeue
from captchatask.decision import Outcome, Result, set_condition
from captchatask.ledger import Ledger, utcnow
from captchatask.model import DeadLetterReason, DeliveredBy, Phase, TaskRef, TaskView


@pytest.fixture
async def ledger(control_plane: testbed.ControlPlane) -> AsyncIterator[Ledger]:
    config = kube.load_config(str(control_plane.kubeconfig))
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:
        yield Ledger(kube.KubeClient(config, session))


async def create_task(ledger: Ledger, namespace: str, name: str, **spec: Any) -> TaskView:
    body = {
        "apiVersion": model.API_VERSION,
        "kind": model.TASK_KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"type": "Turnstile", "siteKey": "k", "pageURL": "https://a.example/", **spec},
    }
    return TaskView.from_body(await ledger.client.create(kube.TASKS, namespace, body))


async def submitted(ledger: Ledger, namespace: str, name: str, pid: str) -> TaskView:
    task = await create_task(ledger, namespace, name)
    now = utcnow()
    fields = {
        "phase": "Submitted",
        "providerTaskId": pid,
        "submittedAt": model.format_time(now),
        "conditions": set_condition(
            [],
            type_="Submitted",
            status="True",
            reason="Accepted",
            message="accepted",
            generation=task.generation,
            now=now,
        ),
    }
    updated = await ledger.update_status(task, fields)
    assert updated is not None
    return updated


def solved(pid: str, by: DeliveredBy = DeliveredBy.PINGBACK, token: str = "TOK") -> Result:
    return Result.solved(token=token, delivered_by=by, provider_task_id=pid)


async def test_a_pingback_for_a_submitted_task_is_recorded_in_one_write(
    ledger: Ledger, namespace: str
) -> None:
    task = await submitted(ledger, namespace, "t1", "1000000001")
    recorded = await ledger.record(task.ref, solved("1000000001", token="03AF-token"))
    assert recorded.outcome is Outcome.RECORDED
    after = await ledger.get_task(namespace, "t1")
    assert after is not None
    assert after.phase is Phase.SOLVED
    assert after.solution_token == "03AF-token"
    assert after.delivered_by is DeliveredBy.PINGBACK
    types = [c["type"] for c in after.status["conditions"]]
    assert types == ["Submitted", "Complete"]


async def test_fifty_racing_results_yield_exactly_one_outcome(
    ledger: Ledger, namespace: str
) -> None:
    for round_ in range(3):
        task = await submitted(ledger, namespace, f"race-{round_}", f"20000000{round_}")
        pid = task.provider_task_id
        assert pid is not None
        results = [
            solved(pid, DeliveredBy.PINGBACK if i % 2 else DeliveredBy.POLL) for i in range(50)
        ]
        outcomes = Counter(
            r.outcome for r in await asyncio.gather(*(ledger.record(task.ref, r) for r in results))
        )
        assert outcomes[Outcome.RECORDED] == 1
        assert (
            outcomes[Outcome.RECORDED] + outcomes[Outcome.DUPLICATE] + outcomes[Outcome.LATE] == 50
        )


async def test_a_pending_task_without_provider_id_takes_the_id_from_the_result(
    ledger: Ledger, namespace: str
) -> None:
    # The app reserved a URL and submitted itself; its pingback beat the `track` call.
    task = await create_task(ledger, namespace, "external", external=True)
    recorded = await ledger.record(task.ref, solved("3000000001"))
    assert recorded.outcome is Outcome.RECORDED
    assert recorded.task is not None
    assert recorded.task.provider_task_id == "3000000001"
    assert recorded.task.phase is Phase.SOLVED


async def test_unapplicable_results_are_reported_as_dead_letters(
    ledger: Ledger, namespace: str
) -> None:
    task = await submitted(ledger, namespace, "t2", "4000000001")
    gone = TaskRef(namespace, "missing", task.ref.uid)
    recreated = TaskRef(namespace, "t2", "00000000-0000-4000-8000-000000000000")
    assert (await ledger.record(gone, solved("1"))).reason is DeadLetterReason.TASK_NOT_FOUND
    assert (
        await ledger.record(recreated, solved("4000000001"))
    ).reason is DeadLetterReason.TASK_RECREATED
    assert (
        await ledger.record(task.ref, solved("4000000002"))
    ).reason is DeadLetterReason.PROVIDER_TASK_MISMATCH
    after = await ledger.get_task(namespace, "t2")
    assert after is not None
    assert after.phase is Phase.SUBMITTED


async def test_a_result_the_schema_rejects_becomes_a_dead_letter_not_an_error(
    ledger: Ledger, namespace: str
) -> None:
    task = await submitted(ledger, namespace, "t3", "5000000001")
    huge = solved("5000000001", token="x" * 70_000)  # over the CRD's maxLength
    recorded = await ledger.record(task.ref, huge)
    assert recorded.outcome is Outcome.DEAD_LETTER
    assert recorded.reason is DeadLetterReason.LEDGER_REJECTED


async def test_dead_letters_are_idempotent(ledger: Ledger, namespace: str) -> None:
    ref = TaskRef(namespace, "gone", "00000000-0000-4000-8000-000000000001")
    kwargs: dict[str, Any] = {
        "namespace": namespace,
        "reason": DeadLetterReason.TASK_NOT_FOUND,
        "message": "task not found",
        "ref": ref,
        "result": solved("6000000001"),
        "received_at": utcnow(),
        "received_by": "test",
        "source": "get",
    }
    first = await ledger.dead_letter(**kwargs)
    second = await ledger.dead_letter(**kwargs)
    assert first == second
    letters = await ledger.client.list(kube.DEAD_LETTERS, namespace)
    assert [item["metadata"]["name"] for item in letters["items"]] == [first]
    spec = letters["items"][0]["spec"]
    assert spec["providerTaskId"] == "6000000001"
    assert spec["taskRef"] == {"name": "gone", "uid": ref.uid}


async def test_update_status_loses_cleanly_to_a_concurrent_terminal_write(
    ledger: Ledger, namespace: str
) -> None:
    task = await submitted(ledger, namespace, "t4", "7000000001")
    assert (await ledger.record(task.ref, solved("7000000001"))).outcome is Outcome.RECORDED
    # The poller still holds the Submitted view and tries to bump its poll counter.
    assert await ledger.update_status(task, {"polls": 1}) is None
    after = await ledger.get_task(namespace, "t4")
    assert after is not None
    assert after.phase is Phase.SOLVED
    assert after.polls == 0


async def operator_failed(ledger: Ledger, namespace: str, name: str, pid: str) -> TaskView:
    """A submitted task the operator then failed itself (DeadlineExceeded, no deliveredBy)."""
    task = await submitted(ledger, namespace, name, pid)
    now = utcnow()
    failed = await ledger.update_status(
        task,
        {
            "phase": "Failed",
            "finishedAt": model.format_time(now),
            "failure": {"code": "DeadlineExceeded", "message": "no result before the deadline"},
            "conditions": set_condition(
                task.status.get("conditions") or [],
                type_="Complete",
                status="True",
                reason="DeadlineExceeded",
                message="failed: DeadlineExceeded",
                generation=task.generation,
                now=now,
            ),
        },
    )
    assert failed is not None
    return failed


async def test_a_result_received_before_the_operator_failed_the_task_becomes_its_outcome(
    ledger: Ledger, namespace: str
) -> None:
    failed = await operator_failed(ledger, namespace, "t5", "8000000001")
    assert failed.finished_at is not None
    received = failed.finished_at - dt.timedelta(seconds=1)  # acknowledged, then spooled
    recorded = await ledger.record(
        failed.ref, solved("8000000001", token="kept"), received_at=received
    )
    assert recorded.outcome is Outcome.RECORDED
    after = await ledger.get_task(namespace, "t5")
    assert after is not None
    assert (after.phase, after.solution_token, after.delivered_by) == (
        Phase.SOLVED,
        "kept",
        DeliveredBy.PINGBACK,
    )
    assert "failure" not in after.status
    # A second copy of the same pingback is an ordinary duplicate now.
    again = await ledger.record(
        failed.ref, solved("8000000001", token="kept"), received_at=received
    )
    assert again.outcome is Outcome.DUPLICATE


async def test_a_result_received_after_the_operator_failed_the_task_is_a_dead_letter(
    ledger: Ledger, namespace: str
) -> None:
    failed = await operator_failed(ledger, namespace, "t6", "8000000002")
    recorded = await ledger.record(failed.ref, solved("8000000002", token="too-late"))
    assert recorded.outcome is Outcome.DEAD_LETTER
    assert recorded.reason is DeadLetterReason.TASK_FAILED
    after = await ledger.get_task(namespace, "t6")
    assert after is not None
    assert after.phase is Phase.FAILED


class _ByName:
    """The operator's task index reduced to what requeue asks: candidates by name."""

    def candidates(
        self, namespace: str, *, name: str | None, provider_task_id: str | None
    ) -> list[str]:
        return [name] if name else []


def _letter_for(task: TaskView, *, received: dt.datetime, token: str) -> LetterView:
    return LetterView.from_body(
        {
            "metadata": {
                "namespace": task.ref.namespace,
                "name": "l",
                "uid": "u",
                "resourceVersion": "1",
            },
            "spec": {
                "reason": "TaskNotFound",
                "payload": {"code": token, "source": "get"},
                "receivedAt": model.format_time(received),
                "taskRef": {"name": task.ref.name, "uid": task.ref.uid},
                "providerTaskId": task.provider_task_id,
            },
        }
    )


async def test_a_letter_received_before_the_operator_failed_its_task_is_applied_by_requeue(
    ledger: Ledger, namespace: str
) -> None:
    failed = await operator_failed(ledger, namespace, "t7", "8000000003")
    assert failed.finished_at is not None
    letter = _letter_for(failed, received=failed.finished_at - dt.timedelta(seconds=1), token="in")
    attempt = await requeue(ledger, letter, lookup=_ByName())
    assert attempt.outcome is RequeueOutcome.APPLIED
    after = await ledger.get_task(namespace, "t7")
    assert after is not None
    assert (after.phase, after.solution_token) == (Phase.SOLVED, "in")


async def test_a_letter_received_after_the_operator_failed_its_task_expires_at_once(
    ledger: Ledger, namespace: str
) -> None:
    failed = await operator_failed(ledger, namespace, "t8", "8000000004")
    assert failed.finished_at is not None
    letter = _letter_for(failed, received=failed.finished_at + dt.timedelta(seconds=1), token="x")
    attempt = await requeue(ledger, letter, lookup=_ByName())
    assert attempt.outcome is RequeueOutcome.EXPIRED
    assert attempt.status["phase"] == "Expired"
    assert "already failed (DeadlineExceeded)" in attempt.status["message"]
