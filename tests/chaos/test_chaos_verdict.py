"""The chaos verdict's "submitted twice", counted per CaptchaTask from the emulator's records.

Pure: a hand-made snapshot (one task, its provider tasks as the emulator reports them) goes
through :func:`bench.chaos.verdict.evaluate`; no stack is started. ``bench`` is a directory of
the repository, not an installed package, so it is imported from the repository root.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

UID = "0f0e0d0c-0b0a-4909-8807-060504030201"
URL = f"http://127.0.0.1:1/v1/pingback/chaos/t1/{UID}/{'A' * 24}"


def _provider_task(
    task_id: str, *, created: float, lost: str | None, delivered: float | None
) -> dict[str, Any]:
    return {
        "id": task_id,
        "state": "solved",
        "token": f"token-{task_id}",
        "created_at": created,
        "in_reply_lost": lost,
        "pingback": {
            "url": URL,
            "outcome": "delivered" if delivered else "dropped",
            "copies": 1,
            "attempts": [],
            "delivered_at": delivered,
        },
    }


@pytest.fixture
def verdict_module(repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(repo_root))
    return importlib.import_module("bench.chaos.verdict")


def _snapshot(
    verdict_module: ModuleType,
    emulator_tasks: list[dict[str, Any]],
    *,
    on_record: str,
    operator_kills: tuple[tuple[float, float], ...] = (),
) -> Any:
    task = {
        "metadata": {
            "name": "t1",
            "uid": UID,
            "creationTimestamp": "2026-12-06T00:00:00Z",
        },
        "spec": {"deadlineSeconds": 600},
        "status": {
            "phase": "Solved",
            "providerTaskId": on_record,
            "deliveredBy": "poll",
            "finishedAt": "2026-12-06T00:00:20Z",
            "solution": {"token": f"token-{on_record}"},
        },
    }
    return verdict_module.Snapshot(
        planned={"t1": "RecaptchaV2"},
        tasks=[task],
        dead_letters=[],
        events=[],
        emulator_tasks=emulator_tasks,
        emulator_summary={"totals": {}},
        operator_metrics=[{("captchatask_fallback_recoveries_total", ()): 1.0}],
        sidecar_metrics=[{}],
        operator_kills=[verdict_module.KillWindow(*window) for window in operator_kills],
        sidecar_kills=[],
        spool_bytes=0,
        planted=[],
    )


def test_a_resubmission_after_a_lost_reply_and_no_pingback_is_allowed_and_counted(
    verdict_module: ModuleType,
) -> None:
    snap = _snapshot(
        verdict_module,
        [
            _provider_task("1000000001", created=100.0, lost="502", delivered=None),
            _provider_task("1000000002", created=105.0, lost=None, delivered=None),
        ],
        on_record="1000000002",
    )

    verdict = verdict_module.evaluate(snap)

    assert verdict.figures["submitted_twice"] == 0
    assert verdict.figures["resubmitted_after_lost_reply"] == 1
    assert verdict.figures["provider_tasks_per_task_max"] == 2
    assert verdict.passed, verdict.violations


def test_a_second_provider_task_after_a_delivered_pingback_is_submitted_twice(
    verdict_module: ModuleType,
) -> None:
    snap = _snapshot(
        verdict_module,
        [
            _provider_task("1000000001", created=100.0, lost="drop", delivered=101.0),
            _provider_task("1000000002", created=105.0, lost=None, delivered=None),
        ],
        on_record="1000000002",
    )

    verdict = verdict_module.evaluate(snap)

    assert verdict.figures["submitted_twice"] == 1
    assert not verdict.passed


def test_a_second_provider_task_without_a_lost_reply_is_submitted_twice_even_if_claimed(
    verdict_module: ModuleType,
) -> None:
    """The ledger may name the second task: counting per CaptchaTask still sees the first."""
    snap = _snapshot(
        verdict_module,
        [
            _provider_task("1000000001", created=100.0, lost=None, delivered=None),
            _provider_task("1000000002", created=105.0, lost=None, delivered=None),
        ],
        on_record="1000000002",
    )

    verdict = verdict_module.evaluate(snap)

    assert verdict.figures["submitted_twice"] == 1


def test_a_resubmission_after_an_in_php_cut_off_by_an_operator_kill_is_allowed(
    verdict_module: ModuleType,
) -> None:
    """The operator was SIGKILLed right after its ``in.php`` reached the emulator.

    The reply (or the ``Submitted`` write after it) died with the process: to the restarted
    operator it is an unresolved intent, resubmitted after the pingback grace, as a lost reply.
    """
    snap = _snapshot(
        verdict_module,
        [
            _provider_task("1000000001", created=100.0, lost=None, delivered=None),
            _provider_task("1000000002", created=117.0, lost=None, delivered=None),
        ],
        on_record="1000000002",
        operator_kills=((99.2, 100.1),),
    )

    verdict = verdict_module.evaluate(snap)

    assert verdict.figures["submitted_twice"] == 0
    assert verdict.figures["resubmitted_after_lost_reply"] == 1
    assert verdict.passed, verdict.violations


def test_a_second_provider_task_is_submitted_twice_if_the_first_was_created_outside_a_kill(
    verdict_module: ModuleType,
) -> None:
    snap = _snapshot(
        verdict_module,
        [
            _provider_task("1000000001", created=100.0, lost=None, delivered=None),
            _provider_task("1000000002", created=117.0, lost=None, delivered=None),
        ],
        on_record="1000000002",
        operator_kills=((100.5, 101.5),),  # killed after that in.php's reply could be seen
    )

    verdict = verdict_module.evaluate(snap)

    assert verdict.figures["submitted_twice"] == 1
    assert not verdict.passed
