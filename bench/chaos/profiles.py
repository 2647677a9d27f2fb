"""Chaos profiles: how many tasks, how fast, and how long each fault lasts.

Timings are short so a run takes minutes, not hours: solves are scaled down by the emulator,
the provider's callback timeout is a few seconds and polls come every ``intervalSeconds`` (the
CRD's minimum, 5 s). The API-server outage must stay longer than the sidecar's ledger budget
(0.5 s by default), so pingbacks arriving during it are spooled, not merely slow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Profile:
    """One chaos run's shape.

    Attributes
    ----------
    name
        ``ci`` (inside ``make test``) or ``full`` (``make chaos``).
    tasks
        CaptchaTasks created.
    create_seconds
        Tasks are created evenly over this window; faults land inside it.
    outage_seconds
        How long the kube-apiserver is stopped.
    res_502_bursts, res_502_burst_seconds
        Outages of ``res.php`` (every request answered with nginx's HTML 502) and how long
        each one lasts, in seconds from its planned start: a provider's outage is a time, not
        a number of requests, so a client that backs off does not meet it after it ended.
    in_reply_lost_bursts, in_reply_lost_burst_size
        Bursts of ``in.php`` replies lost after the task was created, and how many submits
        each one hits (the emulator's "task created, reply lost" fault).
    planted_dead_letters
        Authentic (signed) pingbacks sent for tasks that do not exist: they must end up as
        exactly this many dead letters, nothing more.
    settle_seconds
        Upper bound for the system to settle after the last task is created (a failure bound,
        not a measurement).
    spool_max_records
        The receiver's spool bound (``--spool-max-records``), below what the outage spools, so
        the receiver answers ``503`` and turns unready (fault ``spool-full``; 0: no bound set).
    late_tasks, late_deadline_seconds, late_outage_seconds
        The "API server away for longer than task deadlines" fault: this many tasks with this
        short a deadline are submitted, then kube-apiserver is stopped for this long, and their
        pingbacks are acknowledged (spooled) before their deadlines while it is away. The
        deadline leaves room for a busy machine: submission, solve and acknowledgement took
        16 s (15 of them a kube-apiserver stop an open watch held, before stops got a short
        grace). The outage outlasts the deadline by a few seconds: it starts after the tasks
        were created, and every second of it is waited out twice (the outage, then an
        unresolved intent's grace stretched by its length).
    """

    name: str
    tasks: int
    create_seconds: float
    outage_seconds: int
    res_502_bursts: int
    res_502_burst_seconds: int
    planted_dead_letters: int
    settle_seconds: float
    in_reply_lost_bursts: int = 2
    in_reply_lost_burst_size: int = 5
    sidecar_kills: int = 2
    operator_kills: int = 1
    #: Fractions of all pingbacks (the emulator applies duplicate/late to pingbacks it sends).
    drop_fraction: float = 0.30
    duplicate_fraction: float = 0.20
    late_fraction: float = 0.10
    unsolvable_rate: float = 0.05
    #: Emulator solve times are multiplied by this (reCAPTCHA v2: 20-60 s -> 2-6 s).
    solve_time_scale: float = 0.1
    callback_timeout_seconds: int = 4
    poll_interval_seconds: int = 5
    max_polls: int = 60
    #: Late pingbacks arrive this long after the solve: past the callback timeout, so the
    #: fallback poll gets there first and the pingback is recorded as late.
    late_delay_seconds: float = 9.0
    deadline_seconds: int = 600
    spool_max_records: int = 0
    late_tasks: int = 3
    late_deadline_seconds: int = 30
    late_outage_seconds: int = 40


PROFILES: Final[dict[str, Profile]] = {
    "smoke": Profile(
        name="smoke",
        tasks=60,
        create_seconds=20.0,
        outage_seconds=4,
        res_502_bursts=2,
        res_502_burst_seconds=3,
        planted_dead_letters=2,
        settle_seconds=150.0,
        spool_max_records=1,  # a short outage: the second spooled pingback meets the bound
        late_deadline_seconds=20,
        late_outage_seconds=25,
    ),
    "ci": Profile(
        name="ci",
        tasks=300,
        create_seconds=40.0,
        outage_seconds=8,
        res_502_bursts=3,
        res_502_burst_seconds=5,
        planted_dead_letters=3,
        settle_seconds=180.0,
        spool_max_records=8,  # the outage spools about 20 without a bound
    ),
    "full": Profile(
        name="full",
        tasks=1000,
        create_seconds=100.0,
        outage_seconds=15,
        res_502_bursts=5,
        res_502_burst_seconds=8,
        planted_dead_letters=5,
        settle_seconds=300.0,
        spool_max_records=12,  # the outage spools about 35 without a bound
    ),
}
