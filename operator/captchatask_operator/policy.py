"""The operator's decisions as pure functions: submission steps, poll timing, provider health.

Nothing here performs I/O or reads a clock; the engine passes ``now`` and applies the verdicts
through the ledger. This is where the time-based rules live, so they are unit-tested with a
fake clock:

* **Submission** (:func:`submission_step`): adopt, wait for an external id, park while the
  provider is not Ready, wait out a back-off or an unresolved intent (a crash after
  ``in.php``, or an ``in.php`` that failed ambiguously: :func:`is_ambiguous`), fail after the
  bounded number of ambiguous attempts, or submit.
* **Polling** (:func:`first_poll_at`, :func:`resume_polls`, :func:`after_poll`): the first poll
  exactly at ``submittedAt + callbackTimeoutSeconds`` (poll-only: the documented first-poll
  delay), then every ``intervalSeconds``, never more than ``maxPolls`` (these are due times:
  bulk batching sends a poll at most ``--poll-batch-window`` early or late, and a poll sent
  early that finds no answer is planned again at its due time). Poll counters are
  persisted only every ``poll_status_every`` polls; after a restart the unpersisted polls are
  *assumed* to have happened (at most ``every - 1`` of them), so ``maxPolls`` is never exceeded.
* **Provider health** (:func:`provider_verdict`, :func:`transient_recheck_delay`): a Ready
  condition reason from a check. A transient failure (HTML 5xx page, transport error,
  unparseable reply) keeps the last known readiness and re-checks soon with back-off; only
  ``unreachable_after`` of them in a row declare the provider ``Unreachable``. Polls go on
  whatever the check says, except after a rejected key (:func:`polls_stopped`).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from captchatask.model import Phase
from captchatask.provider import codes
from captchatask.provider.codes import Classification, Dialect, Verdict
from captchatask.provider.replies import Solution, ThreadsInfo
from captchatask_operator.records import ProviderSpec, TaskRecord

#: Codes meaning "the provider no longer holds (or never held) this id's result".
RESULT_GONE_CODES: Final = frozenset(
    {"ERROR_WRONG_CAPTCHA_ID", "ERROR_NO_SUCH_CAPCHA_ID", "ERROR_TASK_ABSENT"}
)
_INVALID_KEY_CODES: Final = frozenset({"ERROR_WRONG_USER_KEY", "ERROR_KEY_DOES_NOT_EXIST"})
_IP_CODES: Final = frozenset({"IP_BANNED", "ERROR_IP_BLOCKED", "ERROR_IP_NOT_ALLOWED"})

# -- retry timings shared by the engine's parts -------------------------------------------------

#: How often a lost compare-and-set is re-read and retried before the action is rescheduled.
MAX_CAS_RETRIES: Final = 5
#: When the API server is away, retry an action after this long.
API_RETRY: Final = dt.timedelta(seconds=2)
#: Retry an action this soon when another action on the same object is still running.
BUSY_RETRY: Final = dt.timedelta(seconds=0.5)
#: Retry a poll this soon while its provider has not been checked yet (operator startup).
UNCHECKED_RETRY: Final = dt.timedelta(seconds=0.5)
#: Wait after a failed solver request that named no documented wait.
DEFAULT_ERROR_WAIT_SECONDS: Final = 5.0
#: Re-check a provider this soon after its first transient check failure (doubles per failure,
#: capped at ``--provider-retry-seconds``): nginx 502 bursts last seconds, not minutes.
TRANSIENT_RECHECK_BASE_SECONDS: Final = 1.0
#: Check failures that say nothing about the account: the provider (or a proxy) hiccupped.
TRANSIENT_CHECK_CODES: Final = frozenset(
    {codes.TRANSPORT_ERROR, codes.CONNECT_ERROR, codes.HTTP_5XX, codes.UNPARSEABLE_REPLY}
)
#: Failed ``in.php`` outcomes after which the request may have reached the provider (and a
#: task may exist there): a timeout or a connection lost after sending, a 5xx page (a proxy may
#: have forwarded the request), an unparseable 200. ``CONNECT_ERROR`` (refused, DNS, TLS: the
#: connection never opened) and every reply code (the provider answered) are definite.
AMBIGUOUS_SUBMIT_CODES: Final = frozenset(
    {codes.TRANSPORT_ERROR, codes.HTTP_5XX, codes.UNPARSEABLE_REPLY}
)
#: First wait before re-trying a ``Submitted`` write the API server did not take (doubles per
#: failure up to ``ID_WRITE_RETRY_CAP``): the id ``in.php`` returned is kept in memory until it
#: is durable, since forgetting it would pay for a second task.
ID_WRITE_RETRY_BASE: Final = 0.5
ID_WRITE_RETRY_CAP: Final = 10.0
#: A failed API call more than this long after the previous one starts a new outage (during an
#: outage postponed actions retry every few seconds, see ``API_RETRY``).
OUTAGE_GAP: Final = dt.timedelta(seconds=30)
#: How often the active operator asks the API server whether it answers (``GET /version``, served
#: without etcd), so that an outage is noticed even when no action of ours happens to fail.
LEDGER_PROBE_SECONDS: Final = 1.0


class FailureCode(StrEnum):
    """Failure codes the operator itself decides (provider codes are used as they come)."""

    DEADLINE_EXCEEDED = "DeadlineExceeded"
    POLLS_EXHAUSTED = "PollsExhausted"
    RESULT_EXPIRED = "ResultExpired"
    SUBMIT_ATTEMPTS_EXHAUSTED = "SubmitAttemptsExhausted"
    INVALID_SPEC = "InvalidSpec"


class WaitReason(StrEnum):
    """Reasons of the task condition ``Submitted=False`` while a task waits."""

    PROVIDER_NOT_FOUND = "ProviderNotFound"
    PROVIDER_NOT_READY = "ProviderNotReady"
    AWAITING_PROVIDER_TASK_ID = "AwaitingProviderTaskId"
    QUEUED = "MaxInFlightReached"
    BACKING_OFF = "BackingOff"


class ProviderReason(StrEnum):
    """Reasons of the provider condition ``Ready``."""

    READY = "Ready"
    SECRET_NOT_FOUND = "SecretNotFound"  # noqa: S105 - a reason, not a password
    SECRET_KEY_MISSING = "SecretKeyMissing"  # noqa: S105 - a reason, not a password
    INVALID_KEY = "InvalidKey"
    NO_BALANCE = "NoBalance"
    NO_THREADS = "NoThreads"
    IP_BLOCKED = "IpBlocked"
    CONFIG_ERROR = "ConfigError"
    UNREACHABLE = "Unreachable"
    PINGBACK_KEY_MISSING = "PingbackKeyMissing"


# -- submission --------------------------------------------------------------------------------


class StepKind(StrEnum):
    """What to do next for a task that has no provider task id yet."""

    NONE = "none"
    ADOPT = "adopt"
    AWAIT_ID = "await_id"
    PARK = "park"
    WAIT = "wait"
    FAIL = "fail"
    SUBMIT = "submit"


@dataclass(frozen=True, slots=True)
class Step:
    """One submission decision."""

    kind: StepKind
    at: dt.datetime | None = None
    reason: str = ""
    message: str = ""
    resubmit: bool = False


def intent_grace(provider: ProviderSpec, *, poll_only_grace: float) -> float:
    """How long an unresolved intent waits for a pingback before the task is resubmitted.

    With pingbacks, a task that did reach the provider reports back within about
    ``callbackTimeoutSeconds`` (the same patience that triggers the first fallback poll), and the
    ledger records it under its provider id; poll-only providers can never deliver an unknown id,
    so they wait only the short configured grace.
    """
    return poll_only_grace if provider.poll_only else provider.polling.callback_timeout


def submission_step(  # noqa: PLR0911 - one return per documented step, in order
    task: TaskRecord,
    *,
    provider: ProviderSpec | None,
    provider_ready: bool,
    provider_reason: str,
    now: dt.datetime,
    max_attempts: int,
    poll_only_grace: float,
    ledger_unavailable_at: dt.datetime | None = None,
    ledger_unavailable_since: dt.datetime | None = None,
    active_since: dt.datetime | None = None,
) -> Step:
    """Decide the next submission step of a task (see the module docstring).

    ``ledger_unavailable_at`` is the last time the API server failed us, and
    ``ledger_unavailable_since`` the first failure of that outage, moved later by any stretch in
    which it answered (so their difference is the time it was away). While the API server is away
    the receivers spool pingbacks instead of recording them, and after it is back they are
    still catching up: each notices the return on its own (later than we do), replays the
    spool behind which new pingbacks queue, and pingbacks refused while a spool was at its bound
    come again only when the provider retries. That backlog grows with the outage, so a missing
    pingback proves nothing until the grace *plus the outage's length* has run from the last
    failure (:func:`receivers_caught_up_at`), whenever the intent was written.

    ``active_since`` is when this operator became the active one. An outage the previous
    operator saw (or that ended just before this one started) is unknown to it, and the
    receivers may still be replaying what they spooled: no intent is resolved before one grace
    has run since the takeover. That delays a resubmission after a restart by at most one grace,
    in exchange for never resubmitting a task whose pingback is still in a spool.
    """
    if task.deleting or task.terminal or task.phase is Phase.SUBMITTED:
        return Step(StepKind.NONE)
    if task.spec_provider_task_id:
        return Step(StepKind.ADOPT)
    if task.external:
        return Step(
            StepKind.AWAIT_ID,
            reason=WaitReason.AWAITING_PROVIDER_TASK_ID,
            message="external task: waiting for spec.providerTaskId",
        )
    if provider is None:
        return Step(
            StepKind.PARK,
            reason=WaitReason.PROVIDER_NOT_FOUND,
            message=f"CaptchaProvider {task.provider!r} does not exist",
        )
    if not provider_ready:
        return Step(
            StepKind.PARK,
            reason=WaitReason.PROVIDER_NOT_READY,
            message=f"provider {provider.name} is not Ready ({provider_reason})",
        )
    if task.unresolved_intent:
        assert task.intent_at is not None
        # The grace runs from the latest of: the intent, an ambiguous failure (the provider may
        # have created the task as late as that), the API server's return (pingbacks spooled
        # meanwhile are still being replayed).
        grace = dt.timedelta(seconds=intent_grace(provider, poll_only_grace=poll_only_grace))
        since = max(moment for moment in (task.intent_at, task.ambiguous_at) if moment is not None)
        resolve_at = since + grace
        if ledger_unavailable_at is not None:
            caught_up = receivers_caught_up_at(
                ledger_unavailable_at, since=ledger_unavailable_since, grace=grace
            )
            resolve_at = max(resolve_at, caught_up)
        if active_since is not None:
            resolve_at = max(resolve_at, active_since + grace)
        if now < resolve_at:
            return Step(StepKind.WAIT, at=resolve_at, reason="UnresolvedIntent")
        if task.attempts >= max_attempts:
            return _exhausted(task)
        return Step(StepKind.SUBMIT, resubmit=True)
    if task.next_attempt_at is not None and now < task.next_attempt_at:
        return Step(StepKind.WAIT, at=task.next_attempt_at, reason=WaitReason.BACKING_OFF)
    if task.attempts >= max_attempts:
        return _exhausted(task)
    return Step(StepKind.SUBMIT)


def receivers_caught_up_at(
    last_failure: dt.datetime, *, since: dt.datetime | None, grace: dt.timedelta
) -> dt.datetime:
    """When a pingback delayed by an API server outage has had its chance to be recorded.

    The grace runs from the outage's last failed call (``last_failure``) and is stretched by the
    outage's length (``since`` to ``last_failure``): the receivers' backlog, and the time they
    need to replay it, grow with the outage. Only for pingback providers does this matter in
    practice, but a poll-only provider's short grace is stretched the same way (a restarted
    poll of a known id costs nothing; a second in.php costs a task).
    """
    outage = last_failure - since if since is not None and since < last_failure else dt.timedelta()
    return last_failure + grace + outage


def _exhausted(task: TaskRecord) -> Step:
    return Step(
        StepKind.FAIL,
        reason=FailureCode.SUBMIT_ATTEMPTS_EXHAUSTED,
        message=f"{task.attempts} in.php calls without a recorded provider task id",
    )


def is_ambiguous(classification: Classification) -> bool:
    """Whether a failed submit may still have created a task at the provider.

    A reply code means the provider answered and created nothing, and a connection that never
    opened sent nothing; a timeout or connection lost after sending, an HTML 5xx page or an
    unparseable reply leaves it open (see :data:`AMBIGUOUS_SUBMIT_CODES`).
    """
    return classification.code in AMBIGUOUS_SUBMIT_CODES


def id_write_retry_delay(failures: int) -> float:
    """Seconds before re-trying a ``Submitted`` write after ``failures`` failures in a row."""
    return min(ID_WRITE_RETRY_CAP, ID_WRITE_RETRY_BASE * 2.0 ** max(0, failures - 1))


# -- polling -----------------------------------------------------------------------------------


def first_poll_at(task: TaskRecord, provider: ProviderSpec) -> dt.datetime:
    """When a submitted task is first polled: callback timeout, or the poll-only delay."""
    submitted = task.submitted_at or task.created_at
    if provider.poll_only:
        delay = codes.first_poll_delay(task.task_type, dialect=provider.dialect)
    else:
        delay = provider.polling.callback_timeout
    return submitted + dt.timedelta(seconds=delay)


@dataclass(frozen=True, slots=True)
class PollPlan:
    """Polls already made (persisted or assumed) and when the next one is due."""

    polls: int
    due: dt.datetime


def resume_polls(
    task: TaskRecord, provider: ProviderSpec, *, now: dt.datetime, checkpoint_every: int
) -> PollPlan:
    """Plan polling for a submitted task the engine (re)discovers, e.g. after a restart."""
    if task.polls == 0 and task.last_poll_at is None:
        return PollPlan(0, task.next_poll_at or first_poll_at(task, provider))
    interval = provider.polling.interval
    last = task.last_poll_at or first_poll_at(task, provider)
    elapsed = max(0.0, (now - last).total_seconds())
    unrecorded = min(checkpoint_every - 1, math.floor(elapsed / interval))
    if unrecorded == 0 and task.next_poll_at is not None:
        return PollPlan(task.polls, task.next_poll_at)
    due = last + dt.timedelta(seconds=interval * (unrecorded + 1))
    return PollPlan(task.polls + unrecorded, due)


class PollOutcome(StrEnum):
    """What one poll of one task found (the fallback-poll metric's ``outcome`` label)."""

    SOLVED = "solved"
    NOT_READY = "not_ready"
    FAILED = "failed"
    EXPIRED = "expired"
    UNKNOWN = "unknown"
    ERROR = "error"


def classify_poll(result: Solution | Classification) -> PollOutcome:
    """Sort a per-task poll result into an outcome."""
    if isinstance(result, Solution):
        return PollOutcome.SOLVED
    if result.verdict is Verdict.NOT_READY:
        return PollOutcome.NOT_READY
    if result.verdict is Verdict.TASK_FAILED:
        if result.code in RESULT_GONE_CODES:
            return PollOutcome.EXPIRED
        return PollOutcome.FAILED
    return PollOutcome.UNKNOWN


@dataclass(frozen=True, slots=True)
class AfterPoll:
    """The consequence of a poll that found no final answer."""

    polls: int
    next_due: dt.datetime | None
    exhausted: bool
    checkpoint: bool


def after_poll(
    *,
    polls_before: int,
    provider: ProviderSpec,
    now: dt.datetime,
    checkpoint_every: int,
    wait_seconds: float | None = None,
    was_due: dt.datetime | None = None,
) -> AfterPoll:
    """Count a not-ready (or unknown) poll and plan the next one, or give up at ``maxPolls``.

    ``wait_seconds`` (an unknown code's conservative wait) stretches the interval, never
    shortens it. ``was_due`` is set for a poll a bulk request carried before its due time: an
    answer not ready early says nothing about the due time, so the poll that was due still
    happens then (early must never add recovery delay).
    """
    polls = polls_before + 1
    if polls >= provider.polling.max_polls:
        return AfterPoll(polls, None, exhausted=True, checkpoint=True)
    interval = max(provider.polling.interval, wait_seconds or 0.0)
    checkpoint = polls == 1 or polls % checkpoint_every == 0
    next_due = now + dt.timedelta(seconds=interval)
    if was_due is not None and now < was_due < next_due:
        next_due = was_due
    return AfterPoll(polls, next_due, False, checkpoint)


# -- TTL -----------------------------------------------------------------------------------------


def ttl_due(task: TaskRecord) -> dt.datetime | None:
    """When a finished task is deleted (``finishedAt + ttlSecondsAfterFinished``)."""
    if not task.terminal:
        return None
    finished = task.finished_at or task.created_at
    return finished + dt.timedelta(seconds=task.ttl_seconds)


# -- providers -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderVerdict:
    """The outcome of one provider check."""

    ready: bool
    reason: ProviderReason
    message: str
    error_code: str | None = None
    #: A transient failure (5xx page, transport error, unparseable reply): says nothing about
    #: the account, so the caller keeps the last known readiness (see transient_recheck_delay).
    transient: bool = False


def provider_verdict(
    dialect: Dialect,
    *,
    threads: ThreadsInfo | None = None,
    balance: float | None = None,
    error: Classification | None = None,
) -> ProviderVerdict:
    """Turn a ``threadsinfo``/``getbalance`` answer (or its error) into a Ready verdict."""
    if error is not None:
        code = error.code
        if code in _INVALID_KEY_CODES:
            reason = ProviderReason.INVALID_KEY
        elif code == "ERROR_ZERO_BALANCE" and dialect is Dialect.TWOCAPTCHA:
            reason = ProviderReason.NO_BALANCE
        elif code in _IP_CODES:
            reason = ProviderReason.IP_BLOCKED
        elif error.verdict is Verdict.CONFIG_ERROR:
            reason = ProviderReason.CONFIG_ERROR
        else:
            reason = ProviderReason.UNREACHABLE
        transient = code in TRANSIENT_CHECK_CODES
        return ProviderVerdict(False, reason, f"{code}: {error.reason}", code, transient)
    if threads is not None and threads.threads <= 0:
        return ProviderVerdict(False, ProviderReason.NO_THREADS, "the plan has no threads")
    if balance is not None and balance <= 0:
        return ProviderVerdict(False, ProviderReason.NO_BALANCE, "the account balance is zero")
    if threads is not None:
        message = f"{threads.threads} threads, {threads.working_threads} working"
    elif balance is not None:
        message = f"balance {balance}"
    else:
        message = "checked"
    return ProviderVerdict(True, ProviderReason.READY, message)


#: Provider reasons after which no request with the current key can succeed: a wrong or unknown
#: key, an IP the provider refuses (both providers: "stop sending requests"; repeated wrong keys
#: get the IP banned). Polls wait for a check with a working key to pass. A transient check
#: failure (``Unreachable``) or a lack of threads or balance (``in.php`` refuses new tasks, but
#: ``res.php`` still returns the results of tasks already submitted) does not stop them.
POLLS_STOPPED_BY: Final = frozenset({ProviderReason.INVALID_KEY, ProviderReason.IP_BLOCKED})


def polls_stopped(*, ready: bool, reason: str) -> bool:
    """Whether a provider's last verdict stops its polls until a check passes."""
    return not ready and reason in POLLS_STOPPED_BY


def transient_recheck_delay(failures: int, *, cap: float) -> float:
    """Seconds until the re-check after ``failures`` transient check failures in a row.

    1 s, 2 s, 4 s... capped at ``cap`` (``--provider-retry-seconds``): a short 502 burst is
    over by the first or second re-check, and a longer outage is not hammered.
    """
    exponent = max(0, failures - 1)
    return min(cap, TRANSIENT_RECHECK_BASE_SECONDS * 2.0**exponent)


def declares_unreachable(failures: int, *, unreachable_after: int) -> bool:
    """Whether ``failures`` transient check failures in a row make the provider Unreachable."""
    return failures >= unreachable_after
