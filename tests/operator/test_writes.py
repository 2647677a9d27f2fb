"""What a task costs the API server: no managedFields kept, no Events on the happy path.

A finished task is read back from the real API server (and its Events listed) after the real
operator process ran it, once by pingback and once by fallback poll. The byte and write figures
themselves are a benchmark (``bench/writes.py``); these tests pin the behaviour behind them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from captchatask.emulator.server import RunningEmulator

#: Normal Events every task would get on the happy path (one write each).
ROUTINE_REASONS = ("Submitted", "Solved")
#: A hang guard for the background Event poster, not a timing assertion.
EVENT_PATIENCE_SECONDS = 30.0


def _managed(tasks: list[dict[str, Any]]) -> list[Any]:
    return [t["metadata"].get("managedFields") for t in tasks if t["metadata"].get("managedFields")]


async def test_a_task_finished_by_pingback_keeps_no_managed_fields_and_no_routine_events(
    harness: Any, receiver: Any, emulator: RunningEmulator
) -> None:
    await harness.secret()
    await harness.provider(emulator, public_url=receiver.base_url, callback_timeout=30)
    operator = harness.start_operator()
    await harness.started(operator)

    names = await harness.tasks(4)
    tasks = await harness.wait_terminal(len(names))

    assert {t["status"]["deliveredBy"] for t in tasks} == {"pingback"}
    # The status the ledger, columns and docs read is all there...
    assert all(t["status"]["providerTaskId"] and t["status"]["finishedAt"] for t in tasks)
    # ...but the API server keeps no field-ownership bookkeeping for it.
    assert _managed(tasks) == []
    assert [e for e in await harness.events() if e["reason"] in ROUTINE_REASONS] == []
    assert operator.metric("captchatask_events_skipped_total", reason="Submitted") == len(names)


async def test_a_task_recovered_by_poll_keeps_no_managed_fields_and_no_routine_events(
    harness: Any, emulator: RunningEmulator
) -> None:
    await harness.secret()
    await harness.provider(emulator, callback_timeout=1)
    operator = harness.start_operator()
    await harness.started(operator)

    names = await harness.tasks(3)
    tasks = await harness.wait_terminal(len(names))

    assert {t["status"]["deliveredBy"] for t in tasks} == {"poll"}
    assert _managed(tasks) == []
    assert [e for e in await harness.events() if e["reason"] in ROUTINE_REASONS] == []


async def test_routine_events_and_managed_fields_are_kept_when_asked(
    harness: Any, emulator: RunningEmulator
) -> None:
    await harness.secret()
    await harness.provider(emulator, callback_timeout=1)
    operator = harness.start_operator("--routine-events", "--no-strip-managed-fields")
    await harness.started(operator)

    names = await harness.tasks(2)
    tasks = await harness.wait_terminal(len(names))

    assert len(_managed(tasks)) == len(names)
    # Events are posted in the background after the ledger write: the last one may still be on
    # its way when the task reads as finished.
    deadline = time.monotonic() + EVENT_PATIENCE_SECONDS
    while True:
        reasons = [e["reason"] for e in await harness.events()]
        if reasons.count("Solved") >= len(names) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert reasons.count("Submitted") == len(names)
    assert reasons.count("Solved") == len(names)
