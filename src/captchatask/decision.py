"""The ledger's decisions, pure: what a result does to a task, and the patch that writes it.

Split from :mod:`captchatask.ledger` (the writer, which does the I/O) so the race rules can be
read, and unit-tested, without a cluster or an event loop: :func:`decide` says what one result
does to one task as last read (the first result wins, a later identical one is a *duplicate*, a
pingback for a task that already ended is *late*, a result for no task instance is a dead
letter, and a solution for a task the operator failed on its own is the one exception to "the
first outcome wins", see :func:`decide`); :func:`result_status` and :func:`set_condition`
build the status fields; and :func:`cas_patch` turns them into a JSON patch whose ``test``
operations are the compare-and-set. Nothing here may import an I/O module (the import-linter
contract in ``pyproject.toml`` checks it).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from captchatask import model
from captchatask.model import DeadLetterReason, DeliveredBy, Phase, TaskRef, TaskView

#: Condition types on CaptchaTask.
CONDITION_SUBMITTED: Final = "Submitted"
CONDITION_COMPLETE: Final = "Complete"

JsonPatch = list[dict[str, Any]]


class ResultKind(StrEnum):
    """A result is either an answer or a permanent failure the provider reported."""

    SOLVED = "solved"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Result:
    """One result for one provider task, however it arrived."""

    kind: ResultKind
    delivered_by: DeliveredBy
    provider_task_id: str | None
    token: str | None = None
    user_agent: str | None = None
    code: str | None = None
    message: str | None = None

    @classmethod
    def solved(
        cls,
        *,
        token: str,
        delivered_by: DeliveredBy,
        provider_task_id: str | None,
        user_agent: str | None = None,
    ) -> Result:
        """An answer."""
        return cls(
            kind=ResultKind.SOLVED,
            delivered_by=delivered_by,
            provider_task_id=provider_task_id,
            token=token,
            user_agent=user_agent,
        )

    @classmethod
    def failed(
        cls,
        *,
        code: str,
        message: str,
        delivered_by: DeliveredBy,
        provider_task_id: str | None,
    ) -> Result:
        """A permanent failure (``ERROR_CAPTCHA_UNSOLVABLE`` and the like)."""
        return cls(
            kind=ResultKind.FAILED,
            delivered_by=delivered_by,
            provider_task_id=provider_task_id,
            code=code,
            message=message,
        )


class Outcome(StrEnum):
    """What recording a result did; the sidecar's metric outcomes use the same words."""

    RECORDED = "recorded"
    DUPLICATE = "duplicate"
    LATE = "late"
    DEAD_LETTER = "dead_lettered"


@dataclass(frozen=True, slots=True)
class Decision:
    """The pure verdict on one result against one observed task."""

    outcome: Outcome
    reason: DeadLetterReason | None = None
    message: str = ""


def decide(
    task: TaskView | None,
    ref: TaskRef,
    result: Result,
    *,
    received_at: dt.datetime | None = None,
) -> Decision:
    """Decide what a result means for the task as observed (pure; the race rules live here).

    The first outcome wins, with one exception. A task the operator failed *on its own*
    (``DeadlineExceeded``, ``PollsExhausted``, ``ResultExpired``: ``Failed`` without
    ``deliveredBy``) may have failed only because a result we had already acknowledged was
    still in a receiver's spool while the API server was away. So a result received before
    the task's deadline *and* before the failure was written replaces the failure (outcome
    ``recorded``); any later solution for such a task is kept as a ``TaskFailed`` dead letter,
    never dropped as late.

    Parameters
    ----------
    task
        The task as last read, or ``None`` if it does not exist.
    ref
        The task instance the result was addressed to (from the signed URL or the poller).
    result
        The result.
    received_at
        When a component first held the result (the spool record's receipt time); ``None``
        means "just now", i.e. after anything already written.
    """
    if task is None or task.deleting:
        return Decision(Outcome.DEAD_LETTER, DeadLetterReason.TASK_NOT_FOUND, "task not found")
    if task.ref.uid != ref.uid:
        return Decision(
            Outcome.DEAD_LETTER,
            DeadLetterReason.TASK_RECREATED,
            "the task was deleted and recreated under the same name",
        )
    known = task.known_provider_task_id
    if known and result.provider_task_id and known != result.provider_task_id:
        return Decision(
            Outcome.DEAD_LETTER,
            DeadLetterReason.PROVIDER_TASK_MISMATCH,
            "the result names another provider task than the one on record",
        )
    if task.phase is not None and task.phase.terminal:
        return _after_outcome(task, result, received_at)
    return Decision(Outcome.RECORDED)


