"""Every metric the sidecar exports, built against an injectable registry.

Production passes ``prometheus_client.REGISTRY``; tests pass a fresh ``CollectorRegistry`` and
read values with ``get_sample_value``. Label values are fixed, small sets created up front so
every series exists (at 0) from the first scrape: an alert on ``rate(...)`` must not wait for
the first event. Served only on the admin listener, never on the pingback port.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Outcomes of a pingback as answered to its sender (``rejected``: 4xx, nothing written).
PINGBACK_OUTCOMES: Final = (
    "recorded",
    "duplicate",
    "late",
    "rejected",
    "spooled",
    "dead_lettered",
)
#: Outcomes of a spool replay by the drainer.
REPLAY_OUTCOMES: Final = ("recorded", "duplicate", "late", "dead_lettered", "retry")
#: Why a ledger (or dead-letter) write did not happen on the first try.
LEDGER_ERROR_REASONS: Final = ("timeout", "unavailable", "api_error", "dead_letter_failed")
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
        self.pingbacks = Counter(
            "captchatask_pingbacks",
            "Pingbacks answered, by outcome (rejected = 4xx, spooled = fsync'd locally).",
            ["outcome"],
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
            ["reason"],
            registry=registry,
        )
        self.spool_replays = Counter(
            "captchatask_spool_replays",
            "Spooled results replayed into the ledger, by outcome (retry: not yet applied).",
            ["outcome"],
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
        for outcome in PINGBACK_OUTCOMES:
            self.pingbacks.labels(outcome)
        for outcome in REPLAY_OUTCOMES:
            self.spool_replays.labels(outcome)
        for reason in LEDGER_ERROR_REASONS:
            self.ledger_write_errors.labels(reason)
        self.spool_writable.set(1)
        # Bound children: the hot path avoids the label lookup on every request.
        self.pingback_outcome: Final = {o: self.pingbacks.labels(o) for o in PINGBACK_OUTCOMES}
        self.replay_outcome: Final = {o: self.spool_replays.labels(o) for o in REPLAY_OUTCOMES}
        self.ledger_error: Final = {
            r: self.ledger_write_errors.labels(r) for r in LEDGER_ERROR_REASONS
        }

    def track_spool(self, *, depth: Callable[[], float], oldest_age: Callable[[], float]) -> None:
        """Compute the spool gauges at scrape time from the spool itself (always exact)."""
        self.spool_depth.set_function(depth)
        self.spool_oldest_age.set_function(oldest_age)
