"""Dead letters: what they mean, when to retry or give up, and how one is requeued.

A dead letter is an *authentic* result (its pingback token verified) that could not be applied
when it arrived: its task did not exist yet or any more, was recreated, or named another
provider task. The seed tutorial's dead-letter folder needed a human to remember it; ours are
``CaptchaDeadLetter`` objects that the operator works through on its own (:func:`requeue`), that
``captchatask dlq`` lists and redrives, and that alerts watch.

The matching rule is deliberately strict, because a wrong match would hand one page's token to
another: a letter applies to a task only if it is the *same instance* (uid) or the task is known
to own the *same provider task id* (an adopted task, matched through the operator's index of
tasks by provider id). Applying goes through the ledger like every
other result, so requeue races with pingbacks and polls safely and yields one outcome.

Everything but :func:`requeue`, :func:`find_task` and :func:`write_status` is pure; the
scheduling decisions (:func:`retry_delay`, :func:`expiry_reason`, :func:`next_action`) take
"now" as an argument so they are tested with a fake clock.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Protocol

from captchatask import kube, model
from captchatask.decision import Outcome, Result
from captchatask.ledger import Ledger
from captchatask.model import DeadLetterPhase, DeadLetterReason, DeliveredBy, TaskRef, TaskView

#: First retry delay; doubles per attempt up to the cap. A task created "soon" after its
#: pingback (the app registered late) is found on an early attempt.
BASE_DELAY_SECONDS: Final = 5.0
MAX_DELAY_SECONDS: Final = 300.0
#: After this many attempts, or this age, an unmatched letter is Expired and waits for a human.
DEFAULT_MAX_ATTEMPTS: Final = 12
DEFAULT_MAX_AGE: Final = dt.timedelta(hours=24)
#: Requeued letters are deleted this long after they were applied (kept briefly for audit).
DEFAULT_REQUEUED_TTL: Final = dt.timedelta(hours=1)

JsonPatch = list[dict[str, Any]]
#: Beyond this exponent the ceiling is the cap anyway; bounding it keeps the float finite.
_MAX_EXPONENT: Final = 32


class RequeueOutcome(StrEnum):
    """The bounded label set of ``captchatask_dead_letter_requeues_total{outcome}``."""

    APPLIED = "applied"
    ALREADY_DONE = "already_done"
    NO_MATCH = "no_match"
    EXPIRED = "expired"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class LetterView:
    """A typed read-only view of a CaptchaDeadLetter body."""

    namespace: str
    name: str
    uid: str
    resource_version: str
    created_at: dt.datetime | None
    reason: str
    message: str
    task_name: str | None
    task_uid: str | None
    provider_task_id: str | None
    code: str
    user_agent: str | None
    received_at: dt.datetime | None
    phase: DeadLetterPhase
    attempts: int
    next_attempt_at: dt.datetime | None
    requeued_at: dt.datetime | None
    redriven_at: dt.datetime | None
    status: Mapping[str, Any]

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> LetterView:
        """Build the view; a letter with no status yet is ``Pending``."""
        meta: Mapping[str, Any] = body.get("metadata") or {}
        spec: Mapping[str, Any] = body.get("spec") or {}
        status: Mapping[str, Any] = body.get("status") or {}
        task_ref: Mapping[str, Any] = spec.get("taskRef") or {}
        payload: Mapping[str, Any] = spec.get("payload") or {}
        phase = status.get("phase")
        attempts = status.get("attempts")
        return cls(
            namespace=str(meta.get("namespace", "")),
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            resource_version=str(meta.get("resourceVersion", "")),
            created_at=model.parse_time(meta.get("creationTimestamp")),
            reason=str(spec.get("reason", "")),
            message=str(spec.get("message", "")),
            task_name=task_ref.get("name") or None,
            task_uid=task_ref.get("uid") or None,
            provider_task_id=spec.get("providerTaskId") or None,
            code=str(payload.get("code", "")),
            user_agent=payload.get("userAgent") or None,
            received_at=model.parse_time(spec.get("receivedAt")),
            phase=model.parse_enum(DeadLetterPhase, phase) or DeadLetterPhase.PENDING,
            attempts=attempts if isinstance(attempts, int) else 0,
            next_attempt_at=model.parse_time(status.get("nextAttemptAt")),
            requeued_at=model.parse_time(status.get("requeuedAt")),
            redriven_at=model.parse_time(status.get("redrivenAt")),
            status=status,
        )

    @property
    def key(self) -> tuple[str, str]:
        """The letter's identity in the operator's maps (namespace, name)."""
        return (self.namespace, self.name)

    @property
    def born(self) -> dt.datetime | None:
        """Where the letter's age counts from: receipt, or the last redrive by a human.

        A redrive restarts the clock, so a letter redriven after its ``max_age`` gets a full
        retry window again instead of expiring on its first unmatched attempt.
        """
        first = self.received_at or self.created_at
        if self.redriven_at is not None and (first is None or self.redriven_at > first):
            return self.redriven_at
        return first

    def result(self) -> Result:
        """The result this letter carries, to be delivered ``by deadLetter``."""
        if self.code.startswith("ERROR_") or self.code.startswith("ERROR:"):
            return Result.failed(
                code=self.code,
                message="reported by the provider (requeued from a dead letter)",
                delivered_by=DeliveredBy.DEAD_LETTER,
                provider_task_id=self.provider_task_id,
            )
        return Result.solved(
            token=self.code,
            user_agent=self.user_agent,
            delivered_by=DeliveredBy.DEAD_LETTER,
            provider_task_id=self.provider_task_id,
        )


def retry_delay(
    attempts: int,
    *,
    rng: random.Random | None = None,
    base: float = BASE_DELAY_SECONDS,
    cap: float = MAX_DELAY_SECONDS,
) -> float:
    """Exponential backoff with jitter on the upper half, capped (pure but for ``rng``).

    The delay after attempt ``n`` lies in ``[c/2, c]`` with ``c = min(cap, base * 2**n)``: at
    least half the ceiling, so a burst of letters spreads out without any retrying too early.
    """
    ceiling = min(cap, base * float(2 ** min(max(0, attempts), _MAX_EXPONENT)))
    jitter: float = (rng or random).uniform(0, ceiling / 2)
    return ceiling / 2 + jitter


def expiry_reason(
    letter: LetterView,
    *,
    attempts: int,
    now: dt.datetime,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    max_age: dt.timedelta = DEFAULT_MAX_AGE,
) -> str | None:
    """Why an unmatched letter should stop being retried, or ``None`` to keep trying."""
    if attempts >= max_attempts:
        return f"no matching task after {attempts} attempts ({letter.reason})"
    born = letter.born
    if born is not None and now - born >= max_age:
        return f"no matching task within {max_age} ({letter.reason})"
    return None


def matches(letter: LetterView, task: TaskView) -> bool:
    """Whether the letter's result belongs to this task (same instance, or same provider id)."""
    if task.deleting:
        return False
    if letter.task_uid and letter.task_uid == task.ref.uid:
        return True
    return bool(letter.provider_task_id) and task.known_provider_task_id == letter.provider_task_id