def _after_outcome(task: TaskView, result: Result, received_at: dt.datetime | None) -> Decision:
    """A result for a task that already has an outcome (see :func:`decide`)."""
    if failed_by_operator(task):
        replaced = _after_operator_failure(task, result, received_at)
        if replaced is not None:
            return replaced
    came_by_pingback = result.delivered_by is DeliveredBy.PINGBACK
    ended_by_pingback = task.delivered_by is DeliveredBy.PINGBACK
    if came_by_pingback and not ended_by_pingback:
        return Decision(Outcome.LATE, message=f"task already {task.phase}")
    return Decision(Outcome.DUPLICATE, message=f"task already {task.phase}")


def failed_by_operator(task: TaskView) -> bool:
    """Whether the operator failed the task itself, rather than a provider's result."""
    return task.phase is Phase.FAILED and task.delivered_by is None


def failure_code(task: TaskView) -> str:
    """The failure code on a failed task's status (``Failed`` when absent)."""
    failure: Mapping[str, Any] = task.status.get("failure") or {}
    return str(failure.get("code") or "Failed")


def _after_operator_failure(
    task: TaskView, result: Result, received_at: dt.datetime | None
) -> Decision | None:
    """A result for a task the operator failed: it replaces the failure if it came in time.

    Otherwise a solution is kept as a ``TaskFailed`` letter; a failure the provider reported
    too late has nothing worth keeping and is left to the ordinary rules (``None``).
    """
    code = failure_code(task)
    deadline, failed_at = task.deadline, task.finished_at
    in_time = (
        received_at is not None
        and (deadline is None or received_at <= deadline)
        and (failed_at is None or received_at < failed_at)
    )
    if in_time:
        return Decision(
            Outcome.RECORDED,
            message=f"replaces {code}: the result was received before the deadline and the failure",
        )
    if result.kind is not ResultKind.SOLVED:
        return None
    return Decision(
        Outcome.DEAD_LETTER,
        DeadLetterReason.TASK_FAILED,
        f"the task had already failed ({code}) when this result was received",
    )


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    *,
    type_: str,
    status: str,
    reason: str,
    message: str,
    generation: int,
    now: dt.datetime,
) -> list[dict[str, Any]]:
    """Return conditions with one replaced, keeping ``lastTransitionTime`` unless status flips."""
    out: list[dict[str, Any]] = []
    previous: Mapping[str, Any] | None = None
    for condition in conditions:
        if condition.get("type") == type_:
            previous = condition
        else:
            out.append(dict(condition))
    transition = model.format_time(now)
    if previous is not None and previous.get("status") == status:
        transition = str(previous.get("lastTransitionTime") or transition)
    out.append(
        {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": transition,
            "observedGeneration": generation,
        }
    )
    return out


def result_status(task: TaskView, result: Result, now: dt.datetime) -> dict[str, Any]:
    """The status fields a recorded result sets (pure)."""
    fields: dict[str, Any] = {
        "finishedAt": model.format_time(now),
        "deliveredBy": str(result.delivered_by),
        "observedGeneration": task.generation,
    }
    provider_task_id = task.known_provider_task_id or result.provider_task_id
    if provider_task_id:
        fields["providerTaskId"] = provider_task_id
    if result.delivered_by is DeliveredBy.PINGBACK and "pingbackAt" not in task.status:
        fields["pingbackAt"] = model.format_time(now)
    if result.kind is ResultKind.SOLVED:
        fields["phase"] = str(Phase.SOLVED)
        solution: dict[str, str] = {"token": result.token or ""}
        if result.user_agent:
            solution["userAgent"] = result.user_agent
        fields["solution"] = solution
        reason, message, status = "Solved", f"solved, delivered by {result.delivered_by}", "True"
    else:
        fields["phase"] = str(Phase.FAILED)
        fields["failure"] = {"code": result.code or "Unknown", "message": result.message or ""}
        reason = condition_reason(result.code or "Failed")
        message, status = f"failed: {result.code}", "True"
    if failed_by_operator(task):
        message += f"; replaces {failure_code(task)} (received before it)"
    fields["conditions"] = set_condition(
        task.status.get("conditions") or [],
        type_=CONDITION_COMPLETE,
        status=status,
        reason=reason,
        message=message,
        generation=task.generation,
        now=now,
    )
    return fields


