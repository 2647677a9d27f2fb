"""The CaptchaTask API as Python types: names, phases, and typed read-only views of objects.

Everything here is pure (no I/O, no kopf): the operator, the sidecar and the CLI parse the JSON
bodies they get from the API server into these views, so the field names of the CRDs in
``charts/captchatask/crds/`` are spelled in exactly one Python module.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, TypeVar

GROUP: Final = "captchatask.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"

TASK_KIND: Final = "CaptchaTask"
TASK_PLURAL: Final = "captchatasks"
PROVIDER_KIND: Final = "CaptchaProvider"
PROVIDER_PLURAL: Final = "captchaproviders"
DEAD_LETTER_KIND: Final = "CaptchaDeadLetter"
DEAD_LETTER_PLURAL: Final = "captchadeadletters"

#: Label the sidecar puts on the adopted tasks it creates (``tasks:track``), so an app can list
#: them by provider task id; the operator finds tasks through its in-memory index instead.
PROVIDER_TASK_ID_LABEL: Final = f"{GROUP}/provider-task-id"
#: Label on dead letters naming the task they were meant for (a name, so it fits a label).
TASK_NAME_LABEL: Final = f"{GROUP}/task"


class Phase(StrEnum):
    """Where a task is in its life; ``Solved`` and ``Failed`` are terminal."""

    PENDING = "Pending"
    QUEUED = "Queued"
    SUBMITTED = "Submitted"
    SOLVED = "Solved"
    FAILED = "Failed"

    @property
    def terminal(self) -> bool:
        """Whether the task has its one and only outcome."""
        return self in (Phase.SOLVED, Phase.FAILED)


class DeliveredBy(StrEnum):
    """Which path brought a result into the ledger."""

    PINGBACK = "pingback"
    POLL = "poll"
    DEAD_LETTER = "deadLetter"


class TaskType(StrEnum):
    """The CAPTCHA kinds the API offers (the CRD's ``spec.type`` enum)."""

    RECAPTCHA_V2 = "RecaptchaV2"
    RECAPTCHA_V3 = "RecaptchaV3"
    RECAPTCHA_ENTERPRISE = "RecaptchaEnterprise"
    TURNSTILE = "Turnstile"
    HCAPTCHA = "HCaptcha"
    GEETEST = "GeeTest"
    GEETEST_V4 = "GeeTestV4"
    IMAGE = "Image"


class DeadLetterReason(StrEnum):
    """Why an authentic result could not be applied (the CRD's ``spec.reason`` enum)."""

    TASK_NOT_FOUND = "TaskNotFound"
    TASK_RECREATED = "TaskRecreated"
    PROVIDER_TASK_MISMATCH = "ProviderTaskMismatch"
    LEDGER_REJECTED = "LedgerRejected"
    REDRIVEN = "Redriven"
    #: A solution for a task the operator failed on its own, received too late to replace it.
    TASK_FAILED = "TaskFailed"


class DeadLetterPhase(StrEnum):
    """A dead letter waits (``Pending``), was applied (``Requeued``) or awaits a human."""

    PENDING = "Pending"
    REQUEUED = "Requeued"
    EXPIRED = "Expired"


@dataclass(frozen=True, slots=True)
class TaskRef:
    """One task *instance*: the uid tells a recreated task from its predecessor."""

    namespace: str
    name: str
    uid: str


def parse_time(value: object) -> dt.datetime | None:
    """Parse an RFC 3339 timestamp as the API server writes it; ``None`` if absent or bad."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def format_time(value: dt.datetime) -> str:
    """Format a timestamp the way Kubernetes does (UTC, ``Z``, microseconds kept for ordering)."""
    utc = value.astimezone(dt.UTC)
    if utc.microsecond:
        return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return utc.strftime("%Y-%m-%dT%H:%M:%SZ")


E = TypeVar("E", bound=StrEnum)


def parse_enum(enum: type[E], raw: object) -> E | None:
    """Return the enum member whose value is ``raw``, or ``None`` (unknown values are tolerated)."""
    if isinstance(raw, str) and raw in enum._value2member_map_:
        return enum(raw)
    return None


def _str(mapping: Mapping[str, Any], key: str) -> str | None:
    value = mapping.get(key)
    return value if isinstance(value, str) and value else None


def _int(mapping: Mapping[str, Any], key: str, default: int) -> int:
    value = mapping.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


#: CRD defaults, repeated here only for objects read before defaulting (e.g. from a file).
DEFAULT_DEADLINE_SECONDS: Final = 600
DEFAULT_TTL_SECONDS_AFTER_FINISHED: Final = 3600


@dataclass(frozen=True, slots=True)
class TaskView:
    """A typed, read-only view of a CaptchaTask body as the API server returned it."""

    ref: TaskRef
    generation: int
    resource_version: str
    created_at: dt.datetime | None
    deleting: bool
    task_type: str
    provider: str
    deadline_seconds: int
    ttl_seconds_after_finished: int
    spec_provider_task_id: str | None
    external: bool
    phase: Phase | None
    provider_task_id: str | None
    submitted_at: dt.datetime | None
    finished_at: dt.datetime | None
    delivered_by: DeliveredBy | None
    polls: int
    solution_token: str | None
    spec: Mapping[str, Any]
    status: Mapping[str, Any]

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> TaskView:
        """Build the view; tolerate missing status (a task the operator has not seen yet)."""
        meta: Mapping[str, Any] = body.get("metadata") or {}
        spec: Mapping[str, Any] = body.get("spec") or {}
        status: Mapping[str, Any] = body.get("status") or {}
        provider_ref: Mapping[str, Any] = spec.get("providerRef") or {}
        solution: Mapping[str, Any] = status.get("solution") or {}
        return cls(
            ref=TaskRef(
                namespace=str(meta.get("namespace", "")),
                name=str(meta.get("name", "")),
                uid=str(meta.get("uid", "")),
            ),
            generation=_int(meta, "generation", 0),
            resource_version=str(meta.get("resourceVersion", "")),
            created_at=parse_time(meta.get("creationTimestamp")),
            deleting=bool(meta.get("deletionTimestamp")),
            task_type=str(spec.get("type", "")),
            provider=_str(provider_ref, "name") or "default",
            deadline_seconds=_int(spec, "deadlineSeconds", DEFAULT_DEADLINE_SECONDS),
            ttl_seconds_after_finished=_int(
                spec, "ttlSecondsAfterFinished", DEFAULT_TTL_SECONDS_AFTER_FINISHED
            ),
            spec_provider_task_id=_str(spec, "providerTaskId"),
            external=bool(spec.get("external", False)),
            phase=parse_enum(Phase, status.get("phase")),
            provider_task_id=_str(status, "providerTaskId"),
            submitted_at=parse_time(status.get("submittedAt")),
            finished_at=parse_time(status.get("finishedAt")),
            delivered_by=parse_enum(DeliveredBy, status.get("deliveredBy")),
            polls=_int(status, "polls", 0),
            solution_token=_str(solution, "token"),
            spec=spec,
            status=status,
        )

    @property
    def known_provider_task_id(self) -> str | None:
        """The provider's id for this task from status, or from spec for an adopted task."""
        return self.provider_task_id or self.spec_provider_task_id

    @property
    def deadline(self) -> dt.datetime | None:
        """When the task fails with ``DeadlineExceeded`` if it has no outcome by then."""
        if self.created_at is None:
            return None
        return self.created_at + dt.timedelta(seconds=self.deadline_seconds)
