"""``make bench``: every benchmark in one run, side by side with the baselines.

::

    python -m bench.run                    # the full profile (what the documentation publishes)
    python -m bench.run --profile small    # the same harness, shrunk (runs in make test)

Phases, in order (each starts its own whole-system :class:`~captchatask.stack.Stack`):

1. ``ingestion`` — pingback ingestion and pingback -> app latency (:mod:`bench.ingest`);
2. ``calls`` — provider calls per task and recovery delay (:mod:`bench.calls`);
3. ``scale`` — 10,000 tasks in flight (:mod:`bench.scale`);
4. ``writes``, ``fairness``, ``startup`` — the API server's side: writes and etcd bytes per task
   by delivery path (:mod:`bench.writes`), an unrelated client during a pingback storm with and
   without the chart's APF objects (:mod:`bench.fairness`), startup at scale
   (:mod:`bench.startup`).

With ``--only``, the phases run replace theirs in an existing ``<profile>.json`` and the other
phases' figures are kept (each phase records when it ran in ``phase_started_at``).

Writes ``<results-dir>/<profile>.json`` (machine, versions, every figure, profiles) and
``<profile>.md`` (the tables), and prints the five tables and the target verdicts. Benchmarks
print figures; nothing here fails on a slow result.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from bench import calls, cores, fairness, ingest, report, scale, startup, writes
from bench.machine import machine_info
from bench.profiles import PROFILES

PHASES: Final = ("ingestion", "calls", "scale", "writes", "fairness", "startup")
DEFAULT_RESULTS_DIR: Final = Path(__file__).parent / "results"
#: Seconds over which the machine's idle share is sampled before the run (other load skews).
IDLE_SAMPLE_SECONDS: Final = 1.0


def _idle_share() -> float:
    """Share of CPU time idle over a short window (another job on the machine shows here)."""

    def read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)

    idle0, total0 = read()
    time.sleep(IDLE_SAMPLE_SECONDS)
    idle1, total1 = read()
    return round((idle1 - idle0) / max(1, total1 - total0), 3)


def _jsonable(value: Any) -> Any:
    """NaN is not JSON: write it as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=DEFAULT_RESULTS_DIR,
        help="where <profile>.json and <profile>.md go",
    )
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temp dir)")
    parser.add_argument(
        "--only",
        action="append",
        choices=PHASES,
        help="run only this phase (repeatable; default: all)",
    )
    parser.add_argument(
        "--record-bugs",
        type=Path,
        help="append each missed target, with its profile, to this file (e.g. docs/findings.md)",
    )
    return parser


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the selected phases and return the results document."""
    args = _parser().parse_args(argv)
    profile = PROFILES[args.profile]
    phases = args.only or list(PHASES)
    started = time.monotonic()

    def say(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)

    idle = _idle_share()
    say(f"profile {profile.name}; machine idle {idle:.0%} before start; {cores.describe()}")
    results: dict[str, Any] = {
        "profile": profile.name,
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "pinning": cores.describe(),
        "idle_share_before": idle,
        "settings": {
            key: getattr(profile, key) for key in profile.__dataclass_fields__ if key != "name"
        },
    }
    with tempfile.TemporaryDirectory(prefix="captchatask-bench-") as scratch:
        workdir = args.workdir or Path(scratch)
        modules = {
            "ingestion": ingest,
            "calls": calls,
            "scale": scale,
            "writes": writes,
            "fairness": fairness,
            "startup": startup,
        }
        for phase in PHASES:
            if phase not in phases:
                continue
            phase_started = time.monotonic()
            say(f"== {phase}")
            try:
                results[phase] = modules[phase].run(profile, workdir / phase, say)
            except Exception as exc:  # one broken phase must not hide the others
                say(f"{phase} failed: {type(exc).__name__}: {exc}")
                results[phase] = {"error": traceback.format_exc()}
            results.setdefault("phase_seconds", {})[phase] = round(
                time.monotonic() - phase_started, 1
            )
            results.setdefault("phase_started_at", {})[phase] = results["started_at"]
    kubernetes: dict[str, Any] = {}
    kubernetes |= results.get("scale", {}).get("versions", {})
    kubernetes |= results.get("ingestion", {}).get("ours", {}).get("versions", {})
    results["machine"] = machine_info(kubernetes=kubernetes)
    results["total_seconds"] = round(time.monotonic() - started, 1)
    results = _jsonable(results)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.results_dir / f"{profile.name}.json"
    if args.only and json_path.exists():
        results = _merged(json.loads(json_path.read_text(encoding="utf-8")), results, phases)
    json_path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    text = report.render(results)
    (args.results_dir / f"{profile.name}.md").write_text(text, encoding="utf-8")
    print()
    print(text)
    say(f"results: {json_path} (total {results['total_seconds']}s)")
    if profile.name == "full" and args.results_dir == DEFAULT_RESULTS_DIR:
        report.write_readme(results)  # the README's table is generated from these results
    if args.record_bugs is not None:
        _record_bugs(args.record_bugs, results)
    return results


def _merged(
    previous: dict[str, Any], current: dict[str, Any], phases: Sequence[str]
) -> dict[str, Any]:
    """An earlier results document with ``phases`` replaced by this run's (``--only``)."""
    merged = previous | {key: value for key, value in current.items() if key not in PHASES}
    earlier = {phase: previous["started_at"] for phase in PHASES if phase in previous}
    merged["phase_seconds"] = previous.get("phase_seconds", {}) | current.get("phase_seconds", {})
    merged["phase_started_at"] = (
        earlier | previous.get("phase_started_at", {}) | current.get("phase_started_at", {})
    )
    for phase in phases:
        merged[phase] = current[phase]
    merged["machine"] = previous.get("machine", {}) | current["machine"]
    return merged


