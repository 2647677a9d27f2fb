"""The operator end to end: real kube-apiserver, emulator, pingback receiver, operator process.

Each test starts its own operator subprocess watching a fresh namespace. Waits are bounded polls
of the API server (a bound on failure, not a timing assertion). The one timing property that
*is* asserted (fallback recovery within ``callbackTimeoutSeconds + 2 s``) is read from the
timestamps the operator itself wrote into the ledger.
"""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

import aiohttp

from captchatask import kube, model
from captchatask.emulator.config import DEFAULT_API_KEY, EmulatorConfig
from captchatask.emulator.server import RunningEmulator, run_emulator


def _status(task: dict[str, Any]) -> dict[str, Any]:
    return dict(task.get("status") or {})


def _condition(task: dict[str, Any], type_: str) -> dict[str, Any]:
    for condition in _status(task).get("conditions") or []:
        if condition["type"] == type_:
            return dict(condition)
    return {}


def _seconds(later: str, earlier: str) -> float:
    a, b = model.parse_time(later), model.parse_time(earlier)
    assert a is not None
    assert b is not None
    return (a - b).total_seconds()


def _api_calls_per_task(emulator: RunningEmulator, tasks: int) -> float:
    totals = emulator.summary()["totals"]
    calls: int = totals.get("in_requests", 0) + totals.get("res_requests", 0)
    return calls / tasks


async def test_tasks_are_submitted_once_and_solved_by_pingback(
    harness: Any, receiver: Any, emulator: RunningEmulator
) -> None:
    await harness.secret()
    await harness.provider(emulator, public_url=receiver.base_url, callback_timeout=30)
    operator = harness.start_operator("--routine-events")  # the Submitted Events are checked
    await harness.started(operator)

    names = await harness.tasks(10)
    tasks = await harness.wait_terminal(len(names))

    assert {_status(t)["phase"] for t in tasks} == {"Solved"}
    assert {_status(t)["deliveredBy"] for t in tasks} == {"pingback"}
    assert receiver.outcomes["recorded"] == len(names)
    per_uid = harness.per_uid(emulator)
    assert sorted(per_uid) == sorted(t["metadata"]["uid"] for t in tasks)
    assert set(per_uid.values()) == {1}
    # No label PATCH per task (BENCH-3/5): the id lives in status, the operator's index finds it.
    assert all(
        model.PROVIDER_TASK_ID_LABEL not in (t["metadata"].get("labels") or {}) for t in tasks
    )
    assert _condition(tasks[0], "Submitted")["status"] == "True"
    assert _condition(tasks[0], "Submitted")["observedGeneration"] == 1
    await harness.wait_until(
        lambda: _has_events(harness, "Submitted", len(names)), what="Submitted events"
    )
    assert operator.metric("captchatask_submissions_total", outcome="submitted") == len(names)
    assert operator.metric("captchatask_provider_ready", provider="default") == 1
    print(f"\nAPI calls per task at 0% pingback loss: {_api_calls_per_task(emulator, 10):.2f}")


async def _has_events(harness: Any, reason: str, count: int) -> bool:
    return len(await harness.events(reason)) >= count


async def test_every_pingback_dropped_is_recovered_by_polling_within_threshold_plus_2s(
    harness: Any, receiver: Any, emulator: RunningEmulator
) -> None:
    emulator.set_faults(pingback_drop_rate=1.0)
    await harness.secret()
    await harness.provider(emulator, public_url=receiver.base_url, callback_timeout=2)
    operator = harness.start_operator()
    await harness.started(operator)

    names = await harness.tasks(20)
    tasks = await harness.wait_terminal(len(names))

    assert {_status(t)["phase"] for t in tasks} == {"Solved"}
    assert {_status(t)["deliveredBy"] for t in tasks} == {"poll"}
    for task in tasks:
        status = _status(task)
        assert _seconds(status["finishedAt"], status["submittedAt"]) <= 2 + 2
    assert sum(receiver.outcomes.values()) == 0
    assert operator.metric("captchatask_fallback_recoveries_total", provider="default") == 20
    assert operator.metric("captchatask_fallback_polls_total", outcome="solved") == 20
    assert set(harness.per_uid(emulator).values()) == {1}
    print(f"\nAPI calls per task at 100% pingback loss: {_api_calls_per_task(emulator, 20):.2f}")


