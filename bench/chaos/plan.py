"""The seeded plan of a chaos run: which tasks, which faults, and exactly when.

Everything random in a run is drawn here (and in the emulator, from the same seed), so a
failing run is replayed with ``--seed``: the same tasks in the same order, the same fault
timeline, the same emulator ids, tokens and pingback fates. Only the operating system's
scheduling differs between two runs.
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from bench.chaos.profiles import Profile

#: Realistic site keys: the emulator validates them like the real service does.
RECAPTCHA_KEY: Final = "6Le-wvkSAAAAAPBMRTvw0Q4Muexq9bi0DJwx_mJ-"
TURNSTILE_KEY: Final = "0x4AAAAAAABkMYinukE8nzYS"
HCAPTCHA_KEY: Final = "a5f74b19-9e45-40e0-b45d-47ff91b7a6c2"
GEETEST_V4_ID: Final = "e392e1d7fd421dc63325744d5a2b9c73"
GEETEST_GT: Final = "022397c99c9f646f6477822485f30404"
PAGE_URL: Final = "https://shop.example.com/login"
#: Image CAPTCHAs: the emulator only checks the size (100 bytes to 600 kB).
IMAGE_BYTES: Final = 400
#: Faults are placed in this part of the creation window, so tasks are in flight around them.
WINDOW: Final = (0.15, 0.85)
#: A kill outside the outage keeps this far from its edges (seconds).
OUTAGE_MARGIN: Final = 3.0
#: The late-outage fault starts this long after the creation window (seconds).
LATE_FAULT_AFTER_CREATION: Final = 20.0

#: (type, weight): a mix close to real traffic, every type the CRD knows.
TASK_MIX: Final = (
    ("RecaptchaV2", 30),
    ("Turnstile", 20),
    ("RecaptchaV3", 12),
    ("HCaptcha", 10),
    ("Image", 10),
    ("RecaptchaEnterprise", 6),
    ("GeeTestV4", 6),
    ("GeeTest", 6),
)


class FaultKind(StrEnum):
    """Faults the run injects at planned times (pingback faults are emulator rates)."""

    #: Stop kube-apiserver (SIGTERM; it takes seconds to shut down), start it ``amount``
    #: seconds after the stop began (or as soon as it is gone, if that takes longer).
    APISERVER_OUTAGE = "apiserver-outage"
    SIDECAR_KILL = "sidecar-kill"
    OPERATOR_KILL = "operator-kill"
    #: Every ``res.php`` answered with an HTML 502 for ``amount`` seconds (a timed outage); if
    #: no request came meanwhile, the next one still meets it, so that every outage is met.
    RES_502_BURST = "res-502-burst"
    PLANT_DEAD_LETTER = "plant-dead-letter"
    #: The next ``amount`` ``in.php`` that create a task lose their reply (an HTML 502 on odd
    #: ordinals, a dropped connection on even ones): the task exists, the operator never
    #: learns its id, and its pingback (or, failing that, one resubmission) must settle it.
    IN_REPLY_LOST = "in-reply-lost"
    #: The receiver runs with a spool bound of ``amount`` records, below what the outage spools:
    #: from this point (inside the outage) the run expects it to answer 503 and turn unready.
    SPOOL_FULL = "spool-full"
    #: Submit the plan's ``late_tasks`` (short deadlines), stop kube-apiserver for ``amount``
    #: seconds, longer than their deadlines, and deliver their pingbacks while it is away: the
    #: receiver acknowledges (spools) them in time. The sidecar is down (SIGKILL) when the API
    #: server returns, so the operator fails the tasks first; the spooled results must still
    #: become the tasks' outcomes once the sidecar is back.
    APISERVER_AWAY_PAST_DEADLINES = "apiserver-away-past-deadlines"


@dataclass(frozen=True, slots=True)
class FaultEvent:
    """One fault at ``at`` seconds after the first task was created."""

    at: float
    kind: FaultKind
    #: Seconds for ``res-502-burst`` and the outages; a count or ordinal for the others.
    amount: int = 0

    def describe(self) -> str:
        """One line of the printed timeline."""
        extra = {
            FaultKind.RES_502_BURST: f" for {self.amount}s",
            FaultKind.IN_REPLY_LOST: f" x{self.amount}",
            FaultKind.APISERVER_OUTAGE: f" for {self.amount}s",
            FaultKind.SPOOL_FULL: f" (bound {self.amount} records)",
            FaultKind.APISERVER_AWAY_PAST_DEADLINES: f" for {self.amount}s",
        }.get(self.kind, f" #{self.amount}")
        return f"t+{self.at:7.2f}s  {self.kind}{extra}"


@dataclass(frozen=True, slots=True)
class TaskPlan:
    """One CaptchaTask to create at ``at`` seconds."""

    name: str
    type: str
    at: float
    spec: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Plan:
    """The whole seeded plan."""

    seed: int
    tasks: tuple[TaskPlan, ...]
    faults: tuple[FaultEvent, ...]
    #: Tasks the ``apiserver-away-past-deadlines`` fault creates itself, just before it.
    late_tasks: tuple[TaskPlan, ...] = ()

    def timeline(self) -> list[str]:
        """The fault timeline, one line per fault, in time order."""
        return [event.describe() for event in self.faults]


def task_spec(task_type: str, rng: random.Random, *, deadline_seconds: int) -> dict[str, Any]:
    """A valid CaptchaTask spec of ``task_type`` (deterministic for a given generator)."""
    spec: dict[str, Any] = {"type": task_type, "deadlineSeconds": deadline_seconds}
    if task_type == "Image":
        raw = bytes(rng.getrandbits(8) for _ in range(IMAGE_BYTES))
        spec["image"] = {"body": base64.b64encode(b"\x89PNG\r\n\x1a\n" + raw).decode()}
        return spec
    spec["pageURL"] = f"{PAGE_URL}?session={rng.randrange(10**6)}"
    if task_type in {"RecaptchaV2", "RecaptchaEnterprise"}:
        spec["siteKey"] = RECAPTCHA_KEY
    elif task_type == "RecaptchaV3":
        spec["siteKey"] = RECAPTCHA_KEY
        spec["recaptcha"] = {"action": "login", "minScore": 0.3}
    elif task_type == "Turnstile":
        spec["siteKey"] = TURNSTILE_KEY
    elif task_type == "HCaptcha":
        spec["siteKey"] = HCAPTCHA_KEY
    elif task_type == "GeeTestV4":
        spec["siteKey"] = GEETEST_V4_ID
    elif task_type == "GeeTest":
        spec["siteKey"] = GEETEST_GT
        spec["geetest"] = {"challenge": f"{rng.getrandbits(128):032x}"}
    return spec


def _apart(rng: random.Random, low: float, high: float, busy: tuple[float, float]) -> float:
    """A time in [low, high] at least OUTAGE_MARGIN away from the ``busy`` interval."""
    start, end = busy[0] - OUTAGE_MARGIN, busy[1] + OUTAGE_MARGIN
    for _ in range(1000):
        at = rng.uniform(low, high)
        if not start <= at <= end:
            return at
    return high


def make_plan(profile: Profile, seed: int) -> Plan:
    """Draw the tasks and the fault timeline of one run from ``seed``."""
    rng = random.Random(f"{seed}:chaos-plan")
    types = [kind for kind, _ in TASK_MIX]
    weights = [weight for _, weight in TASK_MIX]
    step = profile.create_seconds / max(profile.tasks, 1)
    tasks = tuple(
        TaskPlan(
            name=f"chaos-{index:05d}",
            type=task_type,
            at=index * step,
            spec=task_spec(task_type, rng, deadline_seconds=profile.deadline_seconds),
        )
        for index, task_type in enumerate(rng.choices(types, weights, k=profile.tasks))
    )
    low, high = (profile.create_seconds * edge for edge in WINDOW)
    outage_start = rng.uniform(low, max(low, high - profile.outage_seconds))
    outage = (outage_start, outage_start + profile.outage_seconds)
    faults = [
        FaultEvent(outage[0], FaultKind.APISERVER_OUTAGE, round(profile.outage_seconds)),
    ]
    for number in range(profile.sidecar_kills):
        # The first sidecar kill lands inside the outage: the spool it wrote must survive it.
        at = (
            rng.uniform(outage[0] + 1.0, max(outage[0] + 1.0, outage[1] - 1.0))
            if number == 0
            else _apart(rng, low, high, outage)
        )
        faults.append(FaultEvent(at, FaultKind.SIDECAR_KILL, number + 1))
    faults.extend(
        FaultEvent(_apart(rng, low, high, outage), FaultKind.OPERATOR_KILL, number + 1)
        for number in range(profile.operator_kills)
    )
    faults.extend(
        FaultEvent(rng.uniform(low, high), FaultKind.RES_502_BURST, profile.res_502_burst_seconds)
        for _ in range(profile.res_502_bursts)
    )
    faults.extend(
        FaultEvent(
            rng.uniform(low, high), FaultKind.IN_REPLY_LOST, profile.in_reply_lost_burst_size
        )
        for _ in range(profile.in_reply_lost_bursts)
    )
    if profile.spool_max_records:
        faults.append(FaultEvent(outage[0] + 0.5, FaultKind.SPOOL_FULL, profile.spool_max_records))
    for number in range(profile.planted_dead_letters):
        # One planted letter arrives during the outage, so it travels through the spool.
        at = rng.uniform(*outage) if number == 0 else rng.uniform(low, high)
        faults.append(FaultEvent(at, FaultKind.PLANT_DEAD_LETTER, number + 1))
    late_tasks: tuple[TaskPlan, ...] = ()
    if profile.late_tasks:
        # After every kill, the first outage and the creation window, when few pingbacks are
        # still on their way: its own must find room in a bounded spool (fault spool-full).
        at = profile.create_seconds + LATE_FAULT_AFTER_CREATION
        late_rng = random.Random(f"{seed}:chaos-late")  # the draws above stay as they were
        late_tasks = tuple(
            TaskPlan(
                name=f"chaos-late-{index:02d}",
                type="RecaptchaV2",
                at=at,
                spec=task_spec(
                    "RecaptchaV2", late_rng, deadline_seconds=profile.late_deadline_seconds
                ),
            )
            for index in range(profile.late_tasks)
        )
        faults.append(
            FaultEvent(at, FaultKind.APISERVER_AWAY_PAST_DEADLINES, profile.late_outage_seconds)
        )
    faults.sort(key=lambda event: event.at)
    return Plan(seed=seed, tasks=tasks, faults=tuple(faults), late_tasks=late_tasks)