def _profile_lines(summary: dict[str, Any] | None) -> list[str]:
    if not summary or not summary.get("available"):
        return ["  (no profile)"]
    lines = [
        f"  py-spy, {summary['samples']} busy samples"
        + (
            f", main thread busy {summary['busy_fraction_of_wall']:.0%} of "
            f"{summary['wall_seconds']} s"
            if "busy_fraction_of_wall" in summary
            else ""
        )
        + "; inclusive % of busy samples:"
    ]
    lines += [f"    {pct:5.1f}%  {name}" for name, pct in summary["inclusive_pct"][:15]]
    lines.append("  self %:")
    lines += [f"    {pct:5.1f}%  {name}" for name, pct in summary["self_pct"][:8]]
    return lines


def _record_bugs(path: Path, results: dict[str, Any]) -> None:
    """Append one timestamped entry per missed target, with the profile that explains it."""
    misses = [item for item in report.verdicts(results) if item.met is False]
    if not misses:
        return
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    profiles = {
        "ledger": results.get("ingestion", {}).get("ours", {}).get("ledger_wrk", {}).get("profile"),
        "spool": results.get("ingestion", {}).get("ours", {}).get("spool_wrk", {}).get("profile"),
        "operator": results.get("scale", {}).get("profile_operator_submit"),
    }
    lines: list[str] = []
    for miss in misses:
        key = (
            "ledger"
            if "ledger" in miss.target
            else "spool"
            if "spool" in miss.target
            else "operator"
            if any(word in miss.target for word in ("RSS", "recovered", "etcd"))
            else None
        )
        lines += [
            f"\n## {stamp} — bench ({results['profile']}): missed: {miss.target}",
            "",
            f"Figure: {miss.figure}. Machine: {report.machine_line(results)}",
            "",
        ]
        if key is not None:
            lines += ["```", *_profile_lines(profiles[key]), "```"]
    if not path.exists():
        path.write_text("# Bugs and findings\n", encoding="utf-8")
    with path.open("a", encoding="utf-8") as sink:
        sink.write("\n".join(lines) + "\n")


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through each phase's finally: its stack is stopped


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``make bench``."""
    signal.signal(signal.SIGTERM, _terminate)
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
