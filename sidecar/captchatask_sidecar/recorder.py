"""Durable acknowledgement: put a pingback's result in the ledger, a dead letter, or the spool.

This is the promise of the sidecar in one class. :meth:`Recorder.accept` returns, and what
:meth:`Recorder.admit` returns completes (and the handler answers ``200``), only once the
result is

* applied to its task through :meth:`captchatask.ledger.Ledger.record` (outcomes ``recorded``,
  ``duplicate``, ``late``), or
* written as a ``CaptchaDeadLetter`` when it belongs to no task instance, or is a solution for
  a task the operator had already failed when it was received (``dead_lettered``), or
* appended to the local spool and fsync'd (``spooled``) when the API server did not answer
  within the ledger budget, refused the write for a reason worth retrying, or the dead letter
  could not be written, or **without trying the ledger** when :class:`~.limiter.LedgerGate`
  says so: the adaptive limit on ledger writes in flight is reached, or the drainer is still
  replaying older results. Above the API server's capacity a pingback therefore costs a spool
  append, not a place in the API server's queue; the drainer applies it at the API server's pace.

If even the spool fails, :class:`~.spool.SpoolWriteError` propagates and the handler answers
``503``: the sender may not retry, but the sidecar never claims a result it does not hold.

A circuit breaker keeps the spool path fast while the API server is away: after one timeout
the hot path skips the ledger and spools at once (no 0.5 s wait per pingback) until the
drainer (:mod:`.drainer`) gets an answer from the API server again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

from captchatask import kube
from captchatask.decision import Outcome, Result
from captchatask.ledger import Ledger
from captchatask.model import DeadLetterReason, TaskRef, TaskView
from captchatask_sidecar.limiter import Decision, GradientLimit, LedgerGate, LimitSettings
from captchatask_sidecar.metrics import Metrics
from captchatask_sidecar.spool import Spool
from captchatask_sidecar.spoolformat import encode_record

logger = logging.getLogger(__name__)

SPOOLED: Final = "spooled"

Publish = Callable[[TaskView], None]


class Recorder:
    """Applies results to the ledger within a budget, else spools them.

    Parameters
    ----------
    ledger
        The hot-path ledger (its per-request timeout is the budget).
    spool
        The open spool.
    metrics
        The sidecar's metrics.
    budget
        Seconds a pingback may wait for the API server in total before it is spooled.
    received_by
        This receiver's name, written into dead letters.
    publish
        Called with a task after a result reached it (wakes local-API long-polls at once).
    gate
        Decides write-now or spool per pingback (default: the default adaptive limit).
    clock
        Monotonic seconds, for the write times the gate learns from.
    """

    def __init__(
        self,
        *,
        ledger: Ledger,
        spool: Spool,
        metrics: Metrics,
        budget: float,
        received_by: str,
        publish: Publish | None = None,
        gate: LedgerGate | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ledger = ledger
        self.spool = spool
        self.metrics = metrics
        self.budget = budget
        self.received_by = received_by
        self.publish = publish
        self.clock = clock
        self.gate = gate or LedgerGate(GradientLimit(LimitSettings(), clock=clock))
        #: The circuit: ``False`` while the API server is known to be away (set by timeouts
        #: here, cleared by the drainer when the API server answers again).
        self.api_available = True
        #: When the last pingback arrived (``clock`` seconds): the drainer keeps fewer replays
        #: in flight while they do, so their answers do not hold the pingbacks up.
        self.last_pingback = -math.inf

    async def accept(self, ref: TaskRef, result: Result, *, source: str) -> str:
        """Make one result durable and say how (the pingback outcome label).

        Raises
        ------
        SpoolWriteError
            Neither the ledger nor the spool could take it; do not acknowledge.
        """
        admitted = self.admit(ref, result, source=source)
        if isinstance(admitted, asyncio.Future):
            await admitted
            return SPOOLED
        return await admitted

    def admit(
        self, ref: TaskRef, result: Result, *, source: str
    ) -> asyncio.Future[int] | Coroutine[Any, Any, str]:
        """:meth:`accept` without its coroutine frame on the spool path; await what it returns.

        Either the spool append's future (the result is ``spooled`` once it resolves: the
        ledger is not tried, the circuit is open or the gate diverted it), or the coroutine that
        tries the ledger first and returns the outcome. The split exists for the pingback
        handler: with the API server away every pingback is CPU work on the event loop, and each
        coroutine between the handler and the spool's future is one more frame to create and to
        resume when the batch is on disk.

        Raises
        ------
        SpoolFullError
            At once: the spool's bound is reached; nothing was written.
        """
        received_at = time.time()
        self.last_pingback = self.clock()
        if self.api_available:
            decision = self.gate.decide()
            if decision is Decision.WRITE:
                return self._write_or_spool(ref, result, source=source, received_at=received_at)
            self.metrics.diverted[decision.value].inc()
        return self._spool(ref, result, source=source, received_at=received_at)

    async def _write_or_spool(
        self, ref: TaskRef, result: Result, *, source: str, received_at: float
    ) -> str:
        """The ledger within the budget (a slot the gate gave), else the spool."""
        written = await self._write(ref, result, source=source, received_at=received_at)
        if written is not None:
            return written
        await self._spool(ref, result, source=source, received_at=received_at)
        return SPOOLED

    def _spool(
        self, ref: TaskRef, result: Result, *, source: str, received_at: float
    ) -> asyncio.Future[int]:
        future = self.spool.append_payload(
            encode_record(
                ref, result, received_at=received_at, received_by=self.received_by, source=source
            ),
            received_at,
        )
        self.gate.backlog = True  # the next pingbacks queue behind it, in the spool
        return future

    async def _write(
        self, ref: TaskRef, result: Result, *, source: str, received_at: float
    ) -> str | None:
        """Apply within the budget on a slot the gate gave; ``None``: spool it instead.

        The slot goes back to the limit exactly once, with what the write taught about the API
        server: its duration, or a drop (timeout, unavailable), or nothing (a refusal is about
        this write, not about load).
        """
        limit = self.gate.limit
        started = self.clock()
        try:
            async with asyncio.timeout(self.budget):
                outcome = await self.apply(
                    self.ledger, ref, result, source=source, received_at=received_at
                )
        except TimeoutError:
            limit.drop()
            self.metrics.ledger_error(ref.namespace, "timeout").inc()
            self._open_circuit("the ledger budget was exceeded")
        except kube.KubeUnavailable as exc:
            limit.drop()
            self.metrics.ledger_error(ref.namespace, "unavailable").inc()
            self._open_circuit(str(exc))
        except kube.ApiError as exc:
            limit.release(None)
            self.metrics.ledger_error(ref.namespace, "api_error").inc()
            logger.warning(
                "ledger write for %s/%s refused (%s %s); spooling it",
                ref.namespace,
                ref.name,
                exc.status,
                exc.reason,
            )
        except BaseException:
            limit.release(None)  # cancelled (shutdown) or a bug: give the slot back, learn nothing
            raise
        else:
            limit.release(self.clock() - started)
            return outcome
        return None

    def _open_circuit(self, why: str) -> None:
        if self.api_available:
            logger.warning("API server unavailable (%s): spooling pingbacks until it answers", why)
        self.api_available = False

    async def apply(
        self,
        ledger: Ledger,
        ref: TaskRef,
        result: Result,
        *,
        source: str,
        received_at: float,
    ) -> str:
        """Record one result, writing the dead letter when it belongs to no task instance.

        Shared by the hot path and the drainer (which passes its more patient ledger).

        Raises
        ------
        kube.KubeError
            Nothing durable was written (or the dead letter failed); the caller keeps the
            result (spools it, or leaves it spooled).
        """
        # The receipt time (not the replay time) decides whether a spooled solution still
        # replaces a failure the operator wrote while the API server was away from us.
        recorded = await ledger.record(ref, result, received_at=_as_datetime(received_at))
        if recorded.outcome is Outcome.DEAD_LETTER:
            try:
                await ledger.dead_letter(
                    namespace=ref.namespace,
                    reason=recorded.reason or DeadLetterReason.LEDGER_REJECTED,
                    message=recorded.message,
                    ref=ref,
                    result=result,
                    received_at=_as_datetime(received_at),
                    received_by=self.received_by,
                    source=source,
                )
            except kube.KubeError:
                self.metrics.ledger_error(ref.namespace, "dead_letter_failed").inc()
                raise
            logger.info(
                "result for %s/%s dead-lettered: %s",
                ref.namespace,
                ref.name,
                recorded.reason,
            )
        else:
            if recorded.outcome is Outcome.RECORDED and recorded.message:
                logger.warning("result for %s/%s %s", ref.namespace, ref.name, recorded.message)
            if recorded.task is not None and self.publish is not None:
                self.publish(recorded.task)
        return recorded.outcome.value


def _as_datetime(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC)
