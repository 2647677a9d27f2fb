"""The two benchmark profiles: ``full`` (what the docs publish) and ``small`` (``make test``).

Both run every measurement; ``small`` only shrinks durations and counts so the whole
harness is exercised in a couple of minutes. Time-scaled runs (API calls per task, recovery
delay) multiply the seed's 120 s callback timeout and 30 s sweep, our ``callbackTimeoutSeconds``
and ``intervalSeconds``, and the emulator's solve times by the same ``time_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Profile:
    """How long and how big each measurement is.

    Attributes
    ----------
    name
        ``full`` or ``small``.
    wrk_seconds
        Duration of each closed-loop wrk run.
    paced_seconds
        Duration of each fixed-rate latency run.
    spool_rate, ledger_rate
        Fixed rates (requests/s) of the latency runs (the targets: 1,000 spool, 500 ledger).
    ledger_tasks
        ``Submitted`` tasks prepared for the closed-loop ledger run (one result each).
    ledger_wrk_seconds
        Duration of the closed-loop ledger run (bounded so the prepared tasks last).
    latency_samples
        Pingback -> app samples.
    calls_tasks
        Tasks per pingback-loss level (each system).
    submit_rate
        Tasks per second submitted in the API-calls runs (the target: 20).
    ceiling_tasks
        Tasks the raw API-server ceiling probe patches (one status JSON patch each).
    overload_seconds
        Duration of the overload run (twice the raw ceiling offered, open loop).
    limit_rounds
        Rounds of the "API server at its limit" rows (both raw probes and the overload, each
        round on tasks of its own): the verdicts take the median, because the API server's
        speed on a shared machine drifts between runs minutes apart.
    time_scale
        Factor applied to every protocol time in the API-calls and recovery runs.
    scale_tasks
        Tasks in the scale run.
    scale_callback_timeout
        ``callbackTimeoutSeconds`` in the scale run.
    scale_solve_seconds
        Emulated solve time range in the scale run (long: the tasks stay in flight).
    """

    name: str
    wrk_seconds: float
    paced_seconds: float
    ledger_tasks: int
    ledger_wrk_seconds: float
    latency_samples: int
    calls_tasks: int
    time_scale: float
    scale_tasks: int
    scale_callback_timeout: int
    scale_solve_seconds: tuple[float, float]
    spool_rate: float = 1000.0
    ledger_rate: float = 500.0
    submit_rate: float = 20.0
    ceiling_tasks: int = 2000
    overload_seconds: float = 5.0
    limit_rounds: int = 3

    @property
    def paced_ledger_tasks(self) -> int:
        """Tasks the fixed-rate ledger run consumes (one result each)."""
        return round(self.ledger_rate * self.paced_seconds) + 16


FULL: Final = Profile(
    name="full",
    wrk_seconds=8.0,
    paced_seconds=5.0,
    ledger_tasks=3000,
    ledger_wrk_seconds=4.0,
    latency_samples=200,
    calls_tasks=200,
    time_scale=1 / 6,
    scale_tasks=10_000,
    scale_callback_timeout=60,
    scale_solve_seconds=(40.0, 55.0),
)

SMALL: Final = Profile(
    name="small",
    wrk_seconds=2.0,
    paced_seconds=2.0,
    ledger_tasks=400,
    ledger_wrk_seconds=1.0,
    latency_samples=20,
    calls_tasks=20,
    time_scale=1 / 24,
    scale_tasks=300,
    scale_callback_timeout=15,
    scale_solve_seconds=(8.0, 12.0),
    ceiling_tasks=300,
    overload_seconds=1.5,
    limit_rounds=2,
)

PROFILES: Final = {profile.name: profile for profile in (FULL, SMALL)}
