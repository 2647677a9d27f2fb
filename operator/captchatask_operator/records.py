"""Slim, typed views of CaptchaTask and CaptchaProvider bodies, as the operator keeps them.

The operator holds one :class:`TaskRecord` per live task in memory (for the scheduler, the
queues and the ``captchatask_tasks`` gauge). A full body can carry an 800 kB image, so a record
keeps only the fields that drive decisions; the spec is re-read from the API server at the one
moment it is needed (submission), which is also the read the submission intent is pinned to.

Pure: no I/O, no kopf.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from captchatask import model
from captchatask.model import DeliveredBy, Phase, TaskRef, TaskView
from captchatask.provider.codes import Dialect

#: CRD defaults of CaptchaProvider.spec.polling (repeated for bodies read before defaulting).
DEFAULT_CALLBACK_TIMEOUT: Final = 120
DEFAULT_POLL_INTERVAL: Final = 30
DEFAULT_MAX_POLLS: Final = 20
DEFAULT_RECHECK_SECONDS: Final = 300
DEFAULT_BASE_URL: Final = "https://ocr.captchaai.com"
DEFAULT_SECRET_KEY: Final = "apiKey"  # noqa: S105 - the key *name* in the Secret


def _int(mapping: Mapping[str, Any], key: str, default: int) -> int:
    value = mapping.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _str(mapping: Mapping[str, Any], key: str) -> str | None:
    value = mapping.get(key)
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """What the operator remembers about one task between watch events."""

    ref: TaskRef
    resource_version: str
    generation: int
    provider: str
    task_type: str
    created_at: dt.datetime
    deadline: dt.datetime
    ttl_seconds: int
    external: bool
    spec_provider_task_id: str | None
    deleting: bool
    phase: Phase | None
    provider_task_id: str | None
    submitted_at: dt.datetime | None
    finished_at: dt.datetime | None
    delivered_by: DeliveredBy | None
    polls: int
    last_poll_at: dt.datetime | None
    next_poll_at: dt.datetime | None
    intent_at: dt.datetime | None
    #: When ``in.php`` last failed after its request may have reached the provider.
    ambiguous_at: dt.datetime | None
    attempts: int
    next_attempt_at: dt.datetime | None
    waiting_reason: str | None

    @property
    def key(self) -> tuple[str, str]:
        """The task's identity in the operator's maps (namespace, name)."""
        return (self.ref.namespace, self.ref.name)

    @property
    def provider_key(self) -> tuple[str, str]:
        """The provider's identity (same namespace as the task)."""
        return (self.ref.namespace, self.provider)

    @property
    def terminal(self) -> bool:
        """Whether the task has its one outcome."""
        return self.phase is not None and self.phase.terminal

    @property
    def known_provider_task_id(self) -> str | None:
        """The provider's id, from status or (adopted tasks) from spec."""
        return self.provider_task_id or self.spec_provider_task_id

    @property
    def unresolved_intent(self) -> bool:
        """An in.php call was started but neither its id nor its rejection was recorded.

        That is exactly the state a crash between the intent write and the ``Submitted`` write
        leaves behind, and the state an *ambiguous* failure (the request may have reached the
        provider: ``submission.ambiguousAt``) is recorded as; a definite rejection always
        writes ``nextAttemptAt`` after the intent.
        """
        if self.intent_at is None or self.phase is Phase.SUBMITTED or self.terminal:
            return False
        if self.provider_task_id is not None:
            return False
        return self.next_attempt_at is None or self.next_attempt_at < self.intent_at

    @classmethod
    def from_view(cls, view: TaskView, *, now: dt.datetime) -> TaskRecord:
        """Slim a parsed task down; ``now`` stands in for a missing creation timestamp."""
        status = view.status
        submission: Mapping[str, Any] = status.get("submission") or {}
        created = view.created_at or now
        waiting = None
        for condition in status.get("conditions") or []:
            if condition.get("type") == "Submitted" and condition.get("status") == "False":
                waiting = _str(condition, "reason")
        return cls(
            ref=view.ref,
            resource_version=view.resource_version,
            generation=view.generation,
            provider=view.provider,
            task_type=view.task_type,
            created_at=created,
            deadline=created + dt.timedelta(seconds=view.deadline_seconds),
            ttl_seconds=view.ttl_seconds_after_finished,
            external=view.external,
            spec_provider_task_id=view.spec_provider_task_id,
            deleting=view.deleting,
            phase=view.phase,
            provider_task_id=view.provider_task_id,
            submitted_at=view.submitted_at,
            finished_at=view.finished_at,
            delivered_by=view.delivered_by,
            polls=view.polls,
            last_poll_at=model.parse_time(status.get("lastPollAt")),
            next_poll_at=model.parse_time(status.get("nextPollAt")),
            intent_at=model.parse_time(submission.get("intentAt")),
            ambiguous_at=model.parse_time(submission.get("ambiguousAt")),
            attempts=_int(submission, "attempts", 0),
            next_attempt_at=model.parse_time(submission.get("nextAttemptAt")),
            waiting_reason=waiting,
        )

    @classmethod
    def from_body(cls, body: Mapping[str, Any], *, now: dt.datetime) -> TaskRecord:
        """Parse and slim a task body."""
        return cls.from_view(TaskView.from_body(body), now=now)


