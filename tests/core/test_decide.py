"""The pure race rules of the ledger: one outcome per task, whoever arrives first."""

import datetime as dt
from typing import Any

import pytest

from captchatask.decision import (
    CONDITION_COMPLETE,
    Outcome,
    Result,
    cas_patch,
    decide,
    result_status,
    set_condition,
)
from captchatask.model import DeadLetterReason, DeliveredBy, Phase, TaskRef, TaskView

UID = "3f1c2a4e-1111-4222-8333-444455556666"
REF = TaskRef("shop", "login-1", UID)
NOW = dt.datetime(2026, 11, 28, 12, 0, 0, tzinfo=dt.UTC)


def task(phase: str | None, **status: Any) -> TaskView:
    body: dict[str, Any] = {
        "metadata": {"namespace": "shop", "name": "login-1", "uid": UID, "generation": 2},
        "spec": {"type": "RecaptchaV2"},
        "status": {"phase": phase, **status} if phase else {},
    }
    return TaskView.from_body(body)


def pingback(pid: str = "111", token: str = "TOK") -> Result:
    return Result.solved(token=token, delivered_by=DeliveredBy.PINGBACK, provider_task_id=pid)


def poll(pid: str = "111", token: str = "TOK") -> Result:
    return Result.solved(token=token, delivered_by=DeliveredBy.POLL, provider_task_id=pid)


@pytest.mark.parametrize("phase", ["Pending", "Queued", "Submitted", None])
def test_a_result_for_a_live_task_is_recorded(phase: str | None) -> None:
    assert decide(task(phase), REF, pingback()).outcome is Outcome.RECORDED


def test_a_second_pingback_is_a_duplicate() -> None:
    done = task("Solved", deliveredBy="pingback", providerTaskId="111")
    assert decide(done, REF, pingback()).outcome is Outcome.DUPLICATE


def test_a_poll_that_loses_to_a_pingback_is_a_duplicate() -> None:
    done = task("Solved", deliveredBy="pingback", providerTaskId="111")
    assert decide(done, REF, poll()).outcome is Outcome.DUPLICATE


def test_a_pingback_after_the_poll_recovered_the_task_is_late() -> None:
    done = task("Solved", deliveredBy="poll", providerTaskId="111")
    assert decide(done, REF, pingback()).outcome is Outcome.LATE


def operator_failed(
    code: str = "DeadlineExceeded", finished_at: str = "2026-11-28T12:00:00Z"
) -> TaskView:
    """A task the operator failed itself (no deliveredBy); its deadline is NOW."""
    body: dict[str, Any] = {
        "metadata": {
            "namespace": "shop",
            "name": "login-1",
            "uid": UID,
            "generation": 2,
            "creationTimestamp": "2026-11-28T11:59:00Z",
        },
        "spec": {"type": "RecaptchaV2", "deadlineSeconds": 60},
        "status": {
            "phase": "Failed",
            "providerTaskId": "111",
            "finishedAt": finished_at,
            "failure": {"code": code, "message": "the operator decided"},
        },
    }
    return TaskView.from_body(body)


@pytest.mark.parametrize("code", ["DeadlineExceeded", "PollsExhausted", "ResultExpired"])
def test_a_solution_received_before_the_operator_failed_the_task_replaces_the_failure(
    code: str,
) -> None:
    received = NOW - dt.timedelta(seconds=5)  # before the deadline and before the failure
    decision = decide(operator_failed(code), REF, pingback(), received_at=received)
    assert decision.outcome is Outcome.RECORDED
    assert code in decision.message


def test_a_solution_received_after_the_deadline_is_a_task_failed_dead_letter() -> None:
    # Received after the deadline (NOW) but before the failure was written (NOW + 10 s).
    failed = operator_failed(finished_at="2026-11-28T12:00:10Z")
    received = NOW + dt.timedelta(seconds=2)
    decision = decide(failed, REF, pingback(), received_at=received)
    assert decision.outcome is Outcome.DEAD_LETTER
    assert decision.reason is DeadLetterReason.TASK_FAILED


@pytest.mark.parametrize("received_at", [NOW + dt.timedelta(seconds=1), None])
def test_a_solution_received_after_the_failure_is_a_task_failed_dead_letter(
    received_at: dt.datetime | None,
) -> None:
    decision = decide(operator_failed(), REF, pingback(), received_at=received_at)
    assert decision.outcome is Outcome.DEAD_LETTER
    assert decision.reason is DeadLetterReason.TASK_FAILED
    assert "DeadlineExceeded" in decision.message


def test_a_pingback_for_a_task_the_provider_failed_is_late() -> None:
    failed = task("Failed", providerTaskId="111", deliveredBy="poll", failure={"code": "ERROR_X"})
    assert decide(failed, REF, pingback(), received_at=NOW).outcome is Outcome.LATE


def test_a_failure_reported_before_the_operator_failed_the_task_replaces_its_code() -> None:
    unsolvable = Result.failed(
        code="ERROR_CAPTCHA_UNSOLVABLE",
        message="m",
        delivered_by=DeliveredBy.PINGBACK,
        provider_task_id="111",
    )
    received = NOW - dt.timedelta(seconds=1)
    decision = decide(operator_failed(), REF, unsolvable, received_at=received)
    assert decision.outcome is Outcome.RECORDED
    fields = result_status(operator_failed(), unsolvable, NOW)
    assert fields["failure"]["code"] == "ERROR_CAPTCHA_UNSOLVABLE"
    assert "replaces DeadlineExceeded" in fields["conditions"][0]["message"]


