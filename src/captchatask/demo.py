"""``captchatask demo``: the whole system on this machine, surviving failures, in one command.

It starts a real etcd + kube-apiserver, the CaptchaAI emulator with pingback faults switched on
(some dropped, some duplicated, a few unsolvable), the sidecar and the operator, creates a
``CaptchaProvider`` and a mix of ``CaptchaTask``s — through ``kubectl apply`` and through the
sidecar's local API — stops the API server for a few seconds in the middle (pingbacks are
spooled meanwhile), and shows every task until all have an outcome. The summary checks each
solved task against the token the emulator issued for it: ``lost`` must be 0.

``--ci`` runs unattended (plain progress lines, stops at once, exit 1 if anything was lost).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from captchatask import model
from captchatask.stack import Stack, StackConfig

NAMESPACE: Final = "demo"
#: Emulated solve times are scaled so the demo takes a minute, not ten.
SOLVE_TIME_SCALE: Final = "0.12"
#: A pingback that has not come this long after submission is fetched by fallback polling.
CALLBACK_TIMEOUT_SECONDS: Final = 8
POLL_INTERVAL_SECONDS: Final = 5
#: The API-server outage, seconds after the tasks were created, and how long it lasts.
OUTAGE_AT: Final = 2.0
OUTAGE_SECONDS: Final = 6.0
REFRESH_SECONDS: Final = 1.0
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

    def say(self, message: str) -> None:
        """Print a progress line."""
        self.out.write(f"[{time.monotonic() - self.started:6.1f}s] {message}\n")
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

    def render(self, *, api_up: bool) -> None:
        """Draw the live view (a full table on a terminal, one line otherwise)."""
        phases = Counter(row.phase for row in self.rows.values())
        line = ", ".join(f"{phase} {n}" for phase, n in sorted(phases.items()))
        if not self.live:
            note = "" if api_up else " (API server down: pingbacks are being spooled)"
            self.say(f"{line}{note}")
            return
        self.out.write("\x1b[2J\x1b[H")
        self.out.write(f"captchatask demo — {time.monotonic() - self.started:5.1f}s — {line}\n")
        if not api_up:
            self.out.write("API server DOWN: the sidecar is spooling pingbacks to disk\n")
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

    def watch(self, *, timeout: float, outage: bool) -> None:
        """Refresh until every task has an outcome, with one API-server outage on the way."""
        deadline = time.monotonic() + timeout
        outage_start = time.monotonic() + OUTAGE_AT if outage else None
        outage_end: float | None = None
        while time.monotonic() < deadline:
            now = time.monotonic()
            if outage_start is not None and now >= outage_start:
                self.say(f"freezing the kube-apiserver (SIGSTOP) for {OUTAGE_SECONDS:.0f}s")
                self.stack.plane.pause()
                outage_start, outage_end = None, now + OUTAGE_SECONDS
            if outage_end is not None and now >= outage_end:
                self.stack.plane.resume()
                self.say("kube-apiserver is back; the sidecar drains its spool")
                outage_end = None
            api_up = outage_end is None and self.refresh()
            self.render(api_up=api_up)
            if api_up and self.done():
                return
            time.sleep(REFRESH_SECONDS)
        if outage_end is not None:
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
        self.out.write("\n== summary\n")
        for label, value in (
            ("tasks", len(self.rows)),
            ("solved via pingback", by.get("pingback", 0)),
            ("solved via fallback poll", by.get("poll", 0)),
            ("solved via dead-letter requeue", by.get("deadLetter", 0)),
            ("failed", ", ".join(f"{code} x{n}" for code, n in failed.items()) or "0"),
            ("pingbacks dropped by the emulator", _count(issued, "dropped")),
            (
                "provider calls per task",
                f"{calls / max(1, len(self.rows)):.2f} ({totals.get('in_requests', 0)} in.php, "
                f"{totals.get('res_requests', 0)} res.php)",
            ),
            ("median time to outcome", f"{p50:.1f}s"),
            ("lost", len(lost)),
        ):
            self.out.write(f"  {label:34} {value}\n")
        for line in lost:
            self.out.write(f"  LOST {line}\n")
        return len(lost)

    def look_around(self) -> None:
        """Tell the user how to poke at the running system."""
        env = self.stack.env()
        self.out.write(
            "\n== look around while it is up\n"
            f"  export KUBECONFIG={env['KUBECONFIG']}\n"
            f"  export PATH={env['PATH'].split(':', 1)[0]}:$PATH\n"
            f"  kubectl get captcha -n {NAMESPACE}\n"
            f"  kubectl get ctask -n {NAMESPACE} -o wide\n"
            f"  captchatask dlq list -n {NAMESPACE}\n"
            f"  curl -s {self.stack.sidecar_metrics_url} | grep ^captchatask_\n"
            f"  curl -s {self.stack.operator_metrics_url} | grep ^captchatask_\n"
            f"  curl -s {self.stack.emulator_url}/_emulator/summary\n"
            "(interactive runs stay up until Ctrl-C or --timeout)\n"
        )
        self.out.flush()


def _count(issued: dict[str, Any], outcome: str) -> int:
    return sum(1 for task in issued.values() if task["pingback"]["outcome"] == outcome)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captchatask demo",
        description="Run the whole system locally with pingback faults and an API-server "
        "outage, show every task until it has an outcome, and check nothing was lost.",
    )
    parser.add_argument("--tasks", type=int, default=30, help="how many tasks (default 30)")
    parser.add_argument("--seed", type=int, default=7, help="seed for faults and task mix")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="give up after this many seconds"
    )
    parser.add_argument(
        "--ci", action="store_true", help="unattended: plain output, stop at once, exit 1 if lost"
    )
    parser.add_argument("--no-outage", action="store_true", help="skip the API-server outage")
    parser.add_argument("--workdir", type=Path, help="where logs and state go (default: temp)")
    return parser


def main(argv: Sequence[str]) -> int:
    """Entry point of ``captchatask demo``."""
    args = _parser().parse_args(list(argv))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="captchatask-demo-"))
    config = StackConfig(
        workdir=workdir,
        namespace=NAMESPACE,
        seed=args.seed,
        emulator_args=EMULATOR_FAULTS,
        provider_spec={
            "polling": {
                "callbackTimeoutSeconds": CALLBACK_TIMEOUT_SECONDS,
                "intervalSeconds": POLL_INTERVAL_SECONDS,
            }
        },
    )
    out = sys.stdout
    live = out.isatty() and not args.ci

    def progress(message: str) -> None:
        out.write(f"  ... {message}\n")
        out.flush()

    stack = Stack(config, progress=progress)
    out.write(f"captchatask demo: logs and state in {workdir}\n")
    lost = 0
    try:
        stack.start()
        demo = Demo(stack, out=out, live=live)
        # A seeded task mix, so a run can be replayed; nothing secret is drawn from it.
        demo.create_tasks(args.tasks, rng=random.Random(args.seed))  # noqa: S311
        demo.watch(timeout=args.timeout, outage=not args.no_outage)
        lost = demo.summary()
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


__all__ = ["Demo", "main", "task_manifests"]
