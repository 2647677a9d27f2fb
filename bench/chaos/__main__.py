"""``python -m bench.chaos --profile full|ci|smoke [--dialect D] [--seed N]``: run, print, JSON.

``--dialect 2captcha`` runs the same profile against a 2captcha-dialect provider, where bulk
``ids=`` polling is documented and on: its figures go to ``chaos-<profile>-2captcha.json``
beside the CaptchaAI run's ``chaos-<profile>.json``.

Exit status 0 when the run passed, 1 when any guarantee was broken (the violations are
printed, the logs kept), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.chaos.plan import make_plan
from bench.chaos.profiles import PROFILES
from bench.chaos.report import table, write_json
from bench.chaos.run import DIALECTS, ChaosRun
from bench.chaos.verdict import evaluate

RESULTS = Path(__file__).resolve().parents[1] / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="ci")
    parser.add_argument(
        "--dialect", choices=DIALECTS, default=DIALECTS[0], help="the provider's API dialect"
    )
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    parser.add_argument("--tasks", type=int, default=None, help="override the profile's N")
    parser.add_argument("--workdir", type=Path, default=None, help="logs and state (kept)")
    parser.add_argument("--json", type=Path, default=None, help="figures (default: bench/results)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir even on success")
    return parser.parse_args(argv)


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through ChaosRun.execute: the stack is stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    profile = PROFILES[args.profile]
    if args.tasks is not None:
        profile = dataclasses.replace(profile, tasks=args.tasks)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    own_workdir = args.workdir is None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="captchatask-chaos-"))
    plan = make_plan(profile, seed)

    def say(message: str) -> None:
        print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", flush=True)

    window = f"{profile.create_seconds:.0f}s"
    dialect = "" if args.dialect == DIALECTS[0] else f" --dialect {args.dialect}"
    replay = f"python -m bench.chaos --profile {profile.name}{dialect} --seed {seed}"
    say(f"profile {profile.name}: {profile.tasks} tasks over {window}, seed {seed}")
    say(f"provider dialect: {args.dialect}")
    say(f"replay with: {replay}")
    say("fault timeline (seconds after the first task is created):")
    for line in plan.timeline():
        say(f"  {line}")

    started = time.time()
    run = ChaosRun(profile=profile, plan=plan, workdir=workdir, say=say, dialect=args.dialect)
    snapshot = run.execute()
    verdict = evaluate(snapshot)
    tl = run.timeline
    back = tl.apiserver_restarting
    verdict.figures["timings"] = {
        "apiserver_outage_seconds": round(tl.outage_seconds, 1),
        "late_outage_seconds": round(tl.late_outage_seconds, 1),
        "max_spool_depth": tl.max_spool_depth,
        "max_spool_depth_bounded": (
            tl.max_spool_depth if tl.max_spool_depth_bounded is None else tl.max_spool_depth_bounded
        ),
        "spool_drain_seconds": (tl.spool_drained - back) if back and tl.spool_drained else None,
        "settle_seconds": tl.settled - tl.last_create,
        "create_seconds": tl.last_create - tl.first_create,
        "wall_seconds": time.time() - started,
        "task_create_retries": tl.create_retries,
        "spool_depth_changes": tl.spool_depths,
        "spool_full_unready": tl.spool_full_unready if tl.spool_full_at else None,
    }
    verdict.figures["secret_leaks"] = len(run.leaks)
    verdict.violations.extend(f"fault not injected: {error}" for error in run.errors)
    for leak in run.leaks:
        verdict.violations.append(f"secret leak: {leak.describe()}")

    print()
    print(table(verdict.figures, dialect=args.dialect))
    document: dict[str, Any] = {
        "profile": profile.name,
        "dialect": args.dialect,
        "seed": seed,
        "replay": replay,
        "passed": verdict.passed,
        "violations": verdict.violations,
        "fault_timeline": tl.executed,
        "figures": verdict.figures,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    suffix = "" if args.dialect == DIALECTS[0] else f"-{args.dialect}"
    out = args.json or RESULTS / f"chaos-{profile.name}{suffix}.json"
    write_json(out, document)
    print(f"\nfigures written to {out}")
    if verdict.passed:
        print("PASSED: nothing lost, nothing recorded twice, nothing mixed up, no secret leaked")
        if own_workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        return 0
    print(f"FAILED ({len(verdict.violations)} violations; logs kept in {workdir}):")
    for violation in verdict.violations:
        print(f"  - {violation}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
