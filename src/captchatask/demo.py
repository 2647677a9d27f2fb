"""``captchatask demo``: the whole system on this machine, surviving failures, in one command.

It starts a real etcd + kube-apiserver, the CaptchaAI emulator with pingback faults switched on
(some dropped, some duplicated, a few unsolvable), the sidecar and the operator, creates a
``CaptchaProvider`` and a mix of ``CaptchaTask``s — through ``kubectl apply`` and through the
sidecar's local API — and shows every task until all have an outcome. Once a third of the tasks
are ``Submitted`` (their pingbacks are on the way) it freezes the API server (SIGSTOP) for a
few seconds, so pingbacks meet it.

Every effect it shows is read from the system's own numbers, never asserted by the demo: the
spool depth and spooled count from the sidecar's ``/metrics``, the dropped pingbacks from the
emulator's accounting (``/_emulator/summary``), the fallback-poll recoveries from the
operator's ``/metrics``. The summary checks each solved task against the token the emulator
issued for it: ``lost`` must be 0.

``--ci`` runs unattended (plain progress lines, stops at once, exit 1 if anything was lost).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import shlex
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from prometheus_client.parser import text_string_to_metric_families

from captchatask import model
from captchatask.stack import Stack, StackConfig

NAMESPACE: Final = "demo"
#: Emulated solve times are scaled so the demo takes a minute, not ten.
SOLVE_TIME_SCALE: Final = "0.12"
#: A pingback that has not come this long after submission is fetched by fallback polling.
#: Longer than the freeze plus the spool's drain, so the pingbacks the freeze held back reach
#: their tasks from the spool; shorter would let fallback polls beat the replays.
CALLBACK_TIMEOUT_SECONDS: Final = 12
POLL_INTERVAL_SECONDS: Final = 5
#: The API server is frozen once this share of the tasks is ``Submitted`` (pingbacks in flight).
FREEZE_WHEN_SUBMITTED: Final = 1 / 3
#: How long the freeze lasts...
OUTAGE_SECONDS: Final = 6.0
#: ...unless no pingback has met it yet: then it is held (at most this long) until one does.
OUTAGE_MAX_SECONDS: Final = 15.0
REFRESH_SECONDS: Final = 1.0
#: The live view keeps this many of the latest progress lines under its header.
LIVE_EVENTS: Final = 4
#: The faults the demo survives: the seed tutorial's failure table, at a visible rate.
EMULATOR_FAULTS: Final = (
    "--solve-time-scale",
    SOLVE_TIME_SCALE,
    "--pingback-drop-rate",
    "0.3",
    "--pingback-duplicate-rate",
    "0.2",
    "--unsolvable-rate",
    "0.05",
)

# Realistic site keys: the emulator, like the real service, rejects malformed ones.
TASK_KINDS: Final[list[dict[str, Any]]] = [
    {"type": "RecaptchaV2", "siteKey": "6Le-wvkSAAAAAPBMRTvw0Q4Muexq9bi0DJwx_mJ-",
     "pageURL": "https://www.google.com/recaptcha/api2/demo"},
    {"type": "RecaptchaV3", "siteKey": "6LcR_okUAAAAAPYrPe-HK_0RULO1aZM15ENyM-Mf",
     "pageURL": "https://shop.example/checkout", "recaptcha": {"action": "checkout",
                                                               "minScore": 0.3}},
    {"type": "Turnstile", "siteKey": "0x4AAAAAAABkMYinukE8nzYS",
     "pageURL": "https://login.example/"},
    {"type": "HCaptcha", "siteKey": "a5f74b19-9e45-40e0-b45d-47ff91b7a6c2",
     "pageURL": "https://accounts.example/signup"},
    {"type": "GeeTest", "siteKey": "81388ea1fc187e0c335c0a8907ff2625",
     "pageURL": "https://tickets.example/", "geetest": {"challenge":
                                                       "12345678abc90123d45678ef90123a456b"}},
]  # fmt: skip


@dataclass
class Row:
    """One task as the live view shows it."""

    name: str
    created_via: str
    task_type: str = ""
    phase: str = "Pending"
    delivered_by: str = ""
    provider_task_id: str = ""
    token: str = ""
    failure: str = ""
    latency: float | None = None


Sample = tuple[str, dict[str, str], float]
#: A series: its sample name and the labels a sample must carry.
Series = tuple[str, dict[str, str]]

#: The series the demo reads (names as the components expose them).
SPOOLED: Final[Series] = ("captchatask_pingbacks_total", {"outcome": "spooled"})
SPOOL_DEPTH: Final[Series] = ("captchatask_pingback_spool_depth", {})
#: A spooled result is replayed once, with one of these outcomes ("retry" is not a replay).
REPLAY_OUTCOMES: Final = ("recorded", "duplicate", "late", "dead_lettered")
REPLAYED: Final[tuple[Series, ...]] = tuple(
    ("captchatask_spool_replays_total", {"outcome": outcome}) for outcome in REPLAY_OUTCOMES
)
POLL_RECOVERIES: Final[Series] = ("captchatask_fallback_recoveries_total", {})


def scrape(url: str) -> list[Sample]:
    """Every sample of a Prometheus text endpoint, as (name, labels, value)."""
    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310 - loopback only
        text = reply.read().decode()
    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def metric(samples: Sequence[Sample], *series: Series) -> int:
    """The sum of every sample matching one of ``series`` (name, labels it must carry)."""
    return int(
        sum(
            value
            for name, labels, value in samples
            for wanted, must in series
            if name == wanted and must.items() <= labels.items()
        )
    )


@dataclass(frozen=True, slots=True)
class Numbers:
    """What the components say about the faults, read at one moment."""

    #: Sidecar: results acknowledged and in the local spool, not yet in the ledger.
    spool_depth: int
    #: Sidecar: pingbacks acknowledged by spooling them (since it started).
    spooled: int
    #: Sidecar: spooled results replayed into the ledger, by outcome (``duplicate``: the
    #: result was already there, e.g. a fallback poll got it first).
    replays: dict[str, int]
    #: Emulator: pingbacks it dropped on purpose.
    dropped: int
    #: Operator: results that reached the ledger by fallback poll because no pingback came.
    poll_recoveries: int

    @property
    def replayed(self) -> int:
        """Spooled results replayed into the ledger, whatever the outcome."""
        return sum(self.replays.values())

    @classmethod
    def read(cls, stack: Stack) -> Numbers:
        """Scrape the sidecar and the operator, and ask the emulator for its accounting."""
        sidecar = scrape(stack.sidecar_metrics_url)
        operator = scrape(stack.operator_metrics_url)
        totals = stack.emulator("summary")["totals"]
        replays = zip(REPLAY_OUTCOMES, REPLAYED, strict=True)
        return cls(
            spool_depth=metric(sidecar, SPOOL_DEPTH),
            spooled=metric(sidecar, SPOOLED),
            replays={outcome: metric(sidecar, series) for outcome, series in replays},
            dropped=int(totals.get("pingbacks_dropped", 0)),
            poll_recoveries=metric(operator, POLL_RECOVERIES),
        )


@dataclass
class Freeze:
    """The API-server freeze and what the sidecar did about it (from its metrics)."""

    started: float
    before: Numbers
    thawed: float | None = None
    held_longer: bool = False
    #: Set once the spool has drained after the thaw: the episode's final numbers.
    after: Numbers | None = None

    def spooled(self, now: Numbers) -> int:
        """Pingbacks spooled since the freeze began."""
        return now.spooled - self.before.spooled

    def replayed(self, now: Numbers) -> int:
        """Spooled results replayed since the freeze began."""
        return now.replayed - self.before.replayed

    def replays(self, now: Numbers) -> str:
        """The replays since the freeze began, by outcome, for people ("recorded 3, ...")."""
        counts = {o: now.replays[o] - self.before.replays[o] for o in REPLAY_OUTCOMES}
        return ", ".join(f"{outcome} {n}" for outcome, n in counts.items() if n) or "none"


def task_manifests(count: int, *, rng: random.Random) -> list[dict[str, Any]]:
    """``count`` tasks of mixed types, named ``demo-<n>`` (pure but for ``rng``)."""
    docs = []
    for index in range(count):
        spec = json.loads(json.dumps(rng.choice(TASK_KINDS)))
        spec["deadlineSeconds"] = 300
        docs.append(
            {
                "apiVersion": model.API_VERSION,
                "kind": model.TASK_KIND,
                "metadata": {"name": f"demo-{index:02d}"},
                "spec": spec,
            }
        )
    return docs


def post_json(url: str, body: object) -> Any:
    """POST JSON to the sidecar's local API (the app's side of the demo)."""
    request = urllib.request.Request(  # noqa: S310 - loopback only
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310
        return json.loads(reply.read())


class Demo:
    """Drives a :class:`Stack` through the demo and renders it."""

    def __init__(self, stack: Stack, *, out: TextIO, live: bool) -> None:
        self.stack = stack
        self.out = out
        self.live = live
        self.rows: dict[str, Row] = {}
        self.started = time.monotonic()
        self.freeze: Freeze | None = None
        self.events: list[str] = []
        #: The components' numbers at the summary (``None`` before it).
        self.final: Numbers | None = None

    def say(self, message: str) -> None:
        """Print a progress line (kept under the live view's header, which redraws)."""
        line = f"[{time.monotonic() - self.started:6.1f}s] {message}"
        self.events.append(line)
        self.out.write(line + "\n")
        self.out.flush()

    def create_tasks(self, count: int, *, rng: random.Random) -> None:
        """Two thirds through ``kubectl apply``, one third through the sidecar's local API."""
        docs = task_manifests(count, rng=rng)
        via_kubectl = docs[: (2 * count) // 3]
        self.stack.apply(via_kubectl)
        for doc in via_kubectl:
            self.rows[doc["metadata"]["name"]] = Row(doc["metadata"]["name"], "kubectl")
        for doc in docs[len(via_kubectl) :]:
            body = {"name": doc["metadata"]["name"], **doc["spec"]}
            created = post_json(f"{self.stack.local_api_url}/v1/tasks", body)
            self.rows[created["name"]] = Row(created["name"], "local API")
        self.say(
            f"created {len(via_kubectl)} tasks with kubectl apply and "
            f"{count - len(via_kubectl)} through the sidecar's local API"
        )

    def refresh(self) -> bool:
        """Read every task; return False while the API server is unreachable."""
        try:
            items = self.stack.get_json("ctask")["items"]
        except Exception:  # noqa: BLE001 - kubectl fails while the API server is down
            return False
        for item in items:
            view = model.TaskView.from_body(item)
            row = self.rows.setdefault(view.ref.name, Row(view.ref.name, "?"))
            row.task_type = view.task_type
            row.phase = str(view.phase or "Pending")
            row.delivered_by = str(view.delivered_by or "")
            row.provider_task_id = view.known_provider_task_id or ""
            row.token = view.solution_token or ""
            row.failure = str((view.status.get("failure") or {}).get("code", ""))
            if view.finished_at and view.created_at:
                row.latency = (view.finished_at - view.created_at).total_seconds()
        return True

    def done(self) -> bool:
        """Whether every task has its outcome."""
        return all(row.phase in ("Solved", "Failed") for row in self.rows.values())

    def in_flight(self) -> bool:
        """Whether pingbacks are on their way: a third of the tasks wait at the solver."""
        phases = Counter(row.phase for row in self.rows.values())
        submitted = phases[str(model.Phase.SUBMITTED)]
        unsubmitted = phases[str(model.Phase.PENDING)] + phases[str(model.Phase.QUEUED)]
        wanted = max(1, math.ceil(len(self.rows) * FREEZE_WHEN_SUBMITTED))
        return submitted >= wanted or (submitted > 0 and unsubmitted == 0)

    def status_line(self, numbers: Numbers, *, now: float) -> str:
        """Phases, then the faults' effects as the components report them."""
        phases = Counter(row.phase for row in self.rows.values())
        line = ", ".join(f"{phase} {n}" for phase, n in sorted(phases.items()))
        freeze = self.freeze
        if freeze is not None and freeze.thawed is None:
            line = f"API server FROZEN {now - freeze.started:.0f}s (tasks as last seen) | {line}"
        return (
            f"{line} | sidecar: spool depth {numbers.spool_depth}, spooled {numbers.spooled}, "
            f"replayed {numbers.replayed} | emulator: dropped {numbers.dropped} | "
            f"operator: poll recoveries {numbers.poll_recoveries}"
        )

    def render(self, numbers: Numbers) -> None:
        """Draw the live view (a full table on a terminal, one line otherwise)."""
        line = self.status_line(numbers, now=time.monotonic())
        if not self.live:
            self.say(line)
            return
        self.out.write("\x1b[2J\x1b[H")
        self.out.write(f"captchatask demo — {time.monotonic() - self.started:5.1f}s\n{line}\n")
        self.out.write("".join(f"  {event}\n" for event in self.events[-LIVE_EVENTS:]))
        self.out.write(
            f"\n{'TASK':10} {'TYPE':20} {'VIA':10} {'PHASE':10} {'DELIVERED BY':13} "
            f"{'LATENCY':>8}  FAILURE\n"
        )
        for row in sorted(self.rows.values(), key=lambda r: r.name):
            latency = f"{row.latency:.1f}s" if row.latency is not None else ""
            self.out.write(
                f"{row.name:10} {row.task_type:20} {row.created_via:10} {row.phase:10} "
                f"{row.delivered_by:13} {latency:>8}  {row.failure}\n"
            )
        self.out.flush()

    def _freeze(self, numbers: Numbers, now: float) -> None:
        submitted = sum(1 for row in self.rows.values() if row.phase == model.Phase.SUBMITTED)
        self.say(
            f"{submitted} of {len(self.rows)} tasks are Submitted, their pingbacks on the way: "
            f"freezing the kube-apiserver (SIGSTOP) for {OUTAGE_SECONDS:.0f}s"
        )
        self.stack.plane.pause()
        self.freeze = Freeze(started=now, before=numbers)

    def _thaw_due(self, freeze: Freeze, numbers: Numbers, now: float) -> bool:
        """Thaw after the outage, held (bounded) until at least one pingback has met it."""
        if freeze.thawed is not None:
            return False
        held = now - freeze.started
        met = freeze.spooled(numbers) > 0
        if held >= OUTAGE_SECONDS and not met and held < OUTAGE_MAX_SECONDS:
            if not freeze.held_longer:
                freeze.held_longer = True
                self.say("no pingback has met the freeze yet; holding it a little longer")
            return False
        return held >= OUTAGE_SECONDS

    def _thaw(self, freeze: Freeze, numbers: Numbers, now: float) -> None:
        self.stack.plane.resume()
        freeze.thawed = now
        self.say(
            f"kube-apiserver thawed after {now - freeze.started:.0f}s; the sidecar's /metrics: "
            f"{freeze.spooled(numbers)} pingback(s) spooled during the freeze, spool depth "
            f"{numbers.spool_depth}; the sidecar now replays them"
        )

    def _settle(self, freeze: Freeze, numbers: Numbers) -> None:
        """Close the episode once the spool has drained after the thaw."""
        if freeze.thawed is None or freeze.after is not None or numbers.spool_depth:
            return
        if freeze.replayed(numbers) < freeze.spooled(numbers):
            return
        freeze.after = numbers
        self.say(
            f"spool drained: {freeze.spooled(numbers)} spooled during the freeze, "
            f"{freeze.replayed(numbers)} replayed into the ledger ({freeze.replays(numbers)}; "
            "sidecar /metrics)"
        )

    def watch(self, *, timeout: float, outage: bool) -> None:
        """Refresh until every task has an outcome, freezing the API server once on the way."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                now = time.monotonic()
                numbers = Numbers.read(self.stack)
                freeze = self.freeze
                if outage and freeze is None and self.in_flight():
                    self._freeze(numbers, now)
                elif freeze is not None:
                    if self._thaw_due(freeze, numbers, now):
                        self._thaw(freeze, numbers, now)
                    self._settle(freeze, numbers)
                frozen = self.freeze is not None and self.freeze.thawed is None
                api_up = not frozen and self.refresh()
                self.render(numbers)
                settled = self.freeze is None or self.freeze.after is not None
                if api_up and settled and self.done():
                    return
                time.sleep(REFRESH_SECONDS)
        finally:
            if self.freeze is not None and self.freeze.thawed is None:
                self.stack.plane.resume()

    def summary(self) -> int:
        """Check every task against the emulator's accounting; print; return how many were lost."""
        issued = {str(task["id"]): task for task in self.stack.emulator("tasks")["tasks"]}
        totals = self.stack.emulator("summary")["totals"]
        by = Counter(row.delivered_by for row in self.rows.values() if row.phase == "Solved")
        failed = Counter(row.failure for row in self.rows.values() if row.phase == "Failed")
        lost: list[str] = []
        for row in self.rows.values():
            record = issued.get(row.provider_task_id)
            if row.phase not in ("Solved", "Failed"):
                lost.append(f"{row.name}: no outcome ({row.phase})")
            elif row.phase == "Solved" and (record is None or record.get("token") != row.token):
                lost.append(f"{row.name}: token does not match what the solver issued")
            elif row.phase == "Failed" and record is not None and record.get("state") == "solved":
                lost.append(f"{row.name}: failed ({row.failure}) though the solver solved it")
        calls = int(totals.get("in_requests", 0)) + int(totals.get("res_requests", 0))
        latencies = sorted(r.latency for r in self.rows.values() if r.latency is not None)
        p50 = latencies[len(latencies) // 2] if latencies else 0.0
        final = self.final = Numbers.read(self.stack)
        self.out.write("\n== summary\n")
        rows: list[tuple[str, object]] = [
            ("tasks", len(self.rows)),
            ("solved via pingback", by.get("pingback", 0)),
            ("solved via fallback poll", by.get("poll", 0)),
            ("solved via dead-letter requeue", by.get("deadLetter", 0)),
            ("failed", ", ".join(f"{code} x{n}" for code, n in failed.items()) or "0"),
        ]
        freeze = self.freeze
        if freeze is None:
            rows.append(("API-server freeze", "none"))
        else:
            episode = freeze.after or final
            rows.append(
                (
                    "pingbacks spooled during the freeze",
                    f"{freeze.spooled(episode)}, replayed {freeze.replayed(episode)} "
                    f"({freeze.replays(episode)})",
                )
            )
            outside = final.spooled - freeze.spooled(episode)
            if outside:
                # A hot-path ledger write over its budget on a busy machine spools too.
                rows.append(("pingbacks spooled outside the freeze", outside))
        rows += [
            ("pingbacks dropped by the emulator", final.dropped),
            ("results recovered by fallback poll", final.poll_recoveries),
            (
                "provider calls per task",
                f"{calls / max(1, len(self.rows)):.2f} ({totals.get('in_requests', 0)} in.php, "
                f"{totals.get('res_requests', 0)} res.php)",
            ),
            ("median time to outcome", f"{p50:.1f}s"),
            ("lost", len(lost)),
        ]
        for label, value in rows:
            self.out.write(f"  {label:38} {value}\n")
        for line in lost:
            self.out.write(f"  LOST {line}\n")
        return len(lost)

    def look_around(self) -> None:
        """Tell the user how to poke at the running system.

        The lines are pasted into a new shell, which has neither the pinned kubectl nor (with
        ``make demo``, whose virtualenv nobody activated) the ``captchatask`` command on its
        PATH: the export line brings both.
        """
        env = self.stack.env()
        tools = env["PATH"].split(":", 1)[0]
        scripts = sysconfig.get_path("scripts")  # where `captchatask` itself is installed
        self.out.write(
            "\n== look around while it is up\n"
            f"  export KUBECONFIG={shlex.quote(env['KUBECONFIG'])}\n"
            f'  export PATH={shlex.quote(f"{tools}:{scripts}")}:"$PATH"\n'
            f"  kubectl get captcha -n {NAMESPACE}\n"
            f"  kubectl get ctask -n {NAMESPACE} -o wide\n"
            f"  captchatask dlq list -n {NAMESPACE}\n"
            f"  curl -s {self.stack.sidecar_metrics_url} | grep ^captchatask_\n"
            f"  curl -s {self.stack.operator_metrics_url} | grep ^captchatask_\n"
            f"  curl -s {self.stack.emulator_url}/_emulator/summary\n"
            "(interactive runs stay up until Ctrl-C or --timeout)\n"
        )
        self.out.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captchatask demo",
        description="Run the whole system locally with pingback faults and an API-server "
        "freeze while pingbacks are in flight, show every task and the components' own "
        "numbers until every task has an outcome, and check nothing was lost.",
    )
    parser.add_argument("--tasks", type=int, default=30, help="how many tasks (default 30)")
    parser.add_argument("--seed", type=int, default=7, help="seed for faults and task mix")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="give up after this many seconds"
    )
    parser.add_argument(
        "--ci", action="store_true", help="unattended: plain output, stop at once, exit 1 if lost"
    )
    parser.add_argument("--no-outage", action="store_true", help="skip the API-server freeze")
    parser.add_argument("--workdir", type=Path, help="where logs and state go (default: temp)")
    return parser


def stack_config(workdir: Path, *, seed: int) -> StackConfig:
    """The demo's system: faulty pingbacks, quick fallback polls."""
    return StackConfig(
        workdir=workdir,
        namespace=NAMESPACE,
        seed=seed,
        emulator_args=EMULATOR_FAULTS,
        provider_spec={
            "polling": {
                "callbackTimeoutSeconds": CALLBACK_TIMEOUT_SECONDS,
                "intervalSeconds": POLL_INTERVAL_SECONDS,
            }
        },
    )


def run(argv: Sequence[str], *, out: TextIO, inspect: Callable[[Demo], None] | None = None) -> int:
    """Run the demo; ``inspect`` sees the finished demo while the system is still up."""
    args = _parser().parse_args(list(argv))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="captchatask-demo-"))
    live = out.isatty() and not args.ci

    def progress(message: str) -> None:
        out.write(f"  ... {message}\n")
        out.flush()

    stack = Stack(stack_config(workdir, seed=args.seed), progress=progress)
    out.write(f"captchatask demo: logs and state in {workdir}\n")
    lost = 0
    try:
        stack.start()
        demo = Demo(stack, out=out, live=live)
        # A seeded task mix, so a run can be replayed; nothing secret is drawn from it.
        demo.create_tasks(args.tasks, rng=random.Random(args.seed))  # noqa: S311
        demo.watch(timeout=args.timeout, outage=not args.no_outage)
        lost = demo.summary()
        if inspect is not None:
            inspect(demo)
        if not args.ci:
            demo.look_around()
            # Stay up for a look around only when someone is there to press Ctrl-C.
            if sys.stdin.isatty():
                with contextlib.suppress(KeyboardInterrupt):
                    asyncio.run(asyncio.sleep(args.timeout))
    except KeyboardInterrupt:
        out.write("\ninterrupted\n")
    finally:
        out.write("stopping everything...\n")
        stack.stop()
    return 1 if lost else 0


def main(argv: Sequence[str]) -> int:
    """Entry point of ``captchatask demo``."""
    return run(argv, out=sys.stdout)


__all__ = ["Demo", "Freeze", "Numbers", "main", "metric", "run", "scrape", "task_manifests"]