def test_a_failure_reported_after_the_operator_failed_the_task_is_late() -> None:
    late_error = Result.failed(
        code="ERROR_CAPTCHA_UNSOLVABLE",
        message="m",
        delivered_by=DeliveredBy.PINGBACK,
        provider_task_id="111",
    )
    assert decide(operator_failed(), REF, late_error).outcome is Outcome.LATE


def test_a_correction_replaces_the_failure_and_says_what_it_replaced() -> None:
    fields = result_status(operator_failed(), pingback(), NOW)
    assert fields["phase"] == "Solved"
    assert fields["solution"] == {"token": "TOK"}
    (complete,) = fields["conditions"]
    assert complete["reason"] == "Solved"
    assert "DeadlineExceeded" in complete["message"]
    ops = cas_patch(uid=UID, fields=fields, resource_version="9", remove=("failure",))
    assert {"op": "remove", "path": "/status/failure"} in ops


def test_a_missing_task_dead_letters() -> None:
    decision = decide(None, REF, pingback())
    assert decision.outcome is Outcome.DEAD_LETTER
    assert decision.reason is DeadLetterReason.TASK_NOT_FOUND


def test_a_recreated_task_dead_letters_its_predecessors_result() -> None:
    other = TaskRef("shop", "login-1", "9f1c2a4e-1111-4222-8333-444455556666")
    decision = decide(task("Submitted"), other, pingback())
    assert decision.reason is DeadLetterReason.TASK_RECREATED


def test_a_result_for_another_provider_task_dead_letters() -> None:
    decision = decide(task("Submitted", providerTaskId="111"), REF, pingback(pid="222"))
    assert decision.reason is DeadLetterReason.PROVIDER_TASK_MISMATCH


def test_an_adopted_task_matches_on_its_spec_provider_id() -> None:
    body = {
        "metadata": {"namespace": "shop", "name": "login-1", "uid": UID},
        "spec": {"type": "Turnstile", "providerTaskId": "555"},
    }
    adopted = TaskView.from_body(body)
    assert decide(adopted, REF, pingback(pid="555")).outcome is Outcome.RECORDED
    assert decide(adopted, REF, pingback(pid="556")).outcome is Outcome.DEAD_LETTER


def test_recorded_solution_sets_phase_solution_and_complete_condition() -> None:
    fields = result_status(task("Submitted", providerTaskId="111"), pingback(), NOW)
    assert fields["phase"] == Phase.SOLVED
    assert fields["solution"] == {"token": "TOK"}
    assert fields["deliveredBy"] == "pingback"
    assert fields["pingbackAt"] == "2026-11-28T12:00:00Z"
    (complete,) = [c for c in fields["conditions"] if c["type"] == CONDITION_COMPLETE]
    assert complete["status"] == "True"
    assert complete["observedGeneration"] == 2


def test_recorded_failure_names_the_code_in_status_and_condition_reason() -> None:
    result = Result.failed(
        code="ERROR_CAPTCHA_UNSOLVABLE",
        message="workers could not solve it",
        delivered_by=DeliveredBy.POLL,
        provider_task_id="111",
    )
    fields = result_status(task("Submitted", providerTaskId="111"), result, NOW)
    assert fields["phase"] == Phase.FAILED
    assert fields["failure"]["code"] == "ERROR_CAPTCHA_UNSOLVABLE"
    assert fields["conditions"][-1]["reason"] == "CaptchaUnsolvable"
    assert "pingbackAt" not in fields


def test_condition_transition_time_is_kept_while_status_is_unchanged() -> None:
    first = set_condition(
        [], type_="Ready", status="True", reason="A", message="m", generation=1, now=NOW
    )
    later = NOW + dt.timedelta(minutes=5)
    same = set_condition(
        first, type_="Ready", status="True", reason="B", message="m", generation=2, now=later
    )
    flipped = set_condition(
        same, type_="Ready", status="False", reason="C", message="m", generation=3, now=later
    )
    assert same[0]["lastTransitionTime"] == first[0]["lastTransitionTime"]
    assert same[0]["reason"] == "B"
    assert flipped[0]["lastTransitionTime"] == "2026-11-28T12:05:00Z"


def test_cas_patch_pins_what_the_writer_observed() -> None:
    ops = cas_patch(
        uid=UID, fields={"phase": "Solved"}, phase=Phase.SUBMITTED, provider_task_id="111"
    )
    tests = [op for op in ops if op["op"] == "test"]
    assert {op["path"] for op in tests} == {
        "/metadata/uid",
        "/status/phase",
        "/status/providerTaskId",
    }
    assert ops[-1] == {"op": "add", "path": "/status/phase", "value": "Solved"}


def test_cas_patch_creates_status_when_there_is_none() -> None:
    ops = cas_patch(uid=UID, fields={"phase": "Pending"}, resource_version="7", had_status=False)
    assert ops[-1] == {"op": "add", "path": "/status", "value": {"phase": "Pending"}}