class TaskLookup(Protocol):
    """An index of the tasks a component already watches (the operator's in-memory index).

    It only names *candidates*: :func:`find_task` still reads each one and checks
    :func:`matches` on the fresh body, so a stale index costs a retry, never a wrong match.
    """

    def candidates(
        self, namespace: str, *, name: str | None, provider_task_id: str | None
    ) -> Sequence[str]:
        """Names of tasks in ``namespace`` called ``name`` or owning ``provider_task_id``."""
        ...


async def find_task(
    client: kube.KubeClient, letter: LetterView, *, lookup: TaskLookup
) -> TaskView | None:
    """Find the task a letter belongs to: by its reference, else by provider id.

    The ``lookup`` is the operator's in-memory index of the tasks it watches, so a letter whose
    task does not exist costs no API call at all, and a candidate costs one GET (the fresh body
    the ledger's compare-and-set is pinned to).
    """
    names = lookup.candidates(
        letter.namespace, name=letter.task_name, provider_task_id=letter.provider_task_id
    )
    for name in names:
        task = await _get_task(client, letter.namespace, name)
        if task is not None and matches(letter, task):
            return task
    return None


async def _get_task(client: kube.KubeClient, namespace: str, name: str) -> TaskView | None:
    try:
        body = await client.get(kube.TASKS, namespace, name)
    except kube.ApiError as exc:
        if exc.not_found:
            return None
        raise
    return TaskView.from_body(body)


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one requeue attempt did, and the status to write on the letter."""

    outcome: RequeueOutcome
    status: dict[str, Any]
    task: TaskRef | None = None


@dataclass(frozen=True, slots=True)
class Backoff:
    """The requeue loop's retry policy (the operator's settings; defaults as documented)."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_age: dt.timedelta = DEFAULT_MAX_AGE
    base: float = BASE_DELAY_SECONDS
    cap: float = MAX_DELAY_SECONDS