async def test_an_unsolvable_task_fails_with_the_provider_code(harness: Any, receiver: Any) -> None:
    config = EmulatorConfig(seed=3, solve_time_scale=0.01, unsolvable_rate=1.0)
    async with run_emulator(config) as emulator:
        emulator.set_faults(pingback_drop_rate=1.0)  # the failure must come through a poll
        await harness.secret()
        await harness.provider(emulator, public_url=receiver.base_url, callback_timeout=1)
        operator = harness.start_operator()
        await harness.started(operator)

        await harness.tasks(3)
        tasks = await harness.wait_terminal(3)

    assert {_status(t)["phase"] for t in tasks} == {"Failed"}
    assert {_status(t)["failure"]["code"] for t in tasks} == {"ERROR_CAPTCHA_UNSOLVABLE"}
    assert _condition(tasks[0], "Complete")["reason"] == "CaptchaUnsolvable"
    assert (
        operator.metric("captchatask_permanent_failures_total", code="ERROR_CAPTCHA_UNSOLVABLE")
        == 3
    )


async def test_thread_cap_queues_tasks_and_submits_them_oldest_first(
    harness: Any, receiver: Any, emulator: RunningEmulator
) -> None:
    await harness.secret()
    await harness.provider(
        emulator, public_url=receiver.base_url, callback_timeout=30, max_in_flight=1
    )
    operator = harness.start_operator()
    await harness.started(operator)

    for name in ("t000", "t001", "t002", "t003"):
        await harness.task(name)
    tasks = sorted(await harness.wait_terminal(4), key=lambda t: t["metadata"]["name"])

    assert {_status(t)["phase"] for t in tasks} == {"Solved"}
    for earlier, later in itertools.pairwise(tasks):
        # In order, and never two in flight: each starts only after the previous one ended.
        assert _seconds(_status(later)["submittedAt"], _status(earlier)["finishedAt"]) >= 0
    assert all("queuedAt" in _status(t) for t in tasks[1:])
    assert len(await harness.events("Queued")) >= 3


