"""The five tables, the target verdicts and the miss report, from one results document.

Everything here is a pure function of the JSON that :mod:`bench.run` writes, so the documentation's
tables can be regenerated from ``bench/results/full.json`` without re-running anything::

    python -m bench.report bench/results/full.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bench import footprint, rounds

KIB: Final = 1024
MIB: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Verdict:
    """One performance target and how this run did."""

    target: str
    figure: str
    met: bool | None  # None: not measured in this run


def _num(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int | float) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _best_seed(base: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    name = max(
        ("seed_flask_dev", "seed_gunicorn_gthread"),
        key=lambda key: base[key]["requests_per_second"],
    )
    return name, base[name]


def ingestion_table(results: dict[str, Any]) -> str:
    """Table 1: closed-loop throughput and fixed-rate latency."""
    ing = results["ingestion"]
    base, ours = ing["baselines"], ing["ours"]
    ceiling = base["framework_ceiling"]["requests_per_second"]
    _best, seed = _best_seed(base)

    def row(label: str, run: dict[str, Any], note: str = "") -> list[str]:
        rate = run["requests_per_second"]
        return [
            label,
            _num(rate, 0),
            f"{rate / ceiling:.0%}",
            f"{rate / seed['requests_per_second']:.1f}x",
            _num(run["p50_ms"], 2),
            _num(run["p99_ms"], 2),
            _num(run["max_ms"], 1),
            note,
        ]

    spool, ledger = ours["spool_wrk"], ours["ledger_wrk"]
    rows = [
        row("framework ceiling (empty aiohttp handler)", base["framework_ceiling"]),
        row("seed: Flask dev server (threaded)", base["seed_flask_dev"], "not durable"),
        row(
            "seed: gunicorn gthread, 1 worker x 8 threads",
            base["seed_gunicorn_gthread"],
            "not durable",
        ),
        row(
            "**ours, spool path** (API server frozen)",
            spool,
            f"fsync'd; {spool['outcomes']['spooled']:,.0f} spooled",
        ),
        row("**ours, ledger path** (real API server)", ledger, _ledger_note(ledger)),
    ]
    closed = _table(
        ["server", "req/s", "of ceiling", "x seed", "p50 ms", "p99 ms", "max ms", "note"], rows
    )
    paced_rows = []
    for label, key in (("ours, spool path", "spool_paced"), ("ours, ledger path", "ledger_paced")):
        run = ours[key]
        outcomes = run.get("outcomes", {})
        paced_rows.append(
            [
                label,
                _num(run["rate_target"], 0),
                _num(run["rate_achieved"], 0),
                _num(run["p50_ms"], 2),
                _num(run["p99_ms"], 2),
                _num(run["max_ms"], 1),
                f"{run['errors']} errors; "
                + ", ".join(f"{k} {v:,.0f}" for k, v in outcomes.items() if v),
            ]
        )
    paced = _table(
        ["fixed rate (open loop)", "target req/s", "sent req/s", "p50 ms", "p99 ms", "max ms", ""],
        paced_rows,
    )
    limit = ceiling_table(ours)
    return f"{closed}\n\n{paced}" + (f"\n\n{limit}" if limit else "")


def _ledger_note(ledger: dict[str, Any]) -> str:
    """What the closed-loop ledger run put into the ledger, on both paths, and how fast.

    wrk repeats each task's pingback, so most requests are repeats (acknowledged, spooled, and
    ``duplicate`` on replay): the results are the distinct tasks, and their rate is counted
    until the last of them is in the ledger (the gate sends most to the spool, whose drainer
    applies them at the API server's pace).
    """
    spooled = f"{ledger['outcomes'].get('spooled', 0):,.0f} spooled"
    if "ledger_per_second" not in ledger:  # results from before replays were counted
        return f"{ledger['recorded_per_second']:,.0f} recorded/s on the pingback path; {spooled}"
    repeats = ledger.get("replays", {}).get("duplicate", 0)
    # No ratio to the raw ceiling here: that is measured with the control plane on a core of its
    # own, this row with it unpinned beside wrk and the sidecar (see ceiling_table).
    return (
        f"{ledger['recorded_per_second']:,.0f} results/s into the ledger during the run; all "
        f"{ledger['recorded_until_all']:,.0f} in {ledger['seconds_to_apply_all']:g} s = "
        f"{ledger['ledger_per_second']:,.0f}/s; {spooled}, {repeats:,.0f} of them repeats "
        f"(duplicate on replay, drained {ledger['drain_seconds']:g} s later)"
    )


def ceiling_table(ours: dict[str, Any]) -> str:
    """The raw API-server ceiling and the overload run, every ledger rate as a ratio to it."""
    raw = ours.get("raw_ceiling")
    if not raw:
        return ""
    ceiling = raw["patches_per_second"]
    rows = [
        [
            f"raw API-server ceiling (aiohttp, {raw['in_flight']} in flight, one status "
            "JSON patch per task)",
            "closed loop",
            _num(raw["p50_ms"], 2),
            _num(raw["p99_ms"], 2),
            f"{raw['statuses'].get('200', 0):,} ok, {raw['patches'] - raw['ok']:,} not",
            f"{_num(ceiling, 0)} patches/s",
            "100%",
        ]
    ]
    shallow = ours.get("raw_ceiling_at_drain_depth")
    if shallow:
        rows.append(
            [
                f"the same probe with the drainer's depth ({shallow['in_flight']} in flight)",
                "closed loop",
                _num(shallow["p50_ms"], 2),
                _num(shallow["p99_ms"], 2),
                f"{shallow['statuses'].get('200', 0):,} ok, "
                f"{shallow['patches'] - shallow['ok']:,} not",
                f"{_num(shallow['patches_per_second'], 0)} patches/s",
                f"{shallow['patches_per_second'] / ceiling:.0%}",
            ]
        )
    reference = ours.get("apiserver_reference")
    if reference:
        rows.append(
            [
                "our ledger client straight to the API server (no sidecar)",
                f"closed loop, {reference['concurrency']} in flight",
                "-",
                "-",
                "-",
                f"{_num(reference['records_per_second'], 0)} records/s",
                f"{reference['records_per_second'] / ceiling:.0%}",
            ]
        )
    over = ours.get("overload")
    if over:
        diverted = over.get("diverted", {})
        rows.append(
            [
                f"**ours, overload**: {over['factor']:g}x the ceiling offered, "
                f"{over['requests']:,} pingbacks (each its own task)",
                f"{_num(over['rate_achieved'], 0)} req/s open loop",
                _num(over["p50_ms"], 2),
                _num(over["p99_ms"], 2),
                f"{over['http_5xx']} 5xx, {over['errors']} errors; spooled at once "
                f"{sum(diverted.values()):,.0f} (limit {diverted.get('limit', 0):,.0f}, "
                f"backlog {diverted.get('backlog', 0):,.0f})",
                f"{_num(over['ledger_per_second'], 0)} results/s "
                f"(all {over['applied']:,.0f} in {over['seconds_to_apply_all']:.1f} s"
                + (
                    f"; {over['replays_in_flight_mean']:g} replays in flight on average"
                    if over.get("replays_in_flight_mean") is not None
                    else ""
                )
                + ")",
                f"{over['ledger_per_second'] / ceiling:.0%}"
                + (
                    f" ({over['ledger_per_second'] / shallow['patches_per_second']:.0%} of the "
                    f"probe at {shallow['in_flight']} in flight)"
                    if shallow
                    else ""
                ),
            ]
        )
    layout = ours.get("limit_layout", {}).get("layout")
    table = _table(
        [
            "API server at its limit",
            "offered",
            "p50 ms",
            "p99 ms",
            "answers",
            "into the ledger",
            "of ceiling",
        ],
        rows,
    )
    return (f"Layout: {layout}.\n\n" if layout else "") + table + rounds_table(ours)


def rounds_table(ours: dict[str, Any]) -> str:
    """Every round of the rows above, when there were several (the median's figures are above)."""
    done = rounds.of(ours)
    if len(done) < 2:
        return ""
    median = rounds.median_index(done)
    rows = []
    for index, round_ in enumerate(done):
        r = rounds.figures(round_)
        mark = "**" if index == median else ""
        rows.append(
            [
                f"{mark}{index + 1}{mark}" + (" (above: the median ledger ratio)" if mark else ""),
                f"{_num(r.ceiling, 0)}/s",
                f"{_num(r.at_drain_depth, 0)}/s" if r.at_drain_depth else "-",
                _num(r.p99_ms, 2),
                f"{r.http_5xx}",
                f"{_num(r.ledger, 0)}/s",
                f"{mark}{r.ratio:.0%}{mark}",
                f"{r.ratio_at_drain_depth:.0%}" if r.ratio_at_drain_depth else "-",
            ]
        )
    return (
        f"\n\n{len(done)} rounds, each on tasks of its own and deleted after it; the targets read "
        "the median of each figure across them.\n\n"
        + _table(
            [
                "round",
                "raw ceiling (64 in flight)",
                "probe at the drainer's depth",
                "overload p99 ms",
                "5xx",
                "into the ledger",
                "of ceiling",
                "of the drainer-depth probe",
            ],
            rows,
        )
    )


def calls_table(results: dict[str, Any]) -> str:
    """Table 2: provider API calls per task."""
    calls = results["calls"]
    no_bulk = {
        level["loss"]: level for level in calls["levels"] if level.get("variant") == "ours_no_bulk"
    }
    rows = []
    for level in calls["levels"]:
        if level.get("variant"):
            continue
        ours, seed = level["ours"], level["seed"]
        single = no_bulk.get(level["loss"])
        rows.append(
            [
                f"{level['loss']:.0%}",
                _num(ours["calls_per_task"], 3),
                f"{ours['in_php']:.0f} + {ours['res_single']:.0f} + {ours['res_bulk']:.0f}",
                _num(single["ours"]["calls_per_task"], 3) if single else "-",
                _num(seed["calls_per_task"], 3),
                f"{seed['in_php']:.0f} + {seed['res_single']:.0f}",
            ]
        )
    return _table(
        [
            "pingback loss",
            "ours (bulk ids=)",
            "in + get + bulk",
            "ours, one id/request",
            "seed poller",
            "in + get",
        ],
        rows,
    )


def recovery_table(results: dict[str, Any]) -> str:
    """Table 3: recovery delay after the callback timeout."""
    calls = results["calls"]
    rows = []
    for level in calls["levels"]:
        if level.get("variant") or level["loss"] == 0:
            continue
        ours, seed = level["ours_recovery"], level["seed_recovery"]
        rows.append(
            [
                f"{level['loss']:.0%}",
                str(ours["samples"]),
                _num(ours["p50_s"], 3),
                _num(ours["p99_s"], 3),
                _num(ours["max_s"], 3),
                str(seed["samples"]),
                _num(seed["p50_s"], 3),
                _num(seed["p99_s"], 3),
                _num(seed["max_s"], 3),
            ]
        )
    return _table(
        [
            "loss",
            "ours n",
            "ours p50 s",
            "ours p99 s",
            "ours max s",
            "seed n",
            "seed p50 s",
            "seed p99 s",
            "seed max s",
        ],
        rows,
    )


def scale_table(results: dict[str, Any]) -> str:
    """Table 4: scale."""
    sc = results["scale"]
    etcd = sc["etcd"]
    rows = [
        ["tasks (every pingback dropped)", f"{sc['tasks']:,}"],
        ["peak in flight (Pending+Queued+Submitted)", _num(sc["peak_in_flight"], 0)],
        ["peak Submitted at once", _num(sc["peak_submitted"], 0)],
        ["create all (API server)", f"{sc['create_seconds']} s"],
        [
            "submit all (first create → last submittedAt)",
            f"{sc['submit_all_seconds']} s ({sc['submit_rate_per_second']} tasks/s)",
        ],
        ["operator peak RSS", f"{sc['operator_peak_rss_bytes'] / MIB:.0f} MiB"],
        ["sidecar peak RSS", f"{sc['sidecar_peak_rss_bytes'] / MIB:.0f} MiB"],
        ["operator CPU per 1,000 tasks", f"{sc['operator_cpu_seconds_per_1000']} CPU-s"],
        [
            "recovery lateness after submittedAt + timeout (p50 / p99 / max)",
            f"{_num(sc['lateness_p50_s'], 2)} / {_num(sc['lateness_p99_s'], 2)} / "
            f"{_num(sc['lateness_max_s'], 2)} s",
        ],
        [
            "last task Solved after the last callback deadline",
            f"{sc['recover_all_after_last_deadline_s']} s",
        ],
        [
            "delivered by",
            ", ".join(f"{k} {v:,}" for k, v in sorted(sc["delivered_by"].items())),
        ],
        [
            "etcd per finished task (as written / compacted)",
            f"{etcd['bytes_per_task_as_written']:,} B / {etcd['bytes_per_task_compacted']:,} B",
        ],
        ["task object JSON size (with managedFields)", f"{sc['task_json_bytes']:,} B"],
    ]
    objects = sc.get("etcd_objects", {})
    if objects:
        tasks = max(1, sc["tasks"])
        parts = [
            f"{kind} {info['value_bytes'] / tasks:,.0f} B ({info['keys'] / tasks:.1f} keys)"
            for kind, info in objects.items()
        ]
        rows.append(["etcd values per task (current revision)", "; ".join(parts)])
    return _table(["measure", f"{sc['tasks']:,} tasks"], rows)


def latency_table(results: dict[str, Any]) -> str:
    """Table 5: pingback -> app."""
    lat = results["ingestion"]["ours"]["app_latency"]
    return _table(
        ["path", "samples", "p50 ms", "p99 ms", "max ms"],
        [
            [
                "pingback sent → local API long-poll answered",
                str(lat["samples"]),
                _num(lat["p50_ms"], 2),
                _num(lat["p99_ms"], 2),
                _num(lat["max_ms"], 2),
            ],
            [
                "(of which: the pingback's own 200)",
                str(lat["samples"]),
                _num(lat["pingback_ack_p50_ms"], 2),
                _num(lat["pingback_ack_p99_ms"], 2),
                "",
            ],
        ],
    )


def verdicts(results: dict[str, Any]) -> list[Verdict]:
    """Every numeric performance target against this run's figures."""
    out: list[Verdict] = []
    measured = {
        key: value
        for key, value in results.items()
        if isinstance(value, dict) and "error" not in value
    }
    ing = measured.get("ingestion")
    if ing:
        base, ours = ing["baselines"], ing["ours"]
        ceiling = base["framework_ceiling"]["requests_per_second"]
        best, seed = _best_seed(base)
        spool = ours["spool_wrk"]["requests_per_second"]
        out += [
            Verdict(
                "spool path ≥ 50 % of the framework ceiling",
                f"{spool:,.0f} / {ceiling:,.0f} req/s = {spool / ceiling:.0%}",
                spool >= 0.5 * ceiling,
            ),
            Verdict(
                "spool path ≥ 5x the seed baseline (best configuration)",
                f"{spool:,.0f} / {seed['requests_per_second']:,.0f} ({best}) = "
                f"{spool / seed['requests_per_second']:.1f}x",
                spool >= 5 * seed["requests_per_second"],
            ),
            Verdict(
                "spool path p99 ≤ 5 ms at 1,000 req/s",
                f"p99 {ours['spool_paced']['p99_ms']:.2f} ms",
                ours["spool_paced"]["p99_ms"] <= 5,
            ),
            Verdict(
                "ledger path p99 ≤ 25 ms at 500 req/s",
                f"p99 {ours['ledger_paced']['p99_ms']:.1f} ms",
                ours["ledger_paced"]["p99_ms"] <= 25,
            ),
            Verdict(
                "pingback → app p99 ≤ 100 ms",
                f"p99 {ours['app_latency']['p99_ms']:.1f} ms",
                ours["app_latency"]["p99_ms"] <= 100,
            ),
        ]
        out += overload_verdicts(ours)
    calls = measured.get("calls")
    if calls:
        limits = {0.0: 1.01, 0.3: 1.05, 1.0: 1.10}
        for level in calls["levels"]:
            if level.get("variant"):
                continue
            figure = level["ours"]["calls_per_task"]
            limit = limits[level["loss"]]
            out.append(
                Verdict(
                    f"≤ {limit} provider calls per task at {level['loss']:.0%} pingback loss",
                    f"{figure} (seed {level['seed']['calls_per_task']})",
                    figure is not None and figure <= limit,
                )
            )
        worst = [
            level["ours_recovery"]["p99_s"]
            for level in calls["levels"]
            if level["ours_recovery"]["samples"]
        ]
        p99 = max(worst) if worst else float("nan")
        out.append(Verdict("recovery delay p99 ≤ 1 s", f"p99 {p99:.3f} s", p99 <= 1))
    sc = measured.get("scale")
    if sc:
        rss = sc["operator_peak_rss_bytes"] / MIB
        late = sc["lateness_max_s"]
        per_task = sc["etcd"]["bytes_per_task_compacted"]
        written = sc["etcd"]["bytes_per_task_as_written"]
        solved = sc["delivered_by"].get("poll", 0)
        out += [
            Verdict(
                f"operator RSS ≤ 300 MB with {sc['tasks']:,} tasks",
                f"{rss:.0f} MiB",
                rss * MIB <= 300e6,
            ),
            Verdict(
                f"all {sc['tasks']:,} recovered within callback timeout + 10 s",
                f"{solved:,} recovered by poll; latest {late:.1f} s after its deadline",
                solved == sc["tasks"] and late <= 10,
            ),
            Verdict(
                "≤ 2.5 KiB of etcd per finished task (scale run)",
                f"{per_task:,} B compacted ({written:,} B as written)",
                per_task <= footprint.BYTES_PER_TASK_TARGET,
            ),
        ]
    out += [Verdict(*item) for item in footprint.verdicts(measured)]
    return out


def overload_verdicts(ours: dict[str, Any]) -> list[Verdict]:
    """Acknowledgements independent of the API server: at twice its raw ceiling offered.

    Judged on the median across the rounds (:mod:`bench.rounds`), each round's figures shown.
    """
    over, summary = ours.get("overload"), rounds.summary(ours)
    if not over or summary is None:
        return []
    factor = f"{over['factor']:g}x"
    several = len(summary.rounds) > 1

    def each(values: Sequence[str]) -> str:
        return f"; rounds {' / '.join(values)}" if several else ""

    median = "median " if several else ""
    return [
        Verdict(
            f"pingback p99 ≤ 10 ms at {factor} the API server's ceiling offered",
            f"{median}p99 {summary.p99_ms:.2f} ms at {over['rate_achieved']:,.0f} req/s"
            + each([f"{r.p99_ms:.2f}" for r in summary.rounds]),
            summary.p99_ms <= 10,
        ),
        Verdict(
            f"no 5xx at {factor} the API server's ceiling offered",
            f"{summary.http_5xx} 5xx"
            + (f" across the {len(summary.rounds)} rounds" if several else ""),
            summary.http_5xx == 0,
        ),
        Verdict(
            "results reach the ledger at ≥ 90 % of the raw API-server ceiling (same run)",
            (
                f"median of {len(summary.rounds)} rounds' ratios {summary.ratio:.0%}"
                + each(
                    [f"{r.ratio:.0%} ({r.ledger:,.0f}/{r.ceiling:,.0f})" for r in summary.rounds]
                )
                if several
                else f"{summary.ledger:,.0f} / {summary.ceiling:,.0f} per s = {summary.ratio:.0%}"
            ),
            summary.ratio >= 0.9,
        ),
    ]


def verdict_table(items: Sequence[Verdict]) -> str:
    """The targets as a table."""
    rows = [
        [item.target, item.figure, "met" if item.met else "**missed**" if item.met is False else ""]
        for item in items
    ]
    return _table(["target", "this run", ""], rows)


def machine_line(results: dict[str, Any]) -> str:
    """One paragraph naming the machine and versions."""
    m = results["machine"]
    pkgs = m["packages"]
    kube = m.get("kubernetes", {})
    return (
        f"{m['cpu_model']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.0f} GiB RAM, "
        f"{m['kernel']}; Python {m['python']}, aiohttp {pkgs.get('aiohttp')}, "
        f"kopf {pkgs.get('kopf')}, Flask {pkgs.get('flask')}, gunicorn {pkgs.get('gunicorn')}; "
        f"kube-apiserver {kube.get('kube_apiserver', '?')}, etcd {kube.get('etcd', '?')}; "
        f"{(m.get('wrk') or 'wrk ?').split(' Copyright')[0]}."
    )


def render(results: dict[str, Any]) -> str:
    """All tables as Markdown, in the order the documentation shows them."""
    parts = [f"Profile `{results['profile']}` · {machine_line(results)}", results["pinning"]]
    sections = (
        ("ingestion", "1. Pingback ingestion", ingestion_table),
        ("calls", "2. Provider API calls per task", calls_table),
        ("calls", "3. Recovery delay after the callback timeout", recovery_table),
        ("scale", "4. Scale", scale_table),
        ("ingestion", "5. Pingback → app", latency_table),
        *(
            (key, f"{6 + index}. {title}", build)
            for index, (key, title, build) in enumerate(footprint.SECTIONS)
        ),
    )
    for key, title, build in sections:
        if key in results and "error" in results[key]:
            parts.append(f"### {title}\n\nnot measured: the phase failed (see the JSON).")
        elif key in results:
            parts.append(f"### {title}\n\n{build(results)}")
    parts.append("### Targets\n\n" + verdict_table(verdicts(results)))
    return "\n\n".join(parts) + "\n"


README_BEGIN: Final = "<!-- benchmarks: generated by `python -m bench.report --readme` -->"
README_END: Final = "<!-- end of generated benchmarks -->"
README_PATH: Final = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(results: dict[str, Any]) -> str:
    """The README's benchmark table: every target verdict of a results document, generated.

    Built from :func:`verdicts`, so a target any phase adds there is a README row too.
    """
    stamps = (results.get("phase_started_at") or {}).values() or [results["started_at"]]
    dates = sorted({str(stamp)[:10] for stamp in stamps})
    span = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    lines = [
        README_BEGIN,
        "",
        verdict_table(verdicts(results)),
        "",
        f"`make bench`, profile `{results['profile']}`, phases run {span}, on "
        f"{machine_line(results)} Figures from a shared 2-core machine are noisy; every table: "
        "[Benchmarks](https://captchatask.github.io/captchatask/benchmarks/).",
        "",
        README_END,
    ]
    return "\n".join(lines)


def write_readme(results: dict[str, Any], readme: Path = README_PATH) -> bool:
    """Replace the generated block in the README; ``False`` if the README has no block."""
    text = readme.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(head + readme_block(results) + tail, encoding="utf-8")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Print the tables of a results file, or (``--readme``) regenerate the README's block."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.report", description="The tables of a `make bench` results file."
    )
    parser.add_argument("results", type=Path, help="a results file, e.g. bench/results/full.json")
    parser.add_argument(
        "--readme", action="store_true", help="regenerate the README's benchmark block from it"
    )
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        parser.error(f"cannot read {args.results}: {exc}")
    if args.readme:
        return 0 if write_readme(results) else 1
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
