"""Every metric the sidecar exports, built against an injectable registry.

Production passes ``prometheus_client.REGISTRY``; tests pass a fresh ``CollectorRegistry`` and
read values with ``get_sample_value``. Label values are fixed, small sets created up front so
every series exists (at 0) from the first scrape: an alert on ``rate(...)`` must not wait for
the first event. Served only on the admin listener, never on the pingback port.

Whose result: the series about results (pingbacks, spool replays, ledger write errors) carry
the task's namespace in ``namespace``, the operator's convention (see
``captchatask_operator.metrics``): one receiver serves several namespaces, and each team's
alert must name its own. The value is only ever a namespace this process serves (a pingback
for any other is rejected before it is counted), so cardinality is bounded by configuration. A
rejected pingback proves nothing about whose it is: it is counted with an empty ``namespace``,
which Prometheus drops, so under ``honor_labels`` it lands in the receiver's own namespace.
Series about the process itself (spool, ledger admission, local API, watch) have no such label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from captchatask.buildinfo import register_build_info

#: The task's namespace (see the module docstring).
NS: Final = "namespace"
#: The namespace label of a pingback that was rejected (nobody's until it is authenticated).
UNATTRIBUTED: Final = ""

#: Outcomes of a pingback as answered to its sender (``rejected``: 4xx, nothing written).
PINGBACK_OUTCOMES: Final = (
    "recorded",
    "duplicate",
    "late",
    "rejected",
    "spooled",
    "dead_lettered",
)
#: Why a pingback was answered ``503`` (nothing written; the provider may retry, the operator's
#: fallback poll recovers it): the spool reached its bound, the spool volume cannot be written,
#: or verify-by-poll could not reach the provider.
UNAVAILABLE_REASONS: Final = ("spool_full", "spool_unwritable", "verify_unavailable")
#: Where the spool found an acknowledged record damaged: replaying its segments at startup, or
#: reading one back for the drainer (the spool's ``RECOVERY`` and ``READBACK``).
DAMAGE_STAGES: Final = ("recovery", "readback")
#: Outcomes of a spool replay by the drainer.
REPLAY_OUTCOMES: Final = ("recorded", "duplicate", "late", "dead_lettered", "retry")
#: Why a ledger (or dead-letter) write did not happen on the first try.
LEDGER_ERROR_REASONS: Final = ("timeout", "unavailable", "api_error", "dead_letter_failed")
#: The background loops the sidecar supervises (:mod:`captchatask.supervise`).
BACKGROUND_LOOPS: Final = ("drainer", "spool-probe")
#: Which writer holds a ledger write in flight: the pingback path, or the drainer's replays.
LEDGER_WRITERS: Final = ("pingback", "replay")
#: Why a pingback went to the spool without trying the ledger (:mod:`.limiter`): the adaptive
#: limit was reached, or the drainer was replaying older results (the API server is behind).
DIVERT_REASONS: Final = ("limit", "backlog", "pace")
#: Pingback handling takes about a millisecond on the ledger path and far less on the spool
#: path; the buckets resolve both (and the 0.5 s ledger budget).
HANDLE_BUCKETS: Final = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class Metrics:
    """The sidecar's metrics.

    Parameters
    ----------
    registry
        Where the series are registered (a fresh one per test).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.build_info = register_build_info(registry)
        self.pingbacks = Counter(
            "captchatask_pingbacks",
            "Pingbacks answered, by the task's namespace and outcome (rejected = 4xx, spooled ="
            " fsync'd locally).",
            [NS, "outcome"],
            registry=registry,
        )
        self.spool_depth = Gauge(
            "captchatask_pingback_spool_depth",
            "Results in the local spool, acknowledged but not yet in the ledger.",
            registry=registry,
        )
        self.spool_oldest_age = Gauge(
            "captchatask_spool_oldest_age_seconds",
            "Age of the oldest result still in the spool (0 when empty).",
            registry=registry,
        )
        self.handle_duration = Histogram(
            "captchatask_pingback_handle_duration_seconds",
            "Time from a pingback's headers to its answer.",
            buckets=HANDLE_BUCKETS,
            registry=registry,
        )
        self.ledger_write_errors = Counter(
            "captchatask_ledger_write_errors",
            "Ledger or dead-letter writes that failed (the result was spooled or kept spooled).",
            [NS, "reason"],
            registry=registry,
        )
        self.spool_replays = Counter(
            "captchatask_spool_replays",
            "Spooled results replayed into the ledger, by outcome (retry: not yet applied).",
            [NS, "outcome"],
            registry=registry,
        )
        self.spool_write_errors = Counter(
            "captchatask_spool_write_errors",
            "Spool appends that failed (the pingback was answered 503).",
            registry=registry,
        )
        self.spool_writable = Gauge(
            "captchatask_spool_writable",
            "1 when the spool can be written (readiness follows it).",
            registry=registry,
        )
        self.spool_damaged_records = Counter(
            "captchatask_spool_damaged_records",
            "Acknowledged spool records found damaged on disk (failed checksum or decoding; a"
            " torn tail is not counted), by stage (recovery: at startup; readback: for the"
            " drainer). Each is lost to the spool; its bytes are copied to the quarantine.",
            ["stage"],
            registry=registry,
        )
        self.spool_damaged_bytes = Counter(
            "captchatask_spool_damaged_bytes",
            "Bytes of the damaged spool records counted in captchatask_spool_damaged_records.",
            ["stage"],
            registry=registry,
        )
        for stage in DAMAGE_STAGES:
            self.spool_damaged_records.labels(stage)
            self.spool_damaged_bytes.labels(stage)
        self.spool_quarantine_full = Counter(
            "captchatask_spool_quarantine_full",
            "Damaged spool records not copied to the quarantine: it had no room left (or the"
            " copy failed). Counted in captchatask_spool_damaged_records all the same.",
            registry=registry,
        )
        self.pingbacks_unavailable = Counter(
            "captchatask_pingback_unavailable",
            "Pingbacks answered 503, by reason (nothing was written; see UNAVAILABLE_REASONS).",
            ["reason"],
            registry=registry,
        )
        for reason in UNAVAILABLE_REASONS:
            self.pingbacks_unavailable.labels(reason)
        self.spool_bytes = Gauge(
            "captchatask_spool_bytes",
            "Bytes the spool takes on its volume (segments, journal and quarantine, plus admitted"
            " writes).",
            registry=registry,
        )
        self.spool_max_bytes = Gauge(
            "captchatask_spool_max_bytes",
            "The spool's byte bound: past it pingbacks are answered 503 (0: unbounded).",
            registry=registry,
        )
        self.spool_max_records = Gauge(
            "captchatask_spool_max_records",
            "The spool's record bound: past it pingbacks are answered 503 (0: unbounded).",
            registry=registry,
        )
        self.local_requests = Counter(
            "captchatask_local_api_requests",
            "Local task API requests, by route and status class.",
            ["route", "code"],
            registry=registry,
        )
        self.watch_restarts = Counter(
            "captchatask_task_watch_restarts",
            "Restarts of the shared task watch behind the local API's long-polls.",
            registry=registry,
        )
        self.loop_crashes = Counter(
            "captchatask_background_loop_crashes",
            "Crashes of a supervised background loop (each followed by a restart with back-off).",
            ["loop"],
            registry=registry,
        )
        self.loop_healthy = Gauge(
            "captchatask_background_loop_healthy",
            "0 while a supervised background loop keeps crashing (readiness follows it), else 1.",
            ["loop"],
            registry=registry,
        )
        for loop in BACKGROUND_LOOPS:
            self.loop_crashes.labels(loop)
            self.loop_healthy.labels(loop).set(1)
        self.ledger_limit = Gauge(
            "captchatask_ledger_limit",
            "The adaptive limit on pingback ledger writes in flight (beyond it: the spool).",
            registry=registry,
        )
        self.ledger_in_flight = Gauge(
            "captchatask_ledger_in_flight",
            "Ledger writes in flight, by writer (pingback path, or the drainer's replays).",
            ["writer"],
            registry=registry,
        )
        self.ledger_diverted = Counter(
            "captchatask_ledger_diverted",
            "Pingbacks sent straight to the spool without trying the ledger, by reason (limit:"
            " the adaptive limit was reached; backlog: the drainer was replaying; pace: the"
            " configured ledger writes per second were used up).",
            ["reason"],
            registry=registry,
        )
        self.diverted = {reason: self.ledger_diverted.labels(reason) for reason in DIVERT_REASONS}
        self.spool_writable.set(1)
        # Bound children: the hot path avoids the label lookup on every request.
        self._pingback: dict[tuple[str, str], Counter] = {
            (UNATTRIBUTED, "rejected"): self.pingbacks.labels(UNATTRIBUTED, "rejected")
        }
        self._replay: dict[tuple[str, str], Counter] = {}
        self._ledger_error: dict[tuple[str, str], Counter] = {}

    def serve(self, namespaces: Iterable[str]) -> None:
        """Pre-create the result series of the namespaces this process serves, at 0."""
        for namespace in namespaces:
            for outcome in PINGBACK_OUTCOMES:
                self.pingback(namespace, outcome)
            for outcome in REPLAY_OUTCOMES:
                self.replay(namespace, outcome)
            for reason in LEDGER_ERROR_REASONS:
                self.ledger_error(namespace, reason)

    def pingback(self, namespace: str, outcome: str) -> Counter:
        """``captchatask_pingbacks_total`` of one namespace and outcome."""
        key = (namespace, outcome)
        child = self._pingback.get(key)
        if child is None:
            child = self._pingback[key] = self.pingbacks.labels(namespace, outcome)
        return child

    def replay(self, namespace: str, outcome: str) -> Counter:
        """``captchatask_spool_replays_total`` of one namespace and outcome."""
        key = (namespace, outcome)
        child = self._replay.get(key)
        if child is None:
            child = self._replay[key] = self.spool_replays.labels(namespace, outcome)
        return child

    def ledger_error(self, namespace: str, reason: str) -> Counter:
        """``captchatask_ledger_write_errors_total`` of one namespace and reason."""
        key = (namespace, reason)
        child = self._ledger_error.get(key)
        if child is None:
            child = self._ledger_error[key] = self.ledger_write_errors.labels(namespace, reason)
        return child

    def track_loop(self, loop: str, *, healthy: Callable[[], bool]) -> Callable[[object], None]:
        """Export one supervised loop's health (read at scrape time); return its crash counter.

        The returned callable is the supervisor's ``on_crash``.
        """
        self.loop_healthy.labels(loop).set_function(lambda: 1.0 if healthy() else 0.0)
        crashes = self.loop_crashes.labels(loop)
        return lambda _exc: crashes.inc()

    def track_ledger(
        self,
        *,
        limit: Callable[[], float],
        pingback_in_flight: Callable[[], float],
        replay_in_flight: Callable[[], float],
    ) -> None:
        """Compute the ledger-admission gauges at scrape time from the limiter itself."""
        self.ledger_limit.set_function(limit)
        self.ledger_in_flight.labels("pingback").set_function(pingback_in_flight)
        self.ledger_in_flight.labels("replay").set_function(replay_in_flight)

    def unavailable(self, reason: str) -> Counter:
        """``captchatask_pingback_unavailable_total`` of one reason."""
        return self.pingbacks_unavailable.labels(reason)

    def spool_damaged(self, stage: str, size: int, kept: bool) -> None:
        """Count one damaged spool record (the spool's ``on_damage`` hook; thread-safe)."""
        self.spool_damaged_records.labels(stage).inc()
        self.spool_damaged_bytes.labels(stage).inc(size)
        if not kept:
            self.spool_quarantine_full.inc()

    def track_spool_bound(
        self, *, held_bytes: Callable[[], float], max_bytes: int | None, max_records: int | None
    ) -> None:
        """Expose the spool's size on disk (computed at scrape time) and its bound."""
        self.spool_bytes.set_function(held_bytes)
        self.spool_max_bytes.set(max_bytes or 0)
        self.spool_max_records.set(max_records or 0)

    def track_spool(self, *, depth: Callable[[], float], oldest_age: Callable[[], float]) -> None:
        """Compute the spool gauges at scrape time from the spool itself (always exact)."""
        self.spool_depth.set_function(depth)
        self.spool_oldest_age.set_function(oldest_age)