async def test_a_wrong_key_parks_tasks_until_the_secret_is_fixed(
    harness: Any, receiver: Any, emulator: RunningEmulator
) -> None:
    await harness.secret(api_key="x" * 32)
    await harness.provider(emulator, public_url=receiver.base_url, callback_timeout=30)
    operator = harness.start_operator()
    await harness.started(operator)
    await harness.task("parked")

    async def parked() -> bool:
        task = await harness.get("parked")
        return bool(_condition(task or {}, "Submitted").get("reason") == "ProviderNotReady")

    await harness.wait_until(parked, what="the task to be parked")
    provider = await harness.client.get(kube.PROVIDERS, harness.namespace, "default")
    ready = next(c for c in provider["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidKey")
    assert emulator.summary()["totals"].get("in_requests", 0) == 0
    assert operator.metric("captchatask_provider_ready", provider="default") == 0
    task = await harness.get("parked")
    assert _status(task)["phase"] == "Pending"
    assert "submission" not in _status(task)  # no attempt was burned

    await harness.secret()  # the fixed key
    tasks = await harness.wait_terminal(1)

    assert _status(tasks[0])["phase"] == "Solved"
    assert _status(tasks[0])["submission"]["attempts"] == 1


async def test_sigkill_mid_flight_loses_nothing_and_submits_nothing_twice(
    harness: Any, receiver: Any
) -> None:
    config = EmulatorConfig(seed=11, threads=200, solve_time_scale=0.1)  # v2: 2-6 s
    async with run_emulator(config) as emulator:
        emulator.set_faults(pingback_drop_rate=0.5)
        await harness.secret()
        await harness.provider(emulator, public_url=receiver.base_url, callback_timeout=3)
        first = harness.start_operator()
        await harness.started(first)
        await harness.tasks(30, prefix="a")

        async def all_submitted() -> bool:
            phases = await harness.phases()
            return bool(phases["Submitted"] + phases["Solved"] + phases["Failed"] == 30)

        await harness.wait_until(all_submitted, what="30 submitted tasks")
        first.kill()
        await harness.tasks(10, prefix="b")  # created while no operator runs
        second = harness.start_operator()
        await harness.started(second)
        tasks = await harness.wait_terminal(40)
        per_uid = harness.per_uid(emulator)

    assert {_status(t)["phase"] for t in tasks} == {"Solved"}
    assert sorted(per_uid) == sorted(t["metadata"]["uid"] for t in tasks)
    assert set(per_uid.values()) == {1}


async def test_a_crash_after_in_php_is_healed_by_the_pingback_without_resubmitting(
    harness: Any, receiver: Any, emulator: RunningEmulator
) -> None:
    """Stage the crash window: intent recorded, in.php called, provider id never written."""
    await harness.secret()
    await harness.provider(emulator, public_url=receiver.base_url, callback_timeout=5)
    created = await harness.task("crashed")
    ref = model.TaskRef(harness.namespace, "crashed", created["metadata"]["uid"])
    intent_at = model.format_time(dt.datetime.now(dt.UTC))
    await harness.set_status(
        "crashed", {"phase": "Pending", "submission": {"intentAt": intent_at, "attempts": 1}}
    )
    # What the crashed operator's in.php call did: a provider task with the signed pingback URL.
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{emulator.base_url}/in.php",
            data={
                "key": DEFAULT_API_KEY,
                "method": "userrecaptcha",
                "googlekey": created["spec"]["siteKey"],
                "pageurl": created["spec"]["pageURL"],
                "pingback": harness.signer.url(receiver.base_url, ref),
                "json": "1",
            },
        ) as response,
    ):
        assert (await response.json())["status"] == 1
    operator = harness.start_operator()
    await harness.started(operator)

    tasks = await harness.wait_terminal(1)

    assert _status(tasks[0])["phase"] == "Solved"
    assert _status(tasks[0])["deliveredBy"] == "pingback"
    assert harness.per_uid(emulator)[ref.uid] == 1
    assert await harness.events("Resubmitting") == []


async def test_an_unresolved_intent_is_resubmitted_once_with_a_warning(
    harness: Any, receiver: Any, emulator: RunningEmulator
) -> None:
    """Stage the crash window where in.php never ran: after the grace, one resubmission."""
    await harness.secret()
    await harness.provider(emulator, public_url=receiver.base_url, callback_timeout=1)
    await harness.task("lost")
    intent_at = model.format_time(dt.datetime.now(dt.UTC))
    await harness.set_status(
        "lost", {"phase": "Pending", "submission": {"intentAt": intent_at, "attempts": 1}}
    )
    operator = harness.start_operator()
    await harness.started(operator)

    tasks = await harness.wait_terminal(1)

    assert _status(tasks[0])["phase"] == "Solved"
    assert _status(tasks[0])["submission"]["attempts"] == 2
    assert len(await harness.events("Resubmitting")) == 1
    assert sum(harness.per_uid(emulator).values()) == 1