async def requeue(
    ledger: Ledger,
    letter: LetterView,
    *,
    lookup: TaskLookup,
    backoff: Backoff | None = None,
    rng: random.Random | None = None,
) -> Attempt:
    """Try once to apply a pending letter to its task; return the letter's next status.

    Idempotent: applying twice yields ``already_done`` the second time (the ledger sees a
    duplicate), so a crash between the task write and the letter write is harmless.

    Raises
    ------
    kube.KubeError
        The API server failed or was away; nothing about the letter changed (count it as an
        ``error`` and retry later without spending an attempt).
    """
    policy = backoff or Backoff()
    now = ledger.clock()
    attempts = letter.attempts + 1
    base: dict[str, Any] = {"attempts": attempts, "lastAttemptAt": model.format_time(now)}
    task = await find_task(ledger.client, letter, lookup=lookup)
    if task is not None:
        recorded = await ledger.record(
            task.ref, letter.result(), hint=task, received_at=letter.received_at
        )
        if recorded.reason is DeadLetterReason.TASK_FAILED:
            # Its task failed before this answer came: no retry will change that, so the
            # letter goes straight to a human, with the answer kept in it.
            return Attempt(
                RequeueOutcome.EXPIRED,
                {
                    **base,
                    "phase": str(DeadLetterPhase.EXPIRED),
                    "message": f"task {task.ref.name}: {recorded.message}"[:1024],
                },
            )
        if recorded.outcome in (Outcome.RECORDED, Outcome.DUPLICATE, Outcome.LATE):
            applied = recorded.outcome is Outcome.RECORDED
            return Attempt(
                RequeueOutcome.APPLIED if applied else RequeueOutcome.ALREADY_DONE,
                {
                    **base,
                    "phase": str(DeadLetterPhase.REQUEUED),
                    "requeuedAt": model.format_time(now),
                    "appliedTo": {"name": task.ref.name, "uid": task.ref.uid},
                    "message": (
                        f"applied to task {task.ref.name}"
                        if applied
                        else f"task {task.ref.name} already had its outcome ({recorded.outcome})"
                    ),
                },
                task.ref,
            )
    reason = expiry_reason(
        letter,
        attempts=attempts,
        now=now,
        max_attempts=policy.max_attempts,
        max_age=policy.max_age,
    )
    if reason is not None:
        return Attempt(
            RequeueOutcome.EXPIRED,
            {**base, "phase": str(DeadLetterPhase.EXPIRED), "message": reason},
        )
    delay = retry_delay(attempts, rng=rng, base=policy.base, cap=policy.cap)
    next_at = now + dt.timedelta(seconds=delay)
    return Attempt(
        RequeueOutcome.NO_MATCH,
        {
            **base,
            "phase": str(DeadLetterPhase.PENDING),
            "nextAttemptAt": model.format_time(next_at),
            "message": "no matching task yet; will retry",
        },
    )


def redrive_status(now: dt.datetime) -> dict[str, Any]:
    """Status that puts a letter back in the queue for an immediate retry (``dlq redrive``)."""
    return {
        "phase": str(DeadLetterPhase.PENDING),
        "attempts": 0,
        "nextAttemptAt": model.format_time(now),
        "message": "redriven by a human",
    }


# -- the letter's own status: compare-and-set, and what to do next ---------------------------


def status_patch(letter: LetterView, fields: Mapping[str, Any]) -> JsonPatch:
    """A JSON patch writing ``fields`` iff the letter is still exactly what was observed.

    Pinning the resourceVersion (not only the phase) is what lets a human win: a ``dlq
    redrive`` landing between our read and our write changes the version, our patch is refused,
    and the redriven status stands. The whole status is replaced so that a field of the old
    phase (``nextAttemptAt`` of a Pending letter) does not linger on a Requeued one.
    """
    merged: dict[str, Any] = {**letter.status, **fields}
    if merged.get("phase") != str(DeadLetterPhase.PENDING):
        merged.pop("nextAttemptAt", None)
    return [
        {"op": "test", "path": "/metadata/uid", "value": letter.uid},
        {"op": "test", "path": "/metadata/resourceVersion", "value": letter.resource_version},
        {"op": "add", "path": "/status", "value": merged},
    ]


async def write_status(
    client: kube.KubeClient, letter: LetterView, fields: Mapping[str, Any]
) -> LetterView | None:
    """Write the letter's status by compare-and-set; ``None`` if it changed or vanished since."""
    try:
        body = await client.patch(
            kube.DEAD_LETTERS,
            letter.namespace,
            letter.name,
            status_patch(letter, fields),
            patch_type=kube.JSON_PATCH,
            subresource="status",
        )
    except kube.ApiError as exc:
        if exc.conflict or exc.not_found:
            return None
        raise
    return LetterView.from_body(body)


class Action(StrEnum):
    """What the requeue loop does with a letter next."""

    ATTEMPT = "attempt"
    DELETE = "delete"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class NextAction:
    """The next action on a letter and when it is due."""

    action: Action
    at: dt.datetime | None = None


def next_action(
    letter: LetterView, *, now: dt.datetime, requeued_ttl: dt.timedelta = DEFAULT_REQUEUED_TTL
) -> NextAction:
    """Decide when a letter is next touched (pure).

    ``Pending``: attempt at ``status.nextAttemptAt``, or now for a new (or redriven) letter.
    ``Requeued``: delete ``requeued_ttl`` after ``requeuedAt``. ``Expired``: nothing; it waits
    for a human (``captchatask dlq redrive`` puts it back to ``Pending``).
    """
    if letter.phase is DeadLetterPhase.PENDING:
        return NextAction(Action.ATTEMPT, letter.next_attempt_at or now)
    if letter.phase is DeadLetterPhase.REQUEUED:
        applied = letter.requeued_at or letter.created_at or now
        return NextAction(Action.DELETE, applied + requeued_ttl)
    return NextAction(Action.NONE)
