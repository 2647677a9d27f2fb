"""Dead letters: what they mean, when to retry or give up, and how one is requeued.

A dead letter is an *authentic* result (its pingback token verified) that could not be applied
when it arrived: its task did not exist yet or any more, was recreated, or named another
provider task. The seed tutorial's dead-letter folder needed a human to remember it; ours are
``CaptchaDeadLetter`` objects that the operator works through on its own (:func:`requeue`), that
``captchatask dlq`` lists and redrives, and that alerts watch.

The matching rule is deliberately strict, because a wrong match would hand one page's token to
another: a letter applies to a task only if it is the *same instance* (uid) or the task is known
to own the *same provider task id* (an adopted task, matched through the
``captchatask.dev/provider-task-id`` label index). Applying goes through the ledger like every
other result, so requeue races with pingbacks and polls safely and yields one outcome.

Everything but :func:`requeue` and :func:`find_task` is pure.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from captchatask import kube, model
from captchatask.ledger import Ledger, Outcome, Result
from captchatask.model import DeadLetterPhase, DeliveredBy, TaskRef, TaskView

#: First retry delay; doubles per attempt up to the cap. A task created "soon" after its
#: pingback (the app registered late) is found on an early attempt.
BASE_DELAY_SECONDS: Final = 5.0
MAX_DELAY_SECONDS: Final = 300.0
#: After this many attempts, or this age, an unmatched letter is Expired and waits for a human.
DEFAULT_MAX_ATTEMPTS: Final = 12
DEFAULT_MAX_AGE: Final = dt.timedelta(hours=24)
#: Requeued letters are deleted this long after they were applied (kept briefly for audit).
DEFAULT_REQUEUED_TTL: Final = dt.timedelta(hours=1)


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
            status=status,
        )

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


def retry_delay(attempts: int, *, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter on the upper half, capped (pure but for ``rng``)."""
    ceiling = min(MAX_DELAY_SECONDS, BASE_DELAY_SECONDS * float(2 ** max(0, attempts)))
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
    born = letter.received_at or letter.created_at
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


async def find_task(client: kube.KubeClient, letter: LetterView) -> TaskView | None:
    """Find the task a letter belongs to: by its reference, else by provider id (label index)."""
    if letter.task_name:
        try:
            body = await client.get(kube.TASKS, letter.namespace, letter.task_name)
        except kube.ApiError as exc:
            if not exc.not_found:
                raise
        else:
            task = TaskView.from_body(body)
            if matches(letter, task):
                return task
    if letter.provider_task_id:
        found = await client.list(
            kube.TASKS,
            letter.namespace,
            label_selector=f"{model.PROVIDER_TASK_ID_LABEL}={letter.provider_task_id}",
        )
        for item in found.get("items", []):
            task = TaskView.from_body(item)
            if matches(letter, task):
                return task
        # Adopted tasks carry the id in spec before any label is set.
        everything = await client.list(kube.TASKS, letter.namespace)
        for item in everything.get("items", []):
            task = TaskView.from_body(item)
            if task.spec_provider_task_id == letter.provider_task_id and matches(letter, task):
                return task
    return None


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one requeue attempt did, and the status to write on the letter."""

    outcome: RequeueOutcome
    status: dict[str, Any]
    task: TaskRef | None = None


async def requeue(
    ledger: Ledger,
    letter: LetterView,
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    max_age: dt.timedelta = DEFAULT_MAX_AGE,
    rng: random.Random | None = None,
) -> Attempt:
    """Try once to apply a pending letter to its task; return the letter's next status.

    Idempotent: applying twice yields ``already_done`` the second time (the ledger sees a
    duplicate), so a crash between the task write and the letter write is harmless.
    """
    now = ledger.clock()
    attempts = letter.attempts + 1
    base: dict[str, Any] = {"attempts": attempts, "lastAttemptAt": model.format_time(now)}
    task = await find_task(ledger.client, letter)
    if task is not None:
        recorded = await ledger.record(task.ref, letter.result(), hint=task)
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
        letter, attempts=attempts, now=now, max_attempts=max_attempts, max_age=max_age
    )
    if reason is not None:
        return Attempt(
            RequeueOutcome.EXPIRED,
            {**base, "phase": str(DeadLetterPhase.EXPIRED), "message": reason},
        )
    next_at = now + dt.timedelta(seconds=retry_delay(attempts, rng=rng))
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