async def test_pingback_and_poll_racing_yield_exactly_one_outcome_per_task(
    harness: Any, receiver: Any
) -> None:
    config = EmulatorConfig(seed=5, threads=200, solve_time_scale=0.001)
    async with run_emulator(config) as emulator:
        # Pingbacks land right around submittedAt + callbackTimeoutSeconds: the first poll.
        emulator.set_faults(pingback_delay=(0.9, 1.1), pingback_duplicate_rate=0.3)
        await harness.secret()
        await harness.provider(emulator, public_url=receiver.base_url, callback_timeout=1)
        operator = harness.start_operator()
        await harness.started(operator)

        names = await harness.tasks(40)
        tasks = await harness.wait_terminal(len(names))
        await emulator.drain_pingbacks()
        tokens = {t.task_id: t.token for t in emulator.tasks()}

    assert {_status(t)["phase"] for t in tasks} == {"Solved"}
    assert all(
        _status(t)["solution"]["token"] == tokens[_status(t)["providerTaskId"]] for t in tasks
    )
    by_poll = operator.metric("captchatask_fallback_recoveries_total", provider="default")
    assert receiver.outcomes["recorded"] + by_poll == len(names)
    assert receiver.outcomes["dead_lettered"] == 0
    print(f"\nrace: {receiver.outcomes} recovered by poll: {by_poll}")


async def test_deadline_fails_a_task_and_ttl_deletes_finished_ones(
    harness: Any, receiver: Any
) -> None:
    config = EmulatorConfig(seed=9, solve_time_scale=1.0)  # v2 takes 20-60 s: never in time
    async with run_emulator(config) as emulator:
        emulator.set_faults(pingback_drop_rate=1.0)
        await harness.secret()
        await harness.provider(emulator, public_url=receiver.base_url, callback_timeout=1)
        operator = harness.start_operator()
        await harness.started(operator)
        await harness.task("late", deadlineSeconds=10)
        # Adopted with an id the provider does not hold: fails at the first poll, then TTL.
        await harness.task("gone", providerTaskId="1234567890", ttlSecondsAfterFinished=1)

        async def gone_deleted() -> bool:
            return await harness.get("gone") is None

        await harness.wait_until(gone_deleted, what="the TTL deletion")
        tasks = await harness.wait_terminal(1)

    late = tasks[0]
    assert late["metadata"]["name"] == "late"
    assert _status(late)["phase"] == "Failed"
    assert _status(late)["failure"]["code"] == "DeadlineExceeded"
    assert _condition(late, "Complete")["reason"] == "DeadlineExceeded"
    assert _seconds(_status(late)["finishedAt"], late["metadata"]["creationTimestamp"]) >= 10
    failed = await harness.events("Failed")
    assert any("ResultExpired" in e["message"] for e in failed)
    assert operator.metric("captchatask_permanent_failures_total", code="ResultExpired") == 1


async def test_an_external_task_waits_for_its_id_then_is_polled(
    harness: Any, receiver: Any, emulator: RunningEmulator
) -> None:
    emulator.set_faults(pingback_drop_rate=1.0)
    await harness.secret()
    await harness.provider(emulator, public_url=receiver.base_url, callback_timeout=1)
    operator = harness.start_operator()
    await harness.started(operator)
    await harness.task("ext", external=True)

    async def awaiting() -> bool:
        task = await harness.get("ext")
        return bool(_condition(task or {}, "Submitted").get("reason") == "AwaitingProviderTaskId")

    await harness.wait_until(awaiting, what="the external task to wait")
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{emulator.base_url}/in.php",
            data={
                "key": DEFAULT_API_KEY,
                "method": "userrecaptcha",
                "googlekey": "6Le-wvkSAAAAAPBMRTvw0Q4Muexq9bi0DJwx_mJ-",
                "pageurl": "https://example.com/login",
                "json": "1",
            },
        ) as response,
    ):
        provider_task_id = str((await response.json())["request"])
    await harness.client.patch(
        kube.TASKS,
        harness.namespace,
        "ext",
        {"spec": {"providerTaskId": provider_task_id}},
    )

    tasks = await harness.wait_terminal(1)

    assert _status(tasks[0])["phase"] == "Solved"
    assert _status(tasks[0])["deliveredBy"] == "poll"
    assert _status(tasks[0])["providerTaskId"] == provider_task_id
    assert emulator.summary()["totals"]["in_requests"] == 1  # only the app's own submission