@dataclass(frozen=True, slots=True)
class Polling:
    """A provider's fallback-polling policy (``spec.polling``)."""

    callback_timeout: float = DEFAULT_CALLBACK_TIMEOUT
    interval: float = DEFAULT_POLL_INTERVAL
    max_polls: int = DEFAULT_MAX_POLLS
    bulk: bool = True


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    """A typed view of a CaptchaProvider's spec and identity."""

    namespace: str
    name: str
    uid: str
    generation: int
    dialect: Dialect
    base_url: str
    secret_name: str
    secret_key: str
    public_url: str | None
    polling: Polling
    max_in_flight: int | None
    recheck_seconds: float
    conditions: tuple[Mapping[str, Any], ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        """The provider's identity (namespace, name)."""
        return (self.namespace, self.name)

    @property
    def poll_only(self) -> bool:
        """No public pingback URL: results arrive only by polling."""
        return self.public_url is None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ProviderSpec:
        """Parse a provider body; unknown dialects fall back to captchaai (the CRD default)."""
        meta: Mapping[str, Any] = body.get("metadata") or {}
        spec: Mapping[str, Any] = body.get("spec") or {}
        status: Mapping[str, Any] = body.get("status") or {}
        polling: Mapping[str, Any] = spec.get("polling") or {}
        secret: Mapping[str, Any] = spec.get("apiKeySecretRef") or {}
        pingback: Mapping[str, Any] = spec.get("pingback") or {}
        dialect_raw = _str(spec, "dialect") or Dialect.CAPTCHAAI.value
        dialect = model.parse_enum(Dialect, dialect_raw) or Dialect.CAPTCHAAI
        max_in_flight = spec.get("maxInFlight")
        return cls(
            namespace=str(meta.get("namespace", "")),
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            generation=_int(meta, "generation", 0),
            dialect=dialect,
            base_url=_str(spec, "baseURL") or DEFAULT_BASE_URL,
            secret_name=_str(secret, "name") or "",
            secret_key=_str(secret, "key") or DEFAULT_SECRET_KEY,
            public_url=_str(pingback, "publicURL"),
            polling=Polling(
                callback_timeout=float(
                    _int(polling, "callbackTimeoutSeconds", DEFAULT_CALLBACK_TIMEOUT)
                ),
                interval=float(_int(polling, "intervalSeconds", DEFAULT_POLL_INTERVAL)),
                max_polls=_int(polling, "maxPolls", DEFAULT_MAX_POLLS),
                bulk=bool(polling.get("bulk", True)),
            ),
            max_in_flight=(
                max_in_flight
                if isinstance(max_in_flight, int) and not isinstance(max_in_flight, bool)
                else None
            ),
            recheck_seconds=float(_int(spec, "recheckSeconds", DEFAULT_RECHECK_SECONDS)),
            conditions=tuple(status.get("conditions") or ()),
        )
