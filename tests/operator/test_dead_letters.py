"""The dead-letter requeue loop end to end: real kube-apiserver, emulator, operator process.

Each test runs its own operator subprocess on a fresh namespace. Letters are created the way
the sidecar (or the operator's poller) writes them; the operator must find their task, apply
them through the ledger, expire them, honour a human's redrive, delete them after the TTL and
export the DLQ depth from the objects themselves. Waits are bounded polls of the API server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import random
import re
import types
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from tests.operator.conftest import serving

from captchatask import dlq, kube, model
from captchatask.deadletters import RequeueOutcome
from captchatask.emulator.config import DEFAULT_API_KEY, EmulatorConfig
from captchatask.emulator.server import RunningEmulator, run_emulator
from captchatask.model import DeadLetterPhase, DeadLetterReason

SITE_KEY = "6Le-wvkSAAAAAPBMRTvw0Q4Muexq9bi0DJwx_mJ-"
PAGE_URL = "https://example.com/login"


def _status(obj: dict[str, Any] | None) -> dict[str, Any]:
    return dict((obj or {}).get("status") or {})


async def create_letter(
    harness: Any,
    name: str,
    *,
    pid: str | None,
    code: str = "03AF-letter-token",
    task: str | None = None,
    reason: str = "TaskNotFound",
    status: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Create a letter as a receiver would (then, optionally, stage its status)."""
    spec: dict[str, Any] = {
        "reason": reason,
        "message": "staged by the test",
        "payload": {"code": code, "source": "get"},
        "receivedAt": model.format_time(dt.datetime.now(dt.UTC)),
        "receivedBy": "test",
    }
    if pid:
        spec["providerTaskId"] = pid
    if task:
        spec["taskRef"] = {"name": task, "uid": str(uuid.uuid4())}
    body = {
        "apiVersion": model.API_VERSION,
        "kind": model.DEAD_LETTER_KIND,
        "metadata": {"name": name, "namespace": harness.namespace},
        "spec": spec,
    }
    created = await harness.client.create(kube.DEAD_LETTERS, harness.namespace, body)
    if status is not None:
        created = await harness.client.patch(
            kube.DEAD_LETTERS, harness.namespace, name, {"status": status}, subresource="status"
        )
    return dict(created)


async def get_letter(harness: Any, name: str) -> dict[str, Any] | None:
    try:
        return dict(await harness.client.get(kube.DEAD_LETTERS, harness.namespace, name))
    except kube.ApiError as exc:
        if exc.not_found:
            return None
        raise


async def all_letters(harness: Any) -> list[dict[str, Any]]:
    listed = await harness.client.list(kube.DEAD_LETTERS, harness.namespace)
    return list(listed.get("items") or [])


async def wait_letter(harness: Any, name: str, phase: str) -> dict[str, Any]:
    async def reached() -> bool:
        return _status(await get_letter(harness, name)).get("phase") == phase

    await harness.wait_until(reached, what=f"letter {name} to be {phase}")
    letter = await get_letter(harness, name)
    assert letter is not None
    return letter


