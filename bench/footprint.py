"""Tables and target verdicts of the API-server footprint phases: writes, fairness, startup.

Pure functions of the results document, like :mod:`bench.report` (which places them): what a
task costs the API server by delivery path (:mod:`bench.writes`), an unrelated client's latency
during a pingback storm with and without the chart's APF objects (:mod:`bench.fairness`), and the
startup times at scale (:mod:`bench.startup`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

KIB: Final = 1024
#: Target: etcd bytes per finished task after compaction.
BYTES_PER_TASK_TARGET: Final = 2.5 * KIB
#: Target: the unrelated client's latency during the storm, as a multiple of its idle value.
FAIRNESS_FACTOR_TARGET: Final = 2.0
#: Target: seconds to the operator's first poll / the receiver's replay.
STARTUP_TARGET_SECONDS: Final = 30.0
WRITE_COLUMNS: Final = (
    ("create", "POST captchatasks"),
    ("drop managedFields", "PATCH captchatasks"),
    ("status", "PATCH captchatasks/status"),
    ("Events", "POST events"),
)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _n(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float) and abs(value) >= 1000:
        return f"{value:,.0f}"
    if not isinstance(value, float):
        return str(value)
    text = f"{value:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def writes_table(results: dict[str, Any]) -> str:
    """Writes and bytes per finished task, by delivery path, now and as before."""
    rows = []
    labels = {
        "pingback": "by pingback",
        "poll": "by fallback poll",
        "pingback_before": "by pingback, as before (`--routine-events --no-strip-managed-fields`)",
        "poll_before": "by fallback poll, as before",
    }
    for key, label in labels.items():
        run = results["writes"].get(key)
        if not run:
            continue
        per_task = run["per_task"]
        rows.append(
            [
                label,
                *(_n(per_task.get(request)) for _, request in WRITE_COLUMNS),
                f"**{_n(run['writes_per_task'])}**",
                _n(per_task.get("GET captchatasks")),
                f"{run['task_json_bytes']:,} B",
                f"**{run['bytes_per_task_compacted']:,} B**",
                f"{run['bytes_per_task_as_written']:,} B",
            ]
        )
    tasks = next(iter(results["writes"].values()))["tasks"]
    header = [
        f"{tasks:,} tasks delivered",
        *(f"{name} /task" for name, _ in WRITE_COLUMNS),
        "writes /task",
        "GET /task",
        "task JSON",
        "etcd /task compacted",
        "as written",
    ]
    notes = (
        "\n\nWhat each remaining write buys: the **create** is the application's; the **drop "
        "managedFields** PATCH replaces the GET the operator does anyway before the intent (a "
        "request for a request) and keeps ~1 KiB of field-ownership bookkeeping out of the task "
        "for its whole life; the three **status** writes are the submission intent (no double "
        "submission across crashes and replicas), `Submitted` with the provider id (what a "
        "pingback or a poll is matched against) and the result (the ledger's one compare-and-set); "
        "**Events** are posted only for warnings and unusual transitions (`--routine-events` "
        "posts the two every task would get)."
    )
    return _table(header, rows) + notes


def _our_seats(run: dict[str, Any]) -> str:
    """Nominal seats of the components' own level in one storm (``-`` without the objects)."""
    levels = run["priority_levels"]
    ours = [item for level, item in levels.items() if level.endswith("-components")]
    return _n(ours[0]["nominal_seats"], 0) if ours else "-"


def _listing(listing: dict[str, Any], *, cached: bool) -> dict[str, Any]:
    """The client's consistent lists' figures, or those of its cached (``resourceVersion=0``)."""
    return dict(listing.get("cached") or {}) if cached else listing


#: The baseline of the quiescent rows: an API server nothing else writes to.
QUIESCENT_BASELINE: Final = "quiescent idle"


