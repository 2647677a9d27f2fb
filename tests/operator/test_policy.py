"""The operator's time-based decisions, with a fake clock (no sleeps, no cluster)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from captchatask import model
from captchatask.provider.codes import Classification, Dialect, Verdict, classify
from captchatask.provider.replies import Solution, ThreadsInfo
from captchatask_operator import policy
from captchatask_operator.policy import FailureCode, PollOutcome, ProviderReason, StepKind
from captchatask_operator.records import ProviderSpec, TaskRecord

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
UID = "0f0e0d0c-0b0a-4909-8807-060504030201"


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def task(*, spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None) -> TaskRecord:
    body = {
        "metadata": {
            "namespace": "ns",
            "name": "t",
            "uid": UID,
            "resourceVersion": "7",
            "generation": 1,
            "creationTimestamp": model.format_time(T0),
        },
        "spec": {"type": "RecaptchaV2", "deadlineSeconds": 600, **(spec or {})},
        "status": status or {},
    }
    return TaskRecord.from_body(body, now=T0)


def provider(
    *, public_url: str | None = "https://hooks.example", polling: dict[str, Any] | None = None
) -> ProviderSpec:
    spec: dict[str, Any] = {
        "dialect": "captchaai",
        "apiKeySecretRef": {"name": "s"},
        "polling": {"callbackTimeoutSeconds": 120, "intervalSeconds": 30, "maxPolls": 4}
        | (polling or {}),
    }
    if public_url:
        spec["pingback"] = {"publicURL": public_url}
    return ProviderSpec.from_body({"metadata": {"namespace": "ns", "name": "p"}, "spec": spec})


def step(record: TaskRecord, *, now: float = 0.0, ready: bool = True, **kw: Any) -> policy.Step:
    return policy.submission_step(
        record,
        provider=kw.get("provider_spec", provider()),
        provider_ready=ready,
        provider_reason="InvalidKey",
        now=at(now),
        max_attempts=kw.get("max_attempts", 3),
        poll_only_grace=kw.get("grace", 30.0),
        ledger_unavailable_at=kw.get("ledger_unavailable_at"),
        ledger_unavailable_since=kw.get("ledger_unavailable_since"),
        active_since=kw.get("active_since"),
    )


# -- submission ---------------------------------------------------------------------------------


def test_a_new_task_is_submitted() -> None:
    assert step(task()).kind is StepKind.SUBMIT


def test_an_adopted_task_skips_submission() -> None:
    assert step(task(spec={"providerTaskId": "123"})).kind is StepKind.ADOPT


def test_an_external_task_without_an_id_waits() -> None:
    result = step(task(spec={"external": True}))
    assert (result.kind, result.reason) == (StepKind.AWAIT_ID, "AwaitingProviderTaskId")


def test_tasks_are_parked_while_the_provider_is_not_ready() -> None:
    result = step(task(), ready=False)
    assert (result.kind, result.reason) == (StepKind.PARK, "ProviderNotReady")
    assert "InvalidKey" in result.message


def test_tasks_of_a_missing_provider_are_parked() -> None:
    result = step(task(), provider_spec=None)
    assert (result.kind, result.reason) == (StepKind.PARK, "ProviderNotFound")


def test_an_unresolved_intent_waits_one_callback_timeout_for_a_pingback() -> None:
    record = task(
        status={
            "phase": "Pending",
            "submission": {"intentAt": model.format_time(at(0)), "attempts": 1},
        }
    )
    assert record.unresolved_intent

    waiting = step(record, now=119.0)
    assert (waiting.kind, waiting.at) == (StepKind.WAIT, at(120))
    resubmit = step(record, now=120.0)
    assert resubmit.kind is StepKind.SUBMIT
    assert resubmit.resubmit


def test_an_operator_that_just_took_over_waits_one_grace_before_resubmitting() -> None:
    # The intent is 500 s old, far past its 120 s grace, but this operator became active at
    # 400 s: it cannot know whether the API server was away just before (an outage the previous
    # operator saw is forgotten with it), while the receivers may still be replaying pingbacks
    # they spooled. A missing pingback proves nothing until one grace after it took over.
    record = task(
        status={
            "phase": "Pending",
            "submission": {"intentAt": model.format_time(at(0)), "attempts": 1},
        }
    )
    waiting = step(record, now=500.0, active_since=at(400))
    assert (waiting.kind, waiting.at) == (StepKind.WAIT, at(520))
    assert step(record, now=520.0, active_since=at(400)).resubmit
    # An intent written after the takeover waits its own grace only.
    later = task(
        status={
            "phase": "Pending",
            "submission": {"intentAt": model.format_time(at(450)), "attempts": 1},
        }
    )
    assert step(later, now=560.0, active_since=at(400)).at == at(570)


def test_an_api_server_outage_restarts_the_wait_for_the_pingback() -> None:
    # While the API server was away the sidecars spooled pingbacks instead of recording them:
    # the grace runs again from the moment the ledger failed us last.
    record = task(
        status={
            "phase": "Pending",
            "submission": {"intentAt": model.format_time(at(0)), "attempts": 1},
        }
    )
    waiting = step(record, now=150.0, ledger_unavailable_at=at(100))
    assert (waiting.kind, waiting.at) == (StepKind.WAIT, at(220))
    assert step(record, now=220.0, ledger_unavailable_at=at(100)).resubmit
    # An outage before the intent changes nothing.
    assert step(record, now=120.0, ledger_unavailable_at=at(-50)).resubmit


def test_an_intent_written_just_after_an_outage_waits_for_the_receivers_to_catch_up() -> None:
    # A 60 s outage (first failure at -80, last at -20); the intent came after the API server
    # was back, but its pingback may sit behind the receivers' backlog: the wait is stretched
    # by the outage's length, whenever the intent was written.
    record = task(
        status={
            "phase": "Pending",
            "submission": {"intentAt": model.format_time(at(0)), "attempts": 1},
        }
    )
    waiting = step(
        record, now=130.0, ledger_unavailable_at=at(-20), ledger_unavailable_since=at(-80)
    )
    assert (waiting.kind, waiting.at) == (StepKind.WAIT, at(160))
    assert step(
        record, now=160.0, ledger_unavailable_at=at(-20), ledger_unavailable_since=at(-80)
    ).resubmit
    # Long ago and short, an outage changes nothing.
    assert step(
        record, now=120.0, ledger_unavailable_at=at(-500), ledger_unavailable_since=at(-510)
    ).resubmit


def test_a_poll_only_provider_resubmits_after_the_short_grace() -> None:
    record = task(status={"submission": {"intentAt": model.format_time(at(0)), "attempts": 1}})
    poll_only = provider(public_url=None)

    assert step(record, now=29.0, provider_spec=poll_only).kind is StepKind.WAIT
    assert step(record, now=30.0, provider_spec=poll_only).kind is StepKind.SUBMIT


def test_unresolved_intents_are_bounded_no_storm() -> None:
    record = task(status={"submission": {"intentAt": model.format_time(at(0)), "attempts": 3}})

    result = step(record, now=1000.0, max_attempts=3)

    assert (result.kind, result.reason) == (StepKind.FAIL, FailureCode.SUBMIT_ATTEMPTS_EXHAUSTED)


def test_a_recorded_rejection_resolves_the_intent_and_backs_off() -> None:
    record = task(
        status={
            "submission": {
                "intentAt": model.format_time(at(0)),
                "nextAttemptAt": model.format_time(at(60)),
                "attempts": 0,
            }
        }
    )
    assert not record.unresolved_intent

    assert step(record, now=59.0).kind is StepKind.WAIT
    assert step(record, now=60.0).kind is StepKind.SUBMIT


def test_submitted_and_finished_tasks_need_no_submission() -> None:
    assert step(task(status={"phase": "Submitted", "providerTaskId": "1"})).kind is StepKind.NONE
    assert step(task(status={"phase": "Solved"})).kind is StepKind.NONE


def test_only_transport_failures_are_ambiguous() -> None:
    assert policy.is_ambiguous(
        classify("TRANSPORT_ERROR", dialect=Dialect.CAPTCHAAI, endpoint="in")
    )
    assert not policy.is_ambiguous(
        classify("ERROR_NO_SLOT_AVAILABLE", dialect=Dialect.CAPTCHAAI, endpoint="in")
    )


# -- polling --------------------------------------------------------------------------------------


def submitted(**status: Any) -> TaskRecord:
    return task(
        status={
            "phase": "Submitted",
            "providerTaskId": "42",
            "submittedAt": model.format_time(at(10)),
            **status,
        }
    )


def test_the_first_poll_is_exactly_callback_timeout_after_submission() -> None:
    assert policy.first_poll_at(submitted(), provider()) == at(10 + 120)


def test_poll_only_providers_use_the_documented_first_poll_delay() -> None:
    assert policy.first_poll_at(submitted(), provider(public_url=None)) == at(10 + 15)


def test_polls_follow_every_interval_and_stop_at_max_polls() -> None:
    spec = provider()
    polls, now, dues = 0, at(130), []
    while True:
        plan = policy.after_poll(polls_before=polls, provider=spec, now=now, checkpoint_every=5)
        polls = plan.polls
        if plan.exhausted:
            break
        assert plan.next_due is not None
        dues.append(plan.next_due)
        now = plan.next_due

    assert polls == 4
    assert dues == [at(160), at(190), at(220)]


def test_poll_counters_are_checkpointed_on_the_first_and_every_nth_poll() -> None:
    spec = provider(polling={"maxPolls": 100})
    checkpoints = [
        n + 1
        for n in range(12)
        if policy.after_poll(polls_before=n, provider=spec, now=T0, checkpoint_every=5).checkpoint
    ]
    assert checkpoints == [1, 5, 10]


def test_an_unknown_codes_wait_stretches_the_interval() -> None:
    plan = policy.after_poll(
        polls_before=0, provider=provider(), now=T0, checkpoint_every=1, wait_seconds=90.0
    )
    assert plan.next_due == at(90)


def test_a_fresh_submitted_task_is_planned_at_its_first_poll() -> None:
    plan = policy.resume_polls(submitted(), provider(), now=at(11), checkpoint_every=5)
    assert plan == policy.PollPlan(0, at(130))


def test_after_a_restart_unpersisted_polls_are_assumed_so_max_polls_holds() -> None:
    record = submitted(
        polls=1, lastPollAt=model.format_time(at(130)), nextPollAt=model.format_time(at(160))
    )

    just_after = policy.resume_polls(record, provider(), now=at(140), checkpoint_every=5)
    assert just_after == policy.PollPlan(1, at(160))
    much_later = policy.resume_polls(record, provider(), now=at(230), checkpoint_every=5)
    assert much_later == policy.PollPlan(1 + 3, at(130 + 4 * 30))
    capped = policy.resume_polls(record, provider(), now=at(10_000), checkpoint_every=5)
    assert capped.polls == 1 + 4


@pytest.mark.parametrize(
    ("result", "outcome"),
    [
        (Solution(token="tok"), PollOutcome.SOLVED),
        (Classification(Verdict.NOT_READY, "CAPCHA_NOT_READY", 5.0, ""), PollOutcome.NOT_READY),
        (
            Classification(Verdict.TASK_FAILED, "ERROR_CAPTCHA_UNSOLVABLE", None, ""),
            PollOutcome.FAILED,
        ),
        (
            Classification(Verdict.TASK_FAILED, "ERROR_WRONG_CAPTCHA_ID", None, ""),
            PollOutcome.EXPIRED,
        ),
        (
            Classification(Verdict.TASK_FAILED, "ERROR_NO_SUCH_CAPCHA_ID", None, ""),
            PollOutcome.EXPIRED,
        ),
        (Classification(Verdict.UNKNOWN, "ERROR_NEW", 30.0, ""), PollOutcome.UNKNOWN),
    ],
)
def test_poll_results_are_sorted_into_outcomes(
    result: Solution | Classification, outcome: PollOutcome
) -> None:
    assert policy.classify_poll(result) is outcome


def test_a_finished_task_is_deleted_ttl_after_it_finished() -> None:
    record = task(
        spec={"ttlSecondsAfterFinished": 60},
        status={"phase": "Solved", "finishedAt": model.format_time(at(100))},
    )
    assert policy.ttl_due(record) == at(160)
    assert policy.ttl_due(submitted()) is None


# -- providers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dialect", "code", "reason"),
    [
        (Dialect.CAPTCHAAI, "ERROR_WRONG_USER_KEY", ProviderReason.INVALID_KEY),
        (Dialect.CAPTCHAAI, "ERROR_KEY_DOES_NOT_EXIST", ProviderReason.INVALID_KEY),
        (Dialect.TWOCAPTCHA, "ERROR_ZERO_BALANCE", ProviderReason.NO_BALANCE),
        (Dialect.CAPTCHAAI, "IP_BANNED", ProviderReason.IP_BLOCKED),
        (Dialect.CAPTCHAAI, "TRANSPORT_ERROR", ProviderReason.UNREACHABLE),
        (Dialect.CAPTCHAAI, "ERROR_PROXY_FORMAT", ProviderReason.CONFIG_ERROR),
    ],
)
def test_provider_errors_map_to_ready_reasons(
    dialect: Dialect, code: str, reason: ProviderReason
) -> None:
    verdict = policy.provider_verdict(
        dialect, error=classify(code, dialect=dialect, endpoint="res")
    )
    assert (verdict.ready, verdict.reason, verdict.error_code) == (False, reason, code)


def test_threads_and_balance_decide_readiness() -> None:
    ok = policy.provider_verdict(Dialect.CAPTCHAAI, threads=ThreadsInfo(5, 2))
    assert (ok.ready, ok.reason, ok.message) == (True, ProviderReason.READY, "5 threads, 2 working")
    assert (
        policy.provider_verdict(Dialect.CAPTCHAAI, threads=ThreadsInfo(0, 0)).reason
        is ProviderReason.NO_THREADS
    )
    assert (
        policy.provider_verdict(Dialect.TWOCAPTCHA, balance=0.0).reason is ProviderReason.NO_BALANCE
    )
    assert policy.provider_verdict(Dialect.TWOCAPTCHA, balance=3.5).ready


def test_a_poll_taken_early_without_an_answer_is_planned_at_its_due_time() -> None:
    spec = provider()  # intervalSeconds 30
    early = policy.after_poll(
        polls_before=1, provider=spec, now=at(129), checkpoint_every=5, was_due=at(130)
    )
    on_time = policy.after_poll(
        polls_before=1, provider=spec, now=at(130), checkpoint_every=5, was_due=at(130)
    )

    assert (early.polls, early.next_due) == (2, at(130))
    assert on_time.next_due == at(160)