def condition_reason(code: str) -> str:
    """Turn ``ERROR_CAPTCHA_UNSOLVABLE`` into the CamelCase ``CaptchaUnsolvable``."""
    words = code.removeprefix("ERROR_").replace(":", " ").replace("_", " ").split()
    camel = "".join(word[:1].upper() + word[1:].lower() for word in words if word.isalnum())
    return camel or "Failed"


def cas_patch(
    *,
    uid: str,
    fields: Mapping[str, Any],
    resource_version: str | None = None,
    phase: Phase | None = None,
    provider_task_id: str | None = None,
    had_status: bool = True,
    remove: Sequence[str] = (),
) -> JsonPatch:
    """Build a JSON patch that sets status ``fields`` only if the pinned observations still hold.

    Each ``test`` op makes the API server refuse the whole patch when another writer changed
    what we based our decision on; that refusal is our compare-and-set failure. ``remove``
    names status fields to drop (present ones only: removing an absent field fails the patch).
    """
    ops: JsonPatch = [{"op": "test", "path": "/metadata/uid", "value": uid}]
    if resource_version is not None:
        ops.append({"op": "test", "path": "/metadata/resourceVersion", "value": resource_version})
    if phase is not None:
        ops.append({"op": "test", "path": "/status/phase", "value": str(phase)})
    if provider_task_id is not None:
        ops.append({"op": "test", "path": "/status/providerTaskId", "value": provider_task_id})
    if not had_status:
        ops.append({"op": "add", "path": "/status", "value": dict(fields)})
        return ops
    ops.extend(
        {"op": "add", "path": f"/status/{key}", "value": value} for key, value in fields.items()
    )
    ops.extend({"op": "remove", "path": f"/status/{key}"} for key in remove)
    return ops


def fast_path_patch(ref: TaskRef, result: Result, now: dt.datetime) -> JsonPatch:
    """The ledger's one-PATCH write of a result, without reading the task first (pure).

    The API server applies it only if the task is still ``ref``'s instance, ``Submitted`` and
    waiting for this provider task id; the Complete condition is appended (a ``Submitted`` task
    has a conditions list: its Submitted condition). It is also the patch
    :mod:`bench.ceiling` sends, so the raw ceiling measures the very write a pingback makes.

    Raises
    ------
    ValueError
        The result names no provider task id (there is nothing to pin; take the careful path).
    """
    if not result.provider_task_id:
        raise ValueError("the fast path needs the result's provider task id")
    fields = {
        key: value
        for key, value in result_status(_SUBMITTED_PLACEHOLDER, result, now).items()
        if key not in ("conditions", "observedGeneration")
    }
    ops = cas_patch(
        uid=ref.uid,
        fields=fields,
        phase=Phase.SUBMITTED,
        provider_task_id=result.provider_task_id,
    )
    ops.append(
        {
            "op": "add",
            "path": "/status/conditions/-",
            "value": {
                "type": CONDITION_COMPLETE,
                "status": "True",
                "reason": "Solved"
                if result.kind is ResultKind.SOLVED
                else condition_reason(result.code or "Failed"),
                "message": f"{result.kind}, delivered by {result.delivered_by}",
                "lastTransitionTime": model.format_time(now),
            },
        }
    )
    return ops


#: The task :func:`fast_path_patch` assumes: ``Submitted``, nothing else known.
_SUBMITTED_PLACEHOLDER: Final = TaskView.from_body(
    {"metadata": {}, "status": {"phase": "Submitted"}}
)


def strip_managed_fields_patch(uid: str) -> JsonPatch:
    """A JSON patch that drops an object's managedFields, if it is still this instance (pure).

    ``[{}]`` is the API server's documented way to reset managedFields (an empty list is
    ignored on purpose). Once an object has none, the API server records none for later
    non-apply writes either, so the status writes of the ledger stay untracked.
    """
    return [
        {"op": "test", "path": "/metadata/uid", "value": uid},
        {"op": "add", "path": "/metadata/managedFields", "value": [{}]},
    ]