def _cluster_names(plane: dict[str, Any]) -> tuple[str, str]:
    """A cluster-like plane's name in the rows, and its idle baseline's name."""
    where = "every core" if plane.get("unpinned_plane") else "one core"
    return (
        f"cluster-like (Lease renewals, plane on {where})",
        f"cluster-like idle (plane on {where})",
    )


def _idle_row(label: str, idle: dict[str, Any]) -> list[str]:
    cached = idle.get("cached", {}).get("p99_ms")
    return [
        label,
        "-",
        "-",
        _n(idle["p50_ms"]),
        _n(idle["p99_ms"]),
        "-",
        "-" if cached is None else f"{_n(cached)} ms",
        *("-" for _ in range(5)),
    ]


def _storm_row(
    label: str, run: dict[str, Any], idle: dict[str, Any], baseline: str, plane: str | None
) -> list[str]:
    """One storm, its ratios against ``idle`` (whose name, ``baseline``, is in the row).

    ``plane``: the plane's core (``core_0``), or ``None`` for a plane on every core, whose row
    shows each core's busy share.
    """
    waits = "; ".join(
        f"{level} {_n(item['mean_wait_ms'])} ms ({_n(item['nominal_seats'], 0)} seats)"
        for level, item in sorted(run["priority_levels"].items())
    )
    ledger = run.get("ledger", {}).get("per_second")
    server = run["list_pods"].get("server_p99_ms_at_most")
    shares = run.get("cpu_busy", {})
    busy = shares.get(plane) if plane else None
    cached = run["list_pods"].get("cached", {}).get("p99_ms")
    idle_cached = idle.get("cached", {}).get("p99_ms")
    return [
        label.format(pace=_n(run.get("ledger_writes_per_second"), 0)),
        baseline,
        _our_seats(run),
        f"{run['pingbacks']['rate_achieved']:,.0f}/s",
        _n(run["list_pods"]["p50_ms"]),
        _n(run["list_pods"]["p99_ms"]),
        f"{run['list_pods']['p99_ms'] / idle['p99_ms']:.1f}x",
        "-" if cached is None or not idle_cached else f"{cached / idle_cached:.1f}x",
        "-" if server is None else f"≤ {_n(server, 0)} ms",
        (
            " / ".join(f"{share:.0%}" for _, share in sorted(shares.items())) or "-"
            if plane is None
            else "-"
            if busy is None
            else f"{busy:.0%}"
        ),
        f"{_n(run['pingbacks']['p99_ms'], 1)} ms, {run['pingbacks']['errors']} errors",
        "-" if ledger is None else f"{ledger:,.0f}/s",
        waits,
    ]


STORM_LABELS: Final = {
    "kubernetes_defaults": "storm, Kubernetes' default FlowSchemas",
    "chart_apf": "storm, with the chart's `apiPriority` objects",
    "chart_apf_paced": "storm, the chart's objects and a pace of {pace} results/s",
}


