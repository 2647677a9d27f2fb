"""How the operator ends a task itself: failing it, and deleting it after its TTL.

Most tasks end with a result a delivery path wrote (pingback, poll, dead-letter requeue). The
operator ends the others: a task past its deadline, one whose spec the provider can never take,
one the provider reported as failed at submission. :meth:`Endings.fail` writes that failure like
every other outcome, as a compare-and-set that re-reads on a lost race and never overwrites an
outcome that got there first. :meth:`Endings.delete` removes a finished task once its
``ttlSecondsAfterFinished`` is up, and only the same instance (uid precondition). Both are
bounded to :data:`ENDINGS_CONCURRENCY` requests at once, because they come in floods: every
deadline that passed during an API-server outage falls due in the same tick when it returns.

Like the engine's other parts, it sees the engine only through
:class:`~captchatask_operator.actions.EngineActions`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from captchatask import kube
from captchatask.decision import CONDITION_COMPLETE, Result, result_status
from captchatask.events import EventType
from captchatask.model import DeliveredBy, TaskRef, TaskView
from captchatask_operator import policy
from captchatask_operator.actions import Deps, EngineActions
from captchatask_operator.metrics import failure_label
from captchatask_operator.records import TaskRecord
from captchatask_operator.schedule import Kind

logger = logging.getLogger(__name__)

#: Failures and TTL deletions in flight at once. After an outage longer than many deadlines,
#: all of them come due in one timer tick; unbounded, they would queue in the operator's one
#: connection pool (100), whose per-request timeout counts the queueing, and time out there as
#: ``KubeUnavailable`` without the API server being at fault, starving polls and watches too.
ENDINGS_CONCURRENCY: Final = 16


def camel(code: str) -> str:
    """``ERROR_CAPTCHA_UNSOLVABLE`` -> ``CaptchaUnsolvable``; CamelCase codes stay as they are."""
    if "_" not in code and code[:1].isupper() and not code.isupper():
        return code
    words = code.removeprefix("ERROR_").replace(":", " ").replace("_", " ").split()
    return "".join(w[:1].upper() + w[1:].lower() for w in words if w.isalnum()) or "Failed"


class Endings:
    """The part of the engine that fails and deletes tasks."""

    def __init__(self, engine: EngineActions, deps: Deps) -> None:
        self.engine = engine
        self.deps = deps
        self._sem = asyncio.Semaphore(ENDINGS_CONCURRENCY)

    async def fail(
        self,
        ref: TaskRef,
        code: str,
        message: str,
        *,
        reason: str | None = None,
        view: TaskView | None = None,
    ) -> None:
        """Fail a task with ``code`` unless it already has an outcome (CAS, re-read on loss).

        At most :data:`ENDINGS_CONCURRENCY` failures and deletions talk to the API server at
        once; the others wait here (holding their task's action lock, as they would anyway).
        """
        async with self._sem:
            await self._fail(ref, code, message, reason=reason, view=view)

    async def _fail(
        self,
        ref: TaskRef,
        code: str,
        message: str,
        *,
        reason: str | None,
        view: TaskView | None,
    ) -> None:
        current = view
        for _ in range(policy.MAX_CAS_RETRIES):
            if current is None:
                current = await self.engine.fresh(ref)
            if current is None or (current.phase and current.phase.terminal):
                self.engine.remember(current)
                return
            now = self.deps.clock()
            fields = result_status(
                current,
                Result.failed(
                    code=code,
                    message=message,
                    delivered_by=DeliveredBy.POLL,
                    provider_task_id=current.known_provider_task_id,
                ),
                now,
            )
            fields.pop("deliveredBy", None)  # the operator decided this, no delivery path did
            for condition in fields["conditions"]:
                if condition.get("type") == CONDITION_COMPLETE:
                    condition["reason"] = reason or camel(code)
            written = await self.deps.ledger.update_status(current, fields, pin_version=True)
            self.engine.counters.status_writes += 1
            if written is not None:
                provider = (written.ref.namespace, written.provider)
                self.deps.metrics.ensure_provider(*provider)
                self.deps.metrics.permanent_failures.labels(*provider, failure_label(code)).inc()
                self.engine.event(ref, EventType.WARNING, "Failed", f"{code}: {message}")
                self.engine.remember(written)
                return
            current = None
        raise kube.KubeUnavailable(f"{ref.namespace}/{ref.name}: write contention")

    async def delete(self, task: TaskRecord) -> None:
        """TTL: delete a finished task, only if it is still the same instance (bounded too)."""
        try:
            async with self._sem:
                await self.deps.client.delete(
                    kube.TASKS, task.ref.namespace, task.ref.name, uid=task.ref.uid
                )
        except kube.ApiError as exc:
            if not (exc.not_found or exc.conflict):
                logger.warning("TTL delete of %s/%s failed: %s", *task.key, exc)
        except kube.KubeUnavailable:
            self.engine.schedule_at(Kind.TTL, task.key, self.deps.clock() + policy.API_RETRY)
