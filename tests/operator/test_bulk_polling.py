"""Bulk polling end to end: a real operator, API server and emulator, 2captcha dialect.

With every pingback dropped, every task must be recovered by polling, and the polls of tasks
that fall due together must share ``res.php`` requests: the operator's batch-size histogram
must count far fewer requests than tasks, and the emulator must have served bulk ``ids=``
requests. The operator runs with the production batching window (the harness default is tiny).
"""

from __future__ import annotations

from typing import Any

from captchatask.emulator.server import RunningEmulator
from captchatask_operator.settings import DEFAULT_POLL_BATCH_WINDOW

TASKS = 20


def _status(task: dict[str, Any]) -> dict[str, Any]:
    return dict(task.get("status") or {})


async def test_dropped_pingbacks_are_recovered_by_shared_bulk_requests(
    harness: Any, receiver: Any, emulator: RunningEmulator
) -> None:
    emulator.set_faults(pingback_drop_rate=1.0)
    await harness.secret()
    await harness.provider(
        emulator, public_url=receiver.base_url, callback_timeout=2, dialect="2captcha"
    )
    operator = harness.start_operator("--poll-batch-window", str(DEFAULT_POLL_BATCH_WINDOW))
    await harness.started(operator)

    names = await harness.tasks(TASKS)
    tasks = await harness.wait_terminal(len(names))

    assert {_status(t)["phase"] for t in tasks} == {"Solved"}
    assert {_status(t)["deliveredBy"] for t in tasks} == {"poll"}
    requests = operator.metric("captchatask_poll_batch_size_count", provider="default")
    ids = operator.metric("captchatask_poll_batch_size_sum", provider="default")
    totals = emulator.summary()["totals"]
    assert 1 <= requests < TASKS / 2
    assert ids >= TASKS
    assert 1 <= totals["res_bulk_requests"] <= requests
    assert operator.metric("captchatask_fallback_recoveries_total", provider="default") == TASKS