async def submit_to_emulator(emulator: RunningEmulator) -> str:
    """Submit a task the way an app does on its own (no pingback): the adopted pattern."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{emulator.base_url}/in.php",
            data={
                "key": DEFAULT_API_KEY,
                "method": "userrecaptcha",
                "googlekey": SITE_KEY,
                "pageurl": PAGE_URL,
                "json": "1",
            },
        ) as response,
    ):
        reply = await response.json()
    assert reply["status"] == 1, reply
    return str(reply["request"])


async def solved(emulator: RunningEmulator, ids: list[str]) -> bool:
    """Whether the emulator has answers for all these provider tasks (a poll would find them)."""
    finished = {t.task_id for t in emulator.tasks() if t.finished}
    return finished.issuperset(ids)


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one metric in an exposition, keyed by their sorted labels."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1 :].rsplit("} ", 1)
            out[tuple(sorted(re.findall(r'(\w+)="([^"]*)"', labels)))] = float(value)
    return out


async def letter_events(harness: Any, reason: str) -> list[dict[str, Any]]:
    return [
        e
        for e in await harness.events(reason)
        if e["involvedObject"]["kind"] == model.DEAD_LETTER_KIND
    ]


async def test_a_pingback_for_a_task_created_later_is_requeued_onto_it(
    harness: Any, receiver: Any, emulator: RunningEmulator
) -> None:
    await harness.secret()
    # Pingbacks configured, long callback timeout: no poll interferes with the requeue.
    await harness.provider(emulator, public_url=receiver.base_url, callback_timeout=120)
    # A back-off far beyond any wait here: only the task's appearance can wake the letter.
    operator = harness.start_operator(
        "--dead-letter-retry-base-seconds", "900", "--dead-letter-retry-max-seconds", "900"
    )
    await harness.started(operator)
    await create_letter(harness, "early", pid="7000000001", task="later", code="03AF-early")

    async def tried_once() -> bool:
        return int(_status(await get_letter(harness, "early")).get("attempts", 0)) >= 1

    await harness.wait_until(tried_once, what="a first, unmatched attempt")
    assert _status(await get_letter(harness, "early"))["phase"] == "Pending"

    created = await harness.task("later", providerTaskId="7000000001")
    letter = await wait_letter(harness, "early", "Requeued")
    task = await harness.get("later")

    assert _status(task)["phase"] == "Solved"
    assert _status(task)["deliveredBy"] == "deadLetter"
    assert _status(task)["solution"]["token"] == "03AF-early"
    assert _status(letter)["appliedTo"] == {"name": "later", "uid": created["metadata"]["uid"]}
    assert _status(letter)["attempts"] == 2
    assert "nextAttemptAt" not in _status(letter)
    assert operator.metric("captchatask_dead_letter_requeues_total", outcome="applied") == 1
    assert operator.metric("captchatask_dead_letter_requeues_total", outcome="no_match") >= 1

    async def events_posted() -> bool:
        applied = await harness.events("DeadLetterApplied")
        return bool(applied) and bool(await letter_events(harness, "Requeued"))

    await harness.wait_until(events_posted, what="DeadLetterApplied and Requeued events")
    assert emulator.summary()["totals"].get("in_requests", 0) == 0


async def test_a_letter_for_a_deleted_task_expires_with_its_reason(
    harness: Any, receiver: Any, emulator: RunningEmulator
) -> None:
    await harness.secret()
    await harness.provider(emulator, public_url=receiver.base_url, callback_timeout=120)
    operator = harness.start_operator(
        "--dead-letter-max-attempts",
        "3",
        "--dead-letter-retry-base-seconds",
        "0.2",
        "--dead-letter-retry-max-seconds",
        "0.5",
    )
    await harness.started(operator)
    doomed = await harness.task("doomed", external=True)
    await harness.client.delete(kube.TASKS, harness.namespace, "doomed")
    await harness.client.create(
        kube.DEAD_LETTERS,
        harness.namespace,
        {
            "apiVersion": model.API_VERSION,
            "kind": model.DEAD_LETTER_KIND,
            "metadata": {"name": "orphan", "namespace": harness.namespace},
            "spec": {
                "reason": "TaskNotFound",
                "taskRef": {"name": "doomed", "uid": doomed["metadata"]["uid"]},
                "providerTaskId": "7100000001",
                "payload": {"code": "03AF-orphan", "source": "get"},
                "receivedAt": model.format_time(dt.datetime.now(dt.UTC)),
            },
        },
    )

    letter = await wait_letter(harness, "orphan", "Expired")

    status = _status(letter)
    assert status["attempts"] == 3
    assert status["message"] == "no matching task after 3 attempts (TaskNotFound)"
    assert operator.metric("captchatask_dead_letter_requeues_total", outcome="no_match") == 2
    assert operator.metric("captchatask_dead_letter_requeues_total", outcome="expired") == 1
    assert operator.metric("captchatask_dead_letters", reason="TaskNotFound", phase="Expired") == 1

    async def warned() -> bool:
        return bool(await letter_events(harness, "Expired"))

    await harness.wait_until(warned, what="an Expired event on the letter")


async def test_a_redrive_through_the_cli_makes_the_operator_retry_an_expired_letter(
    harness: Any, receiver: Any, emulator: RunningEmulator
) -> None:
    await harness.secret()
    await harness.provider(emulator, public_url=receiver.base_url, callback_timeout=120)
    expired = {"phase": "Expired", "attempts": 12, "message": "gave up"}
    await create_letter(harness, "stuck", pid="7200000001", code="03AF-stuck", status=expired)
    operator = harness.start_operator()
    await harness.started(operator)
    created = await harness.task("owner", providerTaskId="7200000001")

    async def adopted() -> bool:
        return _status(await harness.get("owner")).get("phase") == "Submitted"

    await harness.wait_until(adopted, what="the adopted task")
    assert _status(await get_letter(harness, "stuck"))["phase"] == "Expired"  # left alone

    out = io.StringIO()
    code = await asyncio.to_thread(
        dlq.run_for_test,
        ["--kubeconfig", harness.env["KUBECONFIG"], "-n", harness.namespace, "redrive", "stuck"],
        out=out,
    )
    assert code == 0, out.getvalue()
    letter = await wait_letter(harness, "stuck", "Requeued")
    task = await harness.get("owner")

    assert _status(letter)["attempts"] == 1
    assert "redrivenAt" in _status(letter)
    assert _status(letter)["appliedTo"]["uid"] == created["metadata"]["uid"]
    assert _status(task)["phase"] == "Solved"
    assert _status(task)["deliveredBy"] == "deadLetter"
    assert _status(task)["solution"]["token"] == "03AF-stuck"


async def test_requeued_letters_are_deleted_after_their_ttl_and_only_those(
    harness: Any,
) -> None:
    now = dt.datetime.now(dt.UTC)
    old = {"phase": "Requeued", "requeuedAt": model.format_time(now - dt.timedelta(hours=2))}
    fresh = {"phase": "Requeued", "requeuedAt": model.format_time(now)}
    expired = {"phase": "Expired", "attempts": 12}
    await create_letter(harness, "old", pid="1", status=old)
    await create_letter(harness, "fresh", pid="2", status=fresh)
    await create_letter(harness, "expired", pid="3", status=expired)
    operator = harness.start_operator()
    await harness.started(operator)

    async def deleted() -> bool:
        return await get_letter(harness, "old") is None

    await harness.wait_until(deleted, what="the TTL deletion")
    remaining = sorted(item["metadata"]["name"] for item in await all_letters(harness))
    assert remaining == ["expired", "fresh"]


async def test_dead_letter_metrics_match_the_objects_after_an_operator_restart(
    harness: Any, receiver: Any, emulator: RunningEmulator
) -> None:
    await harness.secret()
    await harness.provider(emulator, public_url=receiver.base_url, callback_timeout=120)
    # Long back-offs: after its first attempt no letter changes while we compare.
    flags = ("--dead-letter-retry-base-seconds", "600", "--dead-letter-retry-max-seconds", "600")
    now = model.format_time(dt.datetime.now(dt.UTC))
    staged: list[tuple[str, str, dict[str, Any] | None]] = [
        ("TaskNotFound", "p1", None),
        ("TaskNotFound", "p2", None),
        ("TaskNotFound", "p3", None),
        ("TaskRecreated", "r1", None),
        ("TaskRecreated", "r2", None),
        ("ProviderTaskMismatch", "m1", {"phase": "Expired", "attempts": 12}),
        ("TaskNotFound", "q1", {"phase": "Requeued", "requeuedAt": now}),
        ("LedgerRejected", "q2", {"phase": "Requeued", "requeuedAt": now}),
    ]
    for index, (reason, name, status) in enumerate(staged):
        await create_letter(harness, name, pid=f"73{index:08d}", reason=reason, status=status)
    first = harness.start_operator(*flags)
    await harness.started(first)

    async def all_tried() -> bool:
        letters = await all_letters(harness)
        pending = [x for x in letters if _status(x).get("phase", "Pending") == "Pending"]
        return all(int(_status(x).get("attempts", 0)) >= 1 for x in pending)

    await harness.wait_until(all_tried, what="a first attempt on every pending letter")
    first.kill()
    # Written while no operator runs: a restarted operator must count them too.
    await create_letter(harness, "while-down-1", pid="7400000001", reason="LedgerRejected")
    await create_letter(
        harness,
        "while-down-2",
        pid="7400000002",
        reason="TaskRecreated",
        status={"phase": "Expired"},
    )
    second = harness.start_operator(*flags)
    await harness.started(second)

    text = second.metrics_text()
    objects = Counter(
        (item["spec"]["reason"], _status(item).get("phase", "Pending"))
        for item in await all_letters(harness)
    )
    # Every reason x phase of the letters' namespace, labelled with it (whose letters they are).
    ns = ("namespace", harness.namespace)
    exported = {k: v for k, v in samples(text, "captchatask_dead_letters").items() if ns in k}
    expected = {
        (ns, ("phase", str(phase)), ("reason", str(reason))): float(objects[(reason, phase)])
        for reason in DeadLetterReason
        for phase in DeadLetterPhase
    }
    assert exported == expected
    assert sum(objects.values()) == len(staged) + 2
    requeues = samples(text, "captchatask_dead_letter_requeues_total")
    assert {k for k in requeues if ns in k} == {(ns, ("outcome", str(o))) for o in RequeueOutcome}


# -- a poll result whose task vanished becomes a dead letter -----------------------------------


@dataclass
class Gate:
    """A transparent proxy to the emulator that holds ``res.php?action=get`` until opened."""

    upstream: str
    url: str = ""
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    held: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def gate(emulator: RunningEmulator) -> AsyncIterator[Gate]:
    state = Gate(upstream=emulator.base_url)
    session = aiohttp.ClientSession()

    async def forward(request: web.Request) -> web.Response:
        raw = await request.read()
        form = await request.post() if request.method == "POST" else request.query
        if request.path.endswith("/res.php") and form.get("action") == "get":
            state.held.set()
            await state.opened.wait()
        headers = {"Content-Type": request.headers.get("Content-Type", "")}
        async with session.request(
            request.method, state.upstream + request.path_qs, data=raw, headers=headers
        ) as upstream:
            body = await upstream.read()
            return web.Response(
                body=body,
                status=upstream.status,
                headers={"Content-Type": upstream.headers.get("Content-Type", "text/plain")},
            )

    try:
        async with serving(forward) as state.url:
            try:
                yield state
            finally:
                state.opened.set()
    finally:
        await session.close()


async def test_a_poll_result_for_a_task_deleted_meanwhile_becomes_a_dead_letter(
    harness: Any, receiver: Any, emulator: RunningEmulator, gate: Gate
) -> None:
    emulator.set_faults(pingback_drop_rate=1.0)
    await harness.secret()
    # The operator talks to the solver through the gate; the app submits directly.
    through_gate = types.SimpleNamespace(base_url=gate.url)
    await harness.provider(through_gate, public_url=receiver.base_url, callback_timeout=1)
    operator = harness.start_operator()
    await harness.started(operator)
    provider_task_id = await submit_to_emulator(emulator)
    await harness.wait_until(lambda: solved(emulator, [provider_task_id]), what="the solve")
    created = await harness.task("vanishing", providerTaskId=provider_task_id)

    await asyncio.wait_for(gate.held.wait(), timeout=30)  # the poll is in flight
    await harness.client.delete(kube.TASKS, harness.namespace, "vanishing")
    gate.opened.set()

    async def lettered() -> bool:
        return bool(await all_letters(harness))

    await harness.wait_until(lettered, what="a dead letter for the poll result")
    (letter,) = await all_letters(harness)
    tokens = {t.task_id: t.token for t in emulator.tasks()}

    spec = letter["spec"]
    assert spec["reason"] == "TaskNotFound"
    assert spec["payload"]["source"] == "poll"
    assert spec["payload"]["code"] == tokens[provider_task_id]
    assert spec["providerTaskId"] == provider_task_id
    assert spec["taskRef"] == {"name": "vanishing", "uid": created["metadata"]["uid"]}
    assert spec["receivedBy"].startswith("captchatask-operator")


# -- requeue racing a fallback poll, many times -----------------------------------------------


async def test_requeue_and_fallback_poll_racing_yield_exactly_one_outcome_per_task(
    harness: Any, receiver: Any
) -> None:
    count = 30
    config = EmulatorConfig(seed=21, threads=200, solve_time_scale=0.001)
    async with run_emulator(config) as emulator:
        emulator.set_faults(pingback_drop_rate=1.0)
        await harness.secret()
        await harness.provider(emulator, public_url=receiver.base_url, callback_timeout=1)
        operator = harness.start_operator("--poll-status-every", "1")
        await harness.started(operator)
        ids = [await submit_to_emulator(emulator) for _ in range(count)]
        await harness.wait_until(lambda: solved(emulator, ids), what="the solves")
        rng = random.Random(4)
        # Each letter lands around its task's first poll (created + 1 s), before or after it.
        offsets = [rng.uniform(0.5, 1.5) for _ in range(count)]

        async def race(index: int) -> None:
            await harness.task(f"r{index:03d}", providerTaskId=ids[index])
            await asyncio.sleep(offsets[index])
            await create_letter(
                harness, f"l{index:03d}", pid=ids[index], code=f"03AF-letter-{index}"
            )

        await asyncio.gather(*(race(i) for i in range(count)))
        tasks = await harness.wait_terminal(count)

        async def settled() -> bool:
            letters = await all_letters(harness)
            return bool(sum(_status(x).get("phase") == "Requeued" for x in letters) == count)

        await harness.wait_until(settled, what="every letter to be Requeued")
        letters = {x["metadata"]["name"]: x for x in await all_letters(harness)}
        tokens = {t.task_id: t.token for t in emulator.tasks()}

    by: Counter[str] = Counter()
    for task in tasks:
        status = _status(task)
        index = int(task["metadata"]["name"][1:])
        letter = letters[f"l{index:03d}"]
        assert status["phase"] == "Solved"
        by[status["deliveredBy"]] += 1
        expected = (
            f"03AF-letter-{index}" if status["deliveredBy"] == "deadLetter" else tokens[ids[index]]
        )
        assert status["solution"]["token"] == expected
        assert _status(letter)["appliedTo"]["uid"] == task["metadata"]["uid"]
        applied = _status(letter)["message"].startswith("applied")
        assert applied == (status["deliveredBy"] == "deadLetter")
    applied_total = operator.metric("captchatask_dead_letter_requeues_total", outcome="applied")
    recovered = operator.metric("captchatask_fallback_recoveries_total", provider="default")
    assert by["deadLetter"] + by["poll"] == count
    assert applied_total == by["deadLetter"]
    assert recovered == by["poll"]
    print(f"\nrequeue/poll race: {dict(by)}")
