"""The printed table and the JSON figures of a chaos run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def table(figures: dict[str, Any], *, dialect: str = "captchaai") -> str:
    """The human table (the documentation's Guarantees page is generated from it)."""
    f = figures
    faults = f["faults"]
    delivered = f["delivered_by"]
    calls = f["provider_calls"]
    drain = f["timings"]
    rows = [
        ("provider dialect", dialect),
        ("tasks", f"{f['tasks']} ({', '.join(f'{k} {v}' for k, v in f['tasks_by_type'].items())})"),
        ("faults: pingbacks dropped", faults["pingbacks_dropped"]),
        ("faults: pingbacks duplicated", faults["pingbacks_duplicated"]),
        (
            "faults: pingbacks delayed past the fallback threshold",
            faults["pingbacks_delayed_past_threshold"],
        ),
        (
            "faults: pingbacks sent while the sidecar was dead",
            faults["pingbacks_to_a_dead_receiver"],
        ),
        ("faults: unsolvable tasks", faults["unsolvable"]),
        ("faults: HTML 502 on res.php", _outages(faults)),
        ("faults: in.php replies lost (task created)", faults.get("in_php_replies_lost", "n/a")),
        ("faults: kube-apiserver stopped", f"{drain['apiserver_outage_seconds']:.1f} s"),
        ("faults: sidecar SIGKILL + restart", faults["sidecar_sigkills"]),
        ("faults: operator SIGKILL + restart", faults["operator_sigkills"]),
        ("faults: planted dead letters", faults["planted_dead_letters"]),
        ("faults: spool bound reached (503s answered)", _spool_full(f)),
        ("faults: kube-apiserver away past task deadlines", _late(f, drain)),
        (
            "solved / failed",
            f"{f['solved']} / {sum(f['failed_by_code'].values())} {f['failed_by_code']}",
        ),
        (
            "delivered by pingback / poll / dead letter",
            f"{delivered['pingback']} / {delivered['poll']} / {delivered['deadLetter']}",
        ),
        ("LOST (must be 0)", f["lost"]),
        ("DUPLICATES RECORDED (must be 0)", f["duplicates_recorded"]),
        ("mixed-up tokens (must be 0)", f["mixed_up"]),
        ("submitted twice (must be 0)", f["submitted_twice"]),
        (
            "resubmitted after a lost in.php reply and no pingback",
            f.get("resubmitted_after_lost_reply", "n/a"),
        ),
        ("finished past deadline (must be 0)", f["past_deadline"]),
        ("dead letters left (= planted)", f["dead_letters"]),
        (
            "dead letters from abandoned submissions",
            f.get("dead_letters_from_abandoned_submissions", "n/a"),
        ),
        ("spool left (bytes / depth)", f"{f['spool_bytes_left']} / {f['spool_depth_left']:.0f}"),
        ("secret leaks (must be 0)", f["secret_leaks"]),
        (
            "provider calls per task (in.php + res.php)",
            f"{calls['per_task']} ({calls['in_php']} in.php, {calls['res_php']} res.php, "
            f"{calls['res_php_bulk']} bulk)",
        ),
        ("poll batch sizes (ids per res.php poll: requests)", _batches(f.get("poll_batch_sizes"))),
        ("operator's solver requests by endpoint", f.get("operator_requests", "n/a")),
        (
            "recovery after the callback timeout (p50 / p99 / max, n)",
            _recovery(f.get("recovery_after_callback_timeout")),
        ),
        ("sidecar pingback outcomes", f["sidecar_pingbacks"]),
        ("sidecar spool replays", f["sidecar_spool_replays"]),
        ("metrics vs ledger", f["metrics_vs_ledger"]),
        ("max spool depth", f"{drain['max_spool_depth']:.0f}"),
        ("spool drained (from API server restart)", _seconds(drain["spool_drain_seconds"])),
        ("time to drain (last task created -> all settled)", _seconds(drain["settle_seconds"])),
        ("solve time (created -> Solved)", f["solve_seconds"]),
        ("wall time", _seconds(drain["wall_seconds"])),
    ]
    width = max(len(str(label)) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _batches(sizes: dict[str, Any] | None) -> str:
    if sizes is None:
        return "n/a (not measured by this run)"
    ranges = sorted(sizes["histogram"].items(), key=lambda item: _low(item[0]))
    histogram = ", ".join(f"{size}: {n}" for size, n in ranges if n)
    return f"{histogram or 'none'} (mean {sizes['mean']})"


def _low(size: str) -> int:
    """The lower bound of a size range label (``"4-5"``, ``"2"``, ``">100"``), for ordering."""
    return int(size.lstrip(">").split("-")[0]) + (1 if size.startswith(">") else 0)


def _recovery(delays: dict[str, Any] | None) -> str:
    if not delays or not delays.get("samples"):
        return "n/a"
    text = (
        f"{delays['p50']:.2f} / {delays['p99']:.2f} / {delays['max']:.2f} s, {delays['samples']}"
        f" ({delays.get('within_budget', 0)} within 1 s"
    )
    slow = delays.get("over_budget_due")
    if slow:
        text += f"; the others fell due t+{slow[0]:.0f}..{slow[1]:.0f} s"
    return text + ")"


def _spool_full(figures: dict[str, Any]) -> str:
    """The ``spool-full`` row (n/a for a run without a bound, or recorded before it existed)."""
    faults = figures["faults"]
    bound = faults.get("spool_bound_records")
    if not bound:
        return "n/a"
    unready = figures["timings"].get("spool_full_unready")
    state = {True: ", unready", False: ", still ready"}.get(unready, "")
    return f"{faults['spool_full_503s']} (bound {bound} records{state})"


def _late(figures: dict[str, Any], timings: dict[str, Any]) -> str:
    late = figures.get("late_outage") or {}
    if not late.get("tasks"):
        return "not in this profile"
    return (
        f"{timings.get('late_outage_seconds', 0.0):.1f} s; {late['tasks']} tasks, "
        f"{late['acknowledged_before_deadline']} acknowledged in time "
        f"(within {late['seconds_to_acknowledge_max']} s) -> {late['solved']} solved "
        f"({late['failures_replaced']} replacing DeadlineExceeded), {late['failed']} failed, "
        f"{late['task_failed_letters']} TaskFailed letters"
    )


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write the figures (sorted keys, stable diffs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _outages(faults: dict[str, Any]) -> str:
    """HTML 502 pages served, and the timed outages that served them."""
    pages = faults["res_php_html_502"]
    outages = faults.get("res_php_502_outage_seconds")
    if not outages:
        return f"{pages}"
    spans = sorted({f"{seconds:g}" for seconds in outages})
    each = f"{spans[0]} s each" if len(spans) == 1 else f"{', '.join(spans)} s"
    return f"{pages} (every res.php request during {len(outages)} timed outages, {each})"
