"""The ledger: every write of a task's outcome, as a compare-and-set, shared by all writers.

A task's result can arrive by pingback (sidecar), by fallback poll (operator) or from a dead
letter (operator requeue), possibly at the same moment. All three call :meth:`Ledger.record`,
which guarantees *exactly one outcome per task*:

* every status write is a JSON patch whose ``test`` operations pin what the writer observed
  (the task's uid, its phase, its provider task id, or its whole resourceVersion); if another
  writer got there first, the API server refuses the patch and we re-read and re-decide;
* the decision itself is the pure function :func:`captchatask.decision.decide`, so the race
  rules are unit-tested without a cluster: the first result wins, a later identical one is a
  *duplicate*, a pingback for a task that already ended by poll is *late*, and a result that
  belongs to no task instance becomes a dead letter, never a drop. The one exception: a
  solution received before the deadline and before the operator failed the task on its own
  replaces that failure, and one received after it becomes a ``TaskFailed`` dead letter.

The hot path for a pingback is a single PATCH (uid, phase ``Submitted`` and provider id are
tested server-side); only a refused patch costs a GET.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from captchatask import kube, model
from captchatask.decision import (
    JsonPatch,
    Outcome,
    Result,
    ResultKind,
    cas_patch,
    decide,
    fast_path_patch,
    result_status,
    strip_managed_fields_patch,
)
from captchatask.model import DeadLetterReason, TaskRef, TaskView

#: How often record() re-reads and retries after losing a compare-and-set race before giving up.
MAX_CAS_ATTEMPTS: Final = 8

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    """The real clock; tests inject their own."""
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class Recorded:
    """What :meth:`Ledger.record` did, with the task as it is afterwards when known."""

    outcome: Outcome
    task: TaskView | None
    reason: DeadLetterReason | None = None
    message: str = ""


class Ledger:
    """Compare-and-set writes of task state, over the component's :class:`kube.KubeClient`.

    Parameters
    ----------
    client
        The API client.
    clock
        Source of "now" (tests pass a fake clock).
    timeout
        Per-request budget; the sidecar keeps it short so it can spool instead of waiting.
    """

    def __init__(
        self,
        client: kube.KubeClient,
        *,
        clock: Clock = utcnow,
        timeout: float = kube.DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self.client = client
        self.clock = clock
        self.timeout = timeout

    async def get_task(self, namespace: str, name: str) -> TaskView | None:
        """Read a task; ``None`` if it does not exist."""
        try:
            body = await self.client.get(kube.TASKS, namespace, name, timeout=self.timeout)
        except kube.ApiError as exc:
            if exc.not_found:
                return None
            raise
        return TaskView.from_body(body)

    async def patch_status(self, task: TaskView, ops: JsonPatch) -> TaskView | None:
        """Apply a CAS patch to a task's status; ``None`` if a test failed (someone else won)."""
        try:
            body = await self.client.patch(
                kube.TASKS,
                task.ref.namespace,
                task.ref.name,
                ops,
                patch_type=kube.JSON_PATCH,
                subresource="status",
                timeout=self.timeout,
            )
        except kube.ApiError as exc:
            if exc.conflict or exc.not_found:
                return None
            raise
        return TaskView.from_body(body)

    async def strip_managed_fields(self, ref: TaskRef) -> TaskView | None:
        """Drop a task's managedFields and return it; ``None`` if it is gone or another instance.

        Not a status write (the main resource is patched, only ``metadata.managedFields``
        changes) and no compare-and-set of an outcome: it pins only the uid. A task that already
        has none is left unwritten by the API server (a no-op patch).
        """
        try:
            body = await self.client.patch(
                kube.TASKS,
                ref.namespace,
                ref.name,
                strip_managed_fields_patch(ref.uid),
                patch_type=kube.JSON_PATCH,
                timeout=self.timeout,
            )
        except kube.ApiError as exc:
            if exc.conflict or exc.not_found:  # a failed uid test is a conflict
                return None
            raise
        return TaskView.from_body(body)

    async def update_status(
        self, task: TaskView, fields: Mapping[str, Any], *, pin_version: bool = False
    ) -> TaskView | None:
        """Set status fields if the task is still in the phase (and instance) we observed.

        With ``pin_version`` the whole resourceVersion is pinned instead, for writes that must
        not interleave with anything (the first status write, the submission intent).
        Returns the updated task, or ``None`` when the compare-and-set failed.
        """
        had_status = bool(task.status)
        ops = cas_patch(
            uid=task.ref.uid,
            fields=fields,
            resource_version=task.resource_version if (pin_version or not had_status) else None,
            phase=task.phase if (had_status and task.phase and not pin_version) else None,
            had_status=had_status,
        )
        return await self.patch_status(task, ops)

    async def record(
        self,
        ref: TaskRef,
        result: Result,
        *,
        hint: TaskView | None = None,
        received_at: dt.datetime | None = None,
    ) -> Recorded:
        """Record one result for one task instance, exactly once, whoever else is racing.

        Parameters
        ----------
        ref
            The task instance the result belongs to.
        result
            The result.
        hint
            The task as the caller last saw it (the poller has it); without one the first
            attempt optimistically assumes a ``Submitted`` task with this provider id.
        received_at
            When the result was first held (a spool record's receipt time, a letter's
            ``receivedAt``); ``None`` means now. Decides whether a solution replaces a failure
            the operator wrote in the meantime (see :func:`captchatask.decision.decide`).

        Returns
        -------
        Recorded
            ``recorded``, ``duplicate``, ``late`` or ``dead_lettered`` (with the reason; creating
            the dead letter object is the caller's job, see :meth:`dead_letter`).

        Raises
        ------
        kube.KubeUnavailable
            The API server did not answer; nothing is known to be written.
        """
        if hint is None and result.provider_task_id:
            updated = await self._fast_path(ref, result)
            if updated is not None:
                return Recorded(Outcome.RECORDED, updated)
        task = hint
        for _attempt in range(MAX_CAS_ATTEMPTS):
            if task is None:
                task = await self.get_task(ref.namespace, ref.name)
            decision = decide(task, ref, result, received_at=received_at)
            if decision.outcome is Outcome.DEAD_LETTER or task is None:
                return Recorded(decision.outcome, task, decision.reason, decision.message)
            if decision.outcome is not Outcome.RECORDED:
                if decision.outcome is Outcome.LATE and "pingbackAt" not in task.status:
                    task = await self._mark_late(task) or task
                return Recorded(decision.outcome, task, message=decision.message)
            fields = result_status(task, result, self.clock())
            ops = cas_patch(
                uid=task.ref.uid,
                fields=fields,
                resource_version=task.resource_version,
                had_status=bool(task.status),
                # A solution replacing the operator's failure takes the failure away with it.
                remove=("failure",) if "failure" in task.status and "failure" not in fields else (),
            )
            try:
                updated = await self.patch_status(task, ops)
            except kube.ApiError as exc:
                if exc.status == 422:
                    return Recorded(
                        Outcome.DEAD_LETTER,
                        task,
                        DeadLetterReason.LEDGER_REJECTED,
                        f"the API server rejected the result: {exc.message[:300]}",
                    )
                raise
            if updated is not None:
                return Recorded(Outcome.RECORDED, updated, message=decision.message)
            task = None  # lost the race: re-read and decide again
        raise kube.KubeUnavailable(f"{ref.namespace}/{ref.name}: too much write contention")

    async def _fast_path(self, ref: TaskRef, result: Result) -> TaskView | None:
        """Send one PATCH, applied iff the task is this instance, Submitted, same provider id."""
        ops = fast_path_patch(ref, result, self.clock())
        probe = TaskView.from_body(
            {"metadata": {"namespace": ref.namespace, "name": ref.name, "uid": ref.uid}}
        )
        try:
            return await self.patch_status(probe, ops)
        except kube.ApiError as exc:
            if exc.status == 422:  # e.g. no conditions list yet: take the careful path
                return None
            raise

    async def _mark_late(self, task: TaskView) -> TaskView | None:
        """Note when a late pingback arrived (first one only); losing this race is harmless."""
        return await self.update_status(task, {"pingbackAt": model.format_time(self.clock())})

    async def dead_letter(
        self,
        *,
        namespace: str,
        reason: DeadLetterReason,
        message: str,
        ref: TaskRef | None,
        result: Result,
        received_at: dt.datetime,
        received_by: str,
        source: str,
    ) -> str:
        """Create the dead letter for a result that could not be applied; idempotent.

        The name is derived from the task, the provider id and the payload, so the same
        pingback (or a spool replay of it) never makes two letters.
        """
        code = result.token if result.kind is ResultKind.SOLVED else result.code
        digest = hashlib.sha256(
            "\n".join(
                (
                    ref.name if ref else "",
                    ref.uid if ref else "",
                    result.provider_task_id or "",
                    code or "",
                )
            ).encode()
        ).hexdigest()[:12]
        base = (ref.name if ref else "unknown")[:40].rstrip("-.")
        name = f"{base}-{digest}"
        payload: dict[str, Any] = {"code": code or "", "source": source}
        if result.user_agent:
            payload["userAgent"] = result.user_agent
        spec: dict[str, Any] = {
            "reason": str(reason),
            "message": message[:1024],
            "payload": payload,
            "receivedAt": model.format_time(received_at),
            "receivedBy": received_by[:253],
        }
        if ref is not None:
            spec["taskRef"] = {"name": ref.name, "uid": ref.uid}
        if result.provider_task_id:
            spec["providerTaskId"] = result.provider_task_id
        labels = {model.TASK_NAME_LABEL: base} if ref else {}
        body = {
            "apiVersion": model.API_VERSION,
            "kind": model.DEAD_LETTER_KIND,
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": spec,
        }
        try:
            await self.client.create(kube.DEAD_LETTERS, namespace, body, timeout=self.timeout)
        except kube.ApiError as exc:
            if exc.status != 409:  # AlreadyExists: the same letter was written before
                raise
        return name