def fairness_table(results: dict[str, Any]) -> str:
    """An unrelated client's ``list pods`` latency: idle, storm without and with the APF objects.

    Then the sweep (full profile): the same storm with other seat counts for the components'
    level, so the chart's default can be read against what each count costs the ledger. Then
    each cluster-like plane (Lease renewals in the background), with an idle row of its own that
    its storms' ratios are taken against: every row names its baseline, the quiescent one stays.
    """
    fair = results["fairness"]
    idle = fair["idle"]
    rows = [_idle_row("idle", idle)]
    rows[0].insert(1, QUIESCENT_BASELINE + " (this row)")
    plane = f"core_{fair.get('plane_core', 0)}"
    labels = dict(STORM_LABELS)
    for label in fair.get("sweep", []):
        labels[label] = f"sweep: `nominalConcurrencyShares={label.removeprefix('shares_')}`"
    for key, label in labels.items():
        run = fair.get(key)
        if run:
            rows.append(_storm_row(label, run, idle, QUIESCENT_BASELINE, plane))
    for cluster in fair.get("cluster_like", []):
        name, baseline = _cluster_names(cluster)
        rows.append(_idle_row(f"idle, {name}", cluster["idle"]))
        rows[-1].insert(1, baseline + " (this row)")
        for key, run in cluster.get("storms", {}).items():
            label = f"{STORM_LABELS.get(key, key)}; {name}"
            core = None if cluster.get("unpinned_plane") else plane
            rows.append(_storm_row(label, run, cluster["idle"], baseline, core))
    header = [
        "unrelated client (`list pods`, 20 pods)",
        "ratios against",
        "our seats",
        "pingbacks",
        "p50 ms",
        "p99 ms",
        "p99 / idle",
        "cached list (`resourceVersion=0`) p99 / idle",
        "API server's own p99",
        "plane core busy (on every core: each core)",
        "pingback p99",
        "ledger rate",
        "mean APF queue wait per level",
    ]
    layout = fair.get(
        "layout", "everything (API server, etcd, receiver, load generator, client) shares 2 cores"
    )
    note = (
        f"\n\nStorm: {fair['storm_factor']:g}x the ledger capacity probed in the same run "
        f"({fair['capacity_records_per_second']:,.0f} records/s) for {fair['storm_seconds']:g} s, "
        "the receiver authenticated as its ServiceAccount. Ledger rate: results applied from the "
        "storm's start until the receiver's spool was empty again, per second (every pingback was "
        f"acknowledged; the spool held the rest). Layout: {layout}. The API server's own p99 is "
        "the upper edge of its `LIST pods` histogram bucket (the client's side excluded). Sweep "
        "rows: lending and borrowing off. The client alternates consistent lists (kubectl's) and "
        "lists served from the watch cache as it stands (`resourceVersion=0`, an informer's); a "
        "consistent list waits until the cache has seen etcd's current revision, which any "
        "steady writer keeps moving (see docs/operations/api-priority.md)."
    )
    if fair.get("cluster_like"):
        note += (
            " Cluster-like rows: throughout, kube-controller-manager's and kube-scheduler's "
            "leader-election Leases are renewed every 2 s and a node's Lease every 10 s (real "
            "PUTs, as those users), what a one-node cluster's control plane writes at idle; their "
            "ratios are against the cluster-like idle row measured with the same background and "
            "layout in the same run, never against the quiescent one."
        )
    return _table(header, rows) + note


def startup_table(results: dict[str, Any]) -> str:
    """Startup at scale."""
    up = results["startup"]
    op, rx = up.get("operator", {}), up.get("receiver", {})
    rows = [
        [
            f"operator start → first fallback poll, {op.get('tasks', 0):,} tasks due",
            f"{_n(op.get('first_poll_s'))} s",
            f"healthy after {_n(op.get('healthy_s'))} s; all polled after "
            f"{_n(op.get('all_polled_s'))} s",
        ],
    ]
    takeover = up.get("takeover")
    if takeover:
        rows.append(
            [
                f"standby takeover → first fallback poll, {takeover.get('tasks', 0):,} tasks due",
                f"{_n(takeover.get('takeover_to_first_poll_s'))} s",
                "from the dead replica's peering record expiring; the active replica was "
                f"SIGKILLed {_n(takeover.get('kill_to_record_expiry_s'))} s before that "
                f"(`--peering-lifetime` {takeover.get('peering_lifetime_s')} s, set to outlast "
                "preparing the tasks), first poll "
                f"{_n(takeover.get('kill_to_first_poll_s'))} s after the kill",
            ]
        )
    rows += [
        [
            f"receiver replay of a {rx.get('records', 0):,}-record spool "
            f"({rx.get('spool_bytes', 0) / 2**20:.0f} MiB)",
            f"{_n(rx.get('process_serving_backlog_s'))} s",
            f"`Spool.open()` alone {_n(rx.get('open_s'))} s; process healthy after "
            f"{_n(rx.get('process_healthy_s'))} s",
        ],
    ]
    return _table(["measure", "time", ""], rows)


