"""The drainer: replays spooled results into the ledger as soon as the API server answers.

Replays are idempotent because :meth:`captchatask.ledger.Ledger.record` is: a result that did
reach its task before (a spooled pingback whose cancelled PATCH still landed, a replay after a
crash) comes back ``duplicate``. A replay that dead-letters writes the dead letter; if that
write fails too, the record simply stays spooled.

While the API server is away the drainer sends one probe replay at a time, with exponential
backoff capped at :data:`MAX_BACKOFF_SECONDS`, so a recovered API server is noticed within about
a second; then it replays with full concurrency and closes the recorder's circuit. A record the
API server keeps refusing (RBAC, a vanished namespace) backs off on its own so it cannot block
the others.

Pace: replays form a closed loop of at most ``concurrency`` writes in flight, a new one starting
as soon as one ends (not in batches that wait for their slowest write), so the spool drains at
the API server's own pace and no faster. While replays are in flight the recorder's
:class:`~.limiter.LedgerGate` sends new pingbacks to the spool behind them: the API server is
already behind, and a new result should not overtake older acknowledged ones for its time. The
pingback writes still in flight when a backlog starts keep their share of ``concurrency`` until
they end, so the hand-over does not stretch them. A configured :class:`~.pace.WritePace` (the
gate's ``pace``) also bounds the replays started per second: the spool then drains at that rate.

Depth: a deeper drain puts results into the ledger faster at the API server's limit, and makes
its other clients wait (see :data:`~.settings.DEFAULT_DRAIN_CONCURRENCY`, whose default is
gentle); a burst of answers to many replays also holds up the pingbacks that share this event
loop. So the drainer keeps at most :data:`BUSY_CONCURRENCY` replays in flight while pingbacks
arrive, and deepens to ``concurrency`` (the flag, which bounds it always) once none has arrived for
:data:`QUIET_SECONDS`: the spool a burst left behind then drains with as many replays in
flight as the flag allows (by default as many as while pingbacks arrive). The first pingback
after that brings the depth back down before another replay starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

from captchatask import kube
from captchatask.ledger import Ledger
from captchatask_sidecar.metrics import Metrics
from captchatask_sidecar.recorder import Recorder
from captchatask_sidecar.spool import Entry, Spool

logger = logging.getLogger(__name__)

INITIAL_BACKOFF_SECONDS: Final = 0.05
#: Cap of the "API server away" backoff: bounds how late a recovery is noticed.
MAX_BACKOFF_SECONDS: Final = 1.0
#: Cap of one refused record's own backoff.
MAX_RECORD_BACKOFF_SECONDS: Final = 60.0
#: Sleep when there is nothing to do and nothing wakes us (safety net for missed wake-ups).
IDLE_SECONDS: Final = 1.0
#: Source recorded in dead letters written from the spool (the CRD's ``payload.source``).
SPOOL_SOURCE: Final = "spool"
_UNAVAILABLE: Final = "unavailable"
#: No pingback for this long: the drainer may deepen to its ``concurrency``. Longer than the
#: gaps between pingbacks of any load worth protecting (4/s and up), short against a drain.
QUIET_SECONDS: Final = 0.25
#: Replays in flight at most while pingbacks arrive. The bursts of answers to 32 replays held
#: up the pingbacks sharing the event loop: at twice the API server's limit (``python -m
#: bench.ingest --limit-only --sidecar-arg=--drain-concurrency=32``) pingback p99 6.2-8.9 ms
#: with this depth (8 while pingbacks arrive, 32 after), 9.8-13.9 ms with the same flag on the
#: drainer before it (32 throughout).
BUSY_CONCURRENCY: Final = 8


async def _all_done(running: set[asyncio.Task[str]]) -> set[asyncio.Task[str]]:
    """Wait for every replay in flight to end; take them out of ``running`` once they have.

    Not before: cancelled during the wait (shutdown), :meth:`Drainer.run` must still find
    them there to cancel them, or they outlive the spool it is closed with.
    """
    done = set(running)
    if done:
        await asyncio.wait(done)
    running.difference_update(done)
    return done


class Drainer:
    """Background replay of the spool.

    Parameters
    ----------
    recorder
        The hot-path recorder (its circuit is opened/closed here, its ``apply`` is reused).
    ledger
        A ledger with the drainer's (longer) per-request timeout.
    spool
        The spool to drain.
    metrics
        The sidecar's metrics.
    concurrency
        Replays in flight at once at most (when the API server is up and no pingback arrived
        for :data:`QUIET_SECONDS`).
    busy_concurrency
        Replays in flight at once at most while pingbacks arrive (never above
        ``concurrency``; equal to it, the depth never changes).
    """

    def __init__(
        self,
        *,
        recorder: Recorder,
        ledger: Ledger,
        spool: Spool,
        metrics: Metrics,
        concurrency: int,
        busy_concurrency: int = BUSY_CONCURRENCY,
    ) -> None:
        self.recorder = recorder
        self.ledger = ledger
        self.spool = spool
        self.metrics = metrics
        self.concurrency = concurrency
        self.busy_concurrency = min(busy_concurrency, concurrency)
        self.wake = asyncio.Event()

    async def run(self) -> None:
        """Drain forever (cancelled at shutdown; unresolved records stay on disk)."""
        running: set[asyncio.Task[str]] = set()
        try:
            await self._drain(running)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _drain(self, running: set[asyncio.Task[str]]) -> None:
        backoff = INITIAL_BACKOFF_SECONDS
        while True:
            self.wake.clear()
            now = time.monotonic()
            available = self.recorder.api_available
            gate = self.recorder.gate
            depth = self.depth()
            # Pingback writes still in flight keep their share of the API server: no new ones
            # start while there is a backlog, so the drainer has it all one round trip later.
            room = (
                max(depth - len(running) - gate.limit.in_flight, 0 if running else 1)
                if available
                else (0 if running else 1)
            )
            pace, paced = gate.pace, False
            if pace is not None and (tokens := pace.available) < room:
                room, paced = tokens, True
            due = await self.spool.due(now, room)
            for entry in due:
                entry.in_flight = True  # before the task runs: the next due() must skip it
                if pace is not None:
                    pace.take()
                running.add(asyncio.create_task(self._replay(entry)))
            # Nothing running and nothing held back by the pace: nothing was due, pingbacks may
            # write. Held back by the pace, the spooled results keep their place in the queue.
            gate.backlog = bool(running) or (paced and self.spool.depth > 0)
            if not running:
                if not available and not self.spool.depth:
                    await self._probe()
                wait = self._next_due(now)
                if paced and pace is not None:
                    # Due results wait for the pace's next write: both must be there.
                    wait = max(wait, pace.seconds_until_next())
                await self._sleep(wait)
                continue
            outcomes = await self._next_outcomes(running, room_left=available, depth=depth)
            if _UNAVAILABLE in outcomes:
                self.recorder.api_available = False
                # Let the others in flight end (they meet the same API server) before probing.
                outcomes += [task.result() for task in await _all_done(running)]
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                continue
            if not outcomes:
                continue  # woken by a new spool record: start it
            backoff = INITIAL_BACKOFF_SECONDS
            if not self.recorder.api_available:
                logger.info(
                    "API server answers again: draining %d spooled results", self.spool.depth
                )
                self.recorder.api_available = True

    def depth(self) -> int:
        """Replays to keep in flight now: deeper once no pingback arrived for a while.

        Asked once per turn of the loop, on the recorder's clock (which notes each pingback).
        """
        if self.busy_concurrency == self.concurrency:
            return self.concurrency
        quiet = self.recorder.clock() - self.recorder.last_pingback >= QUIET_SECONDS
        return self.concurrency if quiet else self.busy_concurrency

    async def _next_outcomes(
        self, running: set[asyncio.Task[str]], *, room_left: bool, depth: int
    ) -> list[str]:
        """Wait for at least one replay to end (or, with room for more, a new spool record)."""
        waiter: asyncio.Task[bool] | None = None
        watched: set[asyncio.Future[Any]] = set(running)
        if room_left and len(running) < depth:
            waiter = asyncio.create_task(self.wake.wait())
            watched.add(waiter)
        try:
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if waiter is not None:
                waiter.cancel()
        finished = [task for task in running if task.done()]
        running.difference_update(finished)
        return [task.result() for task in finished]

    def _next_due(self, now: float) -> float:
        """Seconds until the earliest backed-off record is due (bounded by the idle sleep)."""
        soonest = self.spool.next_due(now)
        if soonest is None:
            return IDLE_SECONDS
        return min(IDLE_SECONDS, max(0.0, soonest - now))

    async def _sleep(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self.wake.wait()
        except TimeoutError:
            pass

    async def _probe(self) -> None:
        """With nothing spooled but the circuit open, ask the API server directly."""
        try:
            await self.ledger.client.request("GET", "/readyz", timeout=self.ledger.timeout)
        except kube.KubeError:
            return
        self.recorder.api_available = True

    async def _replay(self, entry: Entry) -> str:
        record = entry.record
        entry.in_flight = True
        self.recorder.gate.replay_started()
        try:
            outcome = await self.recorder.apply(
                self.ledger,
                record.ref,
                record.result,
                source=SPOOL_SOURCE,
                received_at=record.received_at,
            )
        except kube.KubeUnavailable:
            self.metrics.replay(record.ref.namespace, "retry").inc()
            return _UNAVAILABLE
        except kube.ApiError as exc:
            self.metrics.replay(record.ref.namespace, "retry").inc()
            self.metrics.ledger_error(record.ref.namespace, "api_error").inc()
            entry.attempts += 1
            delay = min(MAX_RECORD_BACKOFF_SECONDS, 0.5 * 2**entry.attempts)
            entry.next_attempt = time.monotonic() + delay
            logger.warning(
                "spooled result for %s/%s refused (%s %s); retrying in %.1fs",
                record.ref.namespace,
                record.ref.name,
                exc.status,
                exc.reason,
                delay,
            )
            return "refused"
        finally:
            entry.in_flight = False
            self.recorder.gate.replay_finished()
        self.metrics.replay(record.ref.namespace, outcome).inc()
        self.spool.resolve(entry)
        return outcome
