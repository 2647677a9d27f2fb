"""Spool records for the sidecar's tests: one place that knows how a spooled result looks.

Why: six test modules built the same ``SpoolRecord`` by hand, so a field the record gains had to
be added six times. Modules that vary a record (a token that is not ASCII, a token of a given
size) say only what they vary.
"""

from __future__ import annotations

import time

from captchatask.decision import Result
from captchatask.model import DeliveredBy, TaskRef
from captchatask_sidecar.spoolformat import SpoolRecord

#: ``received_at`` of the numbered records: a fixed time, so their bytes are reproducible.
EPOCH = 1_700_000_000.0


def numbered_ref(index: int, namespace: str = "ns") -> TaskRef:
    """Task ``task-{index}`` with a uid made from the index."""
    return TaskRef(namespace, f"task-{index}", f"00000000-0000-4000-8000-{index:012d}")


def numbered(index: int, *, namespace: str = "ns", token: str | None = None) -> SpoolRecord:
    """Solved result number ``index`` (provider id ``index``), received by ``pod-a``."""
    return SpoolRecord(
        ref=numbered_ref(index, namespace),
        result=Result.solved(
            token=f"token-{index}" if token is None else token,
            delivered_by=DeliveredBy.PINGBACK,
            provider_task_id=str(index),
        ),
        received_at=EPOCH + index,
        received_by="pod-a",
        source="get",
    )


def solved(ref: TaskRef, provider_task_id: str | None) -> SpoolRecord:
    """A pingback's solved result for a real ``Submitted`` task, received now."""
    if provider_task_id is None:
        raise ValueError(f"{ref.name} has no provider id: it was never submitted")
    return SpoolRecord(
        ref=ref,
        result=Result.solved(
            token=f"tok-{ref.name}",
            delivered_by=DeliveredBy.PINGBACK,
            provider_task_id=provider_task_id,
        ),
        received_at=time.time(),
        received_by="test",
        source="get",
    )