Verdict = tuple[str, str, bool | None]
_STORM_NAMES: Final = {"chart_apf": "chart APF", "chart_apf_paced": "chart APF + pace"}


def _fairness_verdicts(
    idle_run: dict[str, Any],
    runs: dict[str, Any],
    storms: Sequence[tuple[str, str]],
    *,
    baseline: str,
) -> list[Verdict]:
    """The 2x target for each storm in ``runs``, consistent and cached lists, against
    ``idle_run`` (named ``baseline`` in the target)."""
    out: list[Verdict] = []
    for cached in (False, True):
        kind = " cached" if cached else ""
        idle = _listing(idle_run, cached=cached).get("p99_ms")
        for key, label in storms:
            listing = runs.get(key, {}).get("list_pods", {})
            p99 = _listing(listing, cached=cached).get("p99_ms")
            if not idle or p99 is None:
                continue
            out.append(
                (
                    f"unrelated{kind} `list pods` p99 ≤ 2x {baseline} during a 2x storm ({label})",
                    f"{p99:,.0f} ms vs {baseline} {idle:.1f} ms ({p99 / idle:.1f}x)",
                    p99 <= FAIRNESS_FACTOR_TARGET * idle,
                )
            )
    return out


def verdicts(measured: dict[str, Any]) -> list[Verdict]:
    """(target, figure, met) of the footprint phases present in ``measured``."""
    out: list[Verdict] = []
    writes = measured.get("writes")
    if writes:
        for path in ("pingback", "poll"):
            run = writes.get(path)
            if run:
                figure = run["bytes_per_task_compacted"]
                out.append(
                    (
                        f"≤ 2.5 KiB of etcd per finished task (by {path})",
                        f"{figure:,} B compacted, {run['writes_per_task']} writes per task",
                        figure <= BYTES_PER_TASK_TARGET,
                    )
                )
    fair = measured.get("fairness")
    if fair and "chart_apf" in fair:
        storms = (
            ("kubernetes_defaults", "defaults"),
            ("chart_apf", "chart APF"),
            ("chart_apf_paced", "chart APF + pace"),
        )
        out += _fairness_verdicts(fair["idle"], fair, storms, baseline="idle")
    for cluster in (fair or {}).get("cluster_like", []):
        where = "every core" if cluster.get("unpinned_plane") else "one core"
        labelled = [
            (key, f"{_STORM_NAMES.get(key, key)}; cluster-like, plane on {where}")
            for key in cluster.get("storms", {})
        ]
        out += _fairness_verdicts(
            cluster["idle"], cluster["storms"], labelled, baseline="cluster-like idle"
        )
    up = measured.get("startup")
    if up:
        checks: Sequence[tuple[str, Callable[[dict[str, Any]], Any], str]] = (
            ("operator", lambda run: run.get("first_poll_s"), "operator's first poll"),
            (
                "takeover",
                lambda run: run.get("takeover_to_first_poll_s"),
                "standby's first poll after its takeover",
            ),
            ("receiver", lambda run: run.get("process_serving_backlog_s"), "receiver's replay"),
        )
        for key, read, label in checks:
            run = up.get(key) or {}
            seconds = read(run)
            size = run.get("tasks") or run.get("records") or 0
            out.append(
                (
                    f"{label} ≤ 30 s at scale ({size:,})",
                    f"{_n(seconds)} s",
                    None if seconds is None else seconds <= STARTUP_TARGET_SECONDS,
                )
            )
    return out


SECTIONS: Final = (
    ("writes", "API-server writes and etcd bytes per task", writes_table),
    ("fairness", "API Priority and Fairness", fairness_table),
    ("startup", "Startup at scale", startup_table),
)
"""(results key, title, table) for :func:`bench.report.render`."""
