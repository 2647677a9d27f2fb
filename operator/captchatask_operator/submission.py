"""Submission: intent (compare-and-set) -> ``in.php`` -> ``Submitted`` (compare-and-set).

The intent (``status.submission.intentAt`` and ``attempts + 1``) is written with the
resourceVersion of a fresh read pinned, before ``in.php`` is called, so two replicas can never
both submit and a crash between the call and the ``Submitted`` write leaves a visible, bounded
*unresolved intent* (docs: concepts/operator, "Crash safety of submission"). Adopted tasks
(``spec.providerTaskId``) skip ``in.php`` and go straight to ``Submitted``. Waiting tasks get a
``Submitted=False`` condition naming why. Every action here runs under the engine's per-task
lock (:meth:`Engine.run`), which re-decides the task when the action ends.

At most one paid provider task per ``in.php`` outcome we cannot see:

* an ``in.php`` that failed after its request may have reached the provider
  (:func:`policy.is_ambiguous`) is recorded exactly like a crash after ``in.php``: the intent
  stays unresolved (``submission.ambiguousAt``, no ``nextAttemptAt``), one
  ``SubmissionAmbiguous`` Warning is posted and ``captchatask_submissions_total{outcome=
  "ambiguous"}`` counted; the task's own pingback (signed for this task) can still record the
  result, and only after the pingback grace is it submitted again;
* an id ``in.php`` did return is never dropped because the API server is away: the
  ``Submitted`` write is retried with capped back-off until it is durable (if the process dies
  meanwhile, the unresolved intent above applies).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from captchatask import kube, model
from captchatask.decision import CONDITION_SUBMITTED, set_condition
from captchatask.events import EventType
from captchatask.model import Phase, TaskView
from captchatask.provider import tasks as provider_tasks
from captchatask.provider.codes import Classification, Verdict
from captchatask.provider.errors import ProviderError
from captchatask_operator import policy
from captchatask_operator.actions import Deps, EngineActions, ProviderState
from captchatask_operator.policy import FailureCode, StepKind, WaitReason
from captchatask_operator.records import ProviderSpec, TaskRecord

logger = logging.getLogger(__name__)


class Submitter:
    """The submission part of the engine."""

    def __init__(self, engine: EngineActions, deps: Deps) -> None:
        self.engine = engine
        self.deps = deps

    async def submit(self, task: TaskRecord) -> None:
        """Submit one task: intent (CAS) -> in.php -> Submitted (CAS); see the module docs."""
        engine = self.engine
        # The read the intent is pinned on; it also drops the task's managedFields (one PATCH
        # instead of a GET, see Engine.fresh_compact).
        view = await engine.fresh_compact(task.ref)
        if view is None:
            return
        record = engine.store(view)
        state = engine.providers.get(record.provider_key)
        step = policy.submission_step(
            record,
            provider=state.spec if state else None,
            provider_ready=bool(state and state.ready),
            provider_reason=state.reason if state else "NotFound",
            now=self.deps.clock(),
            max_attempts=self.deps.settings.max_submit_attempts,
            poll_only_grace=self.deps.settings.intent_grace_seconds,
            ledger_unavailable_at=engine.ledger_unavailable_at,
            ledger_unavailable_since=engine.ledger_unavailable_since,
        )
        if step.kind is not StepKind.SUBMIT or state is None or state.client is None:
            return  # the engine re-decides from the fresh record
        spec = state.spec
        pingback_url = None
        if spec.public_url is not None:
            assert self.deps.signer is not None  # a provider without a signer is never Ready
            pingback_url = self.deps.signer.url(spec.public_url, record.ref)
        try:
            params = provider_tasks.build_submit_params(
                view.spec, dialect=spec.dialect, pingback_url=pingback_url
            )
        except provider_tasks.SpecError as exc:
            await engine.fail(record.ref, FailureCode.INVALID_SPEC, str(exc), view=view)
            return
        if step.resubmit:
            self.deps.metrics.submissions.labels(*spec.key, "resubmitted").inc()
            engine.event(
                record.ref,
                EventType.WARNING,
                "Resubmitting",
                "no provider task id was recorded for the submission started at "
                f"{model.format_time(record.intent_at or self.deps.clock())} and no pingback came; "
                f"submitting again (attempt {record.attempts + 1} of "
                f"{self.deps.settings.max_submit_attempts})",
            )
        previous: Mapping[str, Any] = view.status.get("submission") or {}
        attempts = record.attempts
        intent = {
            "phase": str(view.phase or Phase.PENDING),
            "submission": {
                **{k: v for k, v in previous.items() if k != "nextAttemptAt"},
                "intentAt": model.format_time(self.deps.clock()),
                "attempts": attempts + 1,
            },
        }
        pinned = await self.deps.ledger.update_status(view, intent, pin_version=True)
        engine.counters.status_writes += 1
        if pinned is None:
            return  # someone changed the task since our GET: re-decide
        engine.store(pinned)
        engine.counters.submits += 1
        try:
            provider_task_id = await state.client.submit(params)
        except ProviderError as exc:
            await self._submit_failed(pinned, state, exc, attempts=attempts)
            return
        self.deps.metrics.submissions.labels(*spec.key, "submitted").inc()
        await self._write_submitted(
            pinned,
            provider_task_id=provider_task_id,
            provider=spec,
            submitted_at=self.deps.clock(),
            reason="Submitted",
            message=f"submitted to {spec.name} as provider task {provider_task_id}",
        )

    async def _submit_failed(
        self, view: TaskView, state: ProviderState, exc: ProviderError, *, attempts: int
    ) -> None:
        """Record why in.php failed: fail, park, or back off with the documented wait."""
        engine = self.engine
        classification = exc.classification
        label = state.spec.key
        verdict = classification.effective_verdict
        if verdict is Verdict.TASK_FAILED:
            self.deps.metrics.submissions.labels(*label, "task_failed").inc()
            await engine.fail(view.ref, classification.code, classification.reason, view=view)
            return
        now = self.deps.clock()
        ambiguous = policy.is_ambiguous(classification)
        if ambiguous:
            await self._submit_ambiguous(view, state, classification, now=now)
            return
        if verdict is Verdict.CONFIG_ERROR:
            self.deps.metrics.submissions.labels(*label, "config_error").inc()
            wait = self.deps.settings.provider_retry_seconds
            engine.provider_not_ready(
                state, policy.provider_verdict(state.spec.dialect, error=classification)
            )
        else:
            self.deps.metrics.submissions.labels(*label, "retry_later").inc()
            wait = classification.wait_seconds or policy.DEFAULT_ERROR_WAIT_SECONDS
        previous: Mapping[str, Any] = view.status.get("submission") or {}
        fields = {
            "submission": {
                **previous,
                # A definite rejection created nothing remotely: it costs no attempt.
                "attempts": attempts,
                "nextAttemptAt": model.format_time(now + dt.timedelta(seconds=wait)),
                "lastError": f"{classification.code}: {classification.reason}"[:1024],
            }
        }
        written = await self.deps.ledger.update_status(view, fields, pin_version=True)
        engine.counters.status_writes += 1
        if written is None:
            written = await engine.fresh(view.ref)
        if written is not None:
            engine.store(written)
        if verdict is not Verdict.CONFIG_ERROR:
            engine.event(
                view.ref,
                EventType.WARNING,
                "SubmitRetry",
                f"in.php answered {classification.code}; retrying in {wait:g}s",
            )

    async def _submit_ambiguous(
        self,
        view: TaskView,
        state: ProviderState,
        classification: Classification,
        *,
        now: dt.datetime,
    ) -> None:
        """Record an in.php that may have created a task: leave the intent unresolved.

        No ``nextAttemptAt`` is written, so :func:`policy.submission_step` treats the task like
        one whose operator crashed after ``in.php``: it waits the pingback grace from ``now``
        (a pingback records the result and the id), then submits again. The intent write
        already counted the attempt.
        """
        engine = self.engine
        self.deps.metrics.submissions.labels(*state.spec.key, "ambiguous").inc()
        previous: Mapping[str, Any] = view.status.get("submission") or {}
        fields = {
            "submission": {
                **{k: v for k, v in previous.items() if k != "nextAttemptAt"},
                "ambiguousAt": model.format_time(now),
                "lastError": f"{classification.code}: {classification.reason}"[:1024],
            }
        }
        written = await self.deps.ledger.update_status(view, fields, pin_version=True)
        engine.counters.status_writes += 1
        if written is None:
            written = await engine.fresh(view.ref)
        if written is not None:
            engine.store(written)
        grace = policy.intent_grace(
            state.spec, poll_only_grace=self.deps.settings.intent_grace_seconds
        )
        waits_for = "its result by polling" if state.spec.poll_only else "its pingback"
        engine.event(
            view.ref,
            EventType.WARNING,
            "SubmissionAmbiguous",
            f"in.php failed with {classification.code} after the request may have reached the "
            f"provider, so a provider task may exist; waiting {grace:g}s for {waits_for} "
            "before submitting again",
        )

    async def _write_submitted(
        self,
        view: TaskView,
        *,
        provider_task_id: str,
        provider: ProviderSpec,
        submitted_at: dt.datetime,
        reason: str,
        message: str,
    ) -> None:
        """Write ``Submitted`` with the provider id, retrying lost races until settled.

        The id exists only in memory until this write is durable, so an API server that is
        away does not make us drop it: the write is retried with capped back-off
        (:func:`policy.id_write_retry_delay`) for as long as it takes, re-reading first (a
        write whose reply was lost may have applied). Lost compare-and-set races are retried
        :data:`policy.MAX_CAS_RETRIES` times.
        """
        engine = self.engine
        current: TaskView | None = view
        races = 0
        failures = 0
        stale = False
        while races < policy.MAX_CAS_RETRIES:
            try:
                if stale:
                    current = await engine.fresh(view.ref)
                    stale = False
                written = await self._try_submitted(
                    current,
                    provider_task_id=provider_task_id,
                    provider=provider,
                    submitted_at=submitted_at,
                    reason=reason,
                    message=message,
                )
            except kube.KubeUnavailable as exc:
                engine.note_ledger_unavailable()
                failures += 1
                delay = policy.id_write_retry_delay(failures)
                logger.warning(
                    "provider task id of %s/%s not written yet (attempt %d), retrying in %.1fs: %s",
                    view.ref.namespace,
                    view.ref.name,
                    failures,
                    delay,
                    exc,
                )
                await engine.ledger_back(delay)  # or less: the API server answers again
                stale = True
                continue
            if written is not False:
                return
            races += 1
            stale = True
        engine.remember(await engine.fresh(view.ref))

    async def _try_submitted(
        self,
        current: TaskView | None,
        *,
        provider_task_id: str,
        provider: ProviderSpec,
        submitted_at: dt.datetime,
        reason: str,
        message: str,
    ) -> bool | None:
        """One ``Submitted`` write: ``True`` written, ``False`` race lost, ``None`` not needed."""
        engine = self.engine
        if current is None or current.deleting or (current.phase and current.phase.terminal):
            engine.remember(current)
            return None  # gone, or a pingback already delivered the result: nothing to add
        if current.provider_task_id == provider_task_id and current.phase is Phase.SUBMITTED:
            engine.remember(current)
            return None  # an earlier attempt applied although its reply was lost
        if current.provider_task_id not in (None, provider_task_id):
            engine.remember(current)
            return None
        probe = replace(
            TaskRecord.from_view(current, now=self.deps.clock()), submitted_at=submitted_at
        )
        first_poll = policy.first_poll_at(probe, provider)
        fields = {
            "phase": str(Phase.SUBMITTED),
            "providerTaskId": provider_task_id,
            "submittedAt": model.format_time(submitted_at),
            "nextPollAt": model.format_time(first_poll),
            "polls": 0,
            "observedGeneration": current.generation,
            "conditions": set_condition(
                current.status.get("conditions") or [],
                type_=CONDITION_SUBMITTED,
                status="True",
                reason=reason,
                message=message,
                generation=current.generation,
                now=submitted_at,
            ),
        }
        written = await self.deps.ledger.update_status(current, fields, pin_version=True)
        engine.counters.status_writes += 1
        if written is None:
            return False
        engine.event(written.ref, EventType.NORMAL, reason, message)
        engine.remember(written)
        return True

    async def adopt(self, task: TaskRecord) -> None:
        """A task created with spec.providerTaskId goes straight to Submitted (no in.php)."""
        engine = self.engine
        view = await engine.fresh(task.ref)
        if view is None or view.spec_provider_task_id is None:
            return
        if view.phase is Phase.SUBMITTED or (view.phase and view.phase.terminal):
            engine.remember(view)
            return
        state = engine.providers.get((view.ref.namespace, view.provider))
        if state is None:
            await self.write_waiting(
                TaskRecord.from_view(view, now=self.deps.clock()),
                WaitReason.PROVIDER_NOT_FOUND,
                f"CaptchaProvider {view.provider!r} does not exist",
            )
            return
        # An adopted task was submitted by the app just before it created the object; an
        # external task's id arrives later (sidecar `track`), right after its submission.
        submitted_at = (
            self.deps.clock() if view.external else (view.created_at or self.deps.clock())
        )
        await self._write_submitted(
            view,
            provider_task_id=view.spec_provider_task_id,
            provider=state.spec,
            submitted_at=submitted_at,
            reason="Adopted",
            message=f"adopted provider task {view.spec_provider_task_id}: polling only",
        )

    async def write_waiting(self, task: TaskRecord, reason: str, message: str) -> None:
        """Record why a task waits (condition Submitted=False), once per reason."""
        engine = self.engine
        view = await engine.fresh(task.ref)
        if view is None or view.phase is Phase.SUBMITTED or (view.phase and view.phase.terminal):
            engine.remember(view)
            return
        now = self.deps.clock()
        queued = reason == WaitReason.QUEUED
        phase = Phase.QUEUED if queued else (view.phase or Phase.PENDING)
        fields: dict[str, Any] = {
            "phase": str(phase),
            "observedGeneration": view.generation,
            "conditions": set_condition(
                view.status.get("conditions") or [],
                type_=CONDITION_SUBMITTED,
                status="False",
                reason=reason,
                message=message,
                generation=view.generation,
                now=now,
            ),
        }
        if queued and "queuedAt" not in view.status:
            fields["queuedAt"] = model.format_time(now)
        written = await self.deps.ledger.update_status(view, fields, pin_version=True)
        engine.counters.status_writes += 1
        if written is not None:
            engine.store(written)
            event_type = (
                EventType.WARNING
                if reason in (WaitReason.PROVIDER_NOT_READY, WaitReason.PROVIDER_NOT_FOUND)
                else EventType.NORMAL
            )
            engine.event(view.ref, event_type, "Queued" if queued else reason, message)
