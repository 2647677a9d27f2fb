"""Regressions the chaos suite found, each reduced to a small deterministic reproduction.

Every test here started as a failing chaos run (its seed is named) and keeps the bug from
coming back after it is fixed. They run the whole stack (:class:`captchatask.stack.Stack`) with
one fault, not all of them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from captchatask import model
from captchatask.stack import Stack, StackConfig

pytestmark = [pytest.mark.controlplane, pytest.mark.slow]

#: Hang guard for the whole system to finish a handful of tasks (not a timing assertion).
PATIENCE_SECONDS = 90.0
TERMINAL = {str(model.Phase.SOLVED), str(model.Phase.FAILED)}


def _task(name: str) -> dict[str, Any]:
    return {
        "apiVersion": model.API_VERSION,
        "kind": model.TASK_KIND,
        "metadata": {"name": name},
        "spec": {
            "type": "Turnstile",
            "siteKey": "0x4AAAAAAABkMYinukE8nzYS",
            "pageURL": "https://shop.example.com/login",
        },
    }


def _wait_terminal(stack: Stack, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + PATIENCE_SECONDS
    while True:
        items: list[dict[str, Any]] = stack.get_json("ctask")["items"]
        done = [t for t in items if (t.get("status") or {}).get("phase") in TERMINAL]
        if len(done) == count:
            return items
        if time.monotonic() > deadline:
            pytest.fail(f"only {len(done)}/{count} tasks finished")
        time.sleep(0.5)


def test_a_short_burst_of_html_502_on_res_php_does_not_park_every_task(tmp_path: Path) -> None:
    """Chaos seed 1 (``--profile smoke --seed 1``): a res.php 502 burst stalled all tasks.

    The first provider check (``threadsinfo`` on ``res.php``) meets a burst of three HTML 502
    pages, exactly what CaptchaAI's nginx serves for a few seconds at a time. That is a
    transient error, yet the provider was marked ``Ready=False`` (``Unreachable``) and every
    task parked (``ProviderNotReady``) until the next check, although ``in.php`` worked.
    """
    config = StackConfig(
        workdir=tmp_path,
        namespace="burst",
        emulator_args=["--solve-time-scale", "0.05", "--res-502-burst", "3"],
        provider_spec={"polling": {"callbackTimeoutSeconds": 3, "intervalSeconds": 5}},
    )
    with Stack(config) as stack:
        stack.apply([_task(f"burst-{i}") for i in range(5)])
        _wait_terminal(stack, 5)
        assert stack.emulator("summary")["totals"]["html_502_injected"] == 3
        reasons = [event["reason"] for event in stack.get_json("events")["items"]]
    assert "Unreachable" not in reasons
    assert "ProviderNotReady" not in reasons
