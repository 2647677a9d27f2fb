"""The verdict of a chaos run: pure checks of the ledger against the emulator's accounting.

The emulator is the ground truth: it knows every task it created (one per ``in.php`` that
reached it, whether or not its reply got back), the token it issued for each, which were
unsolvable, and the fate of every pingback (dropped, sent twice, delayed, sent to a dead
receiver). The ledger is the set of CaptchaTask objects. A run passes when every planned task
ended, in time, with exactly the emulator's answer for the provider task on record, no
CaptchaTask created more provider tasks than the at-most-once rule allows, no result was
recorded twice, the spool and the dead-letter queue are drained to exactly what the run
planted, and the components' metrics tell the same story as the ledger.

**Submitted twice** is counted per CaptchaTask from the emulator's own records (each provider
task's pingback URL names the CaptchaTask it was created for). The rule the operator keeps: a
CaptchaTask gets a further provider task only after an ``in.php`` whose reply it never saw *and*
whose pingback had not been acknowledged when the next one was created. A reply it never saw is
one the emulator lost (it marks them), or one of an ``in.php`` that reached the emulator during
an operator's kill window, just before its SIGKILL: that reply, or the ``Submitted`` write after
it, died with the process (an unresolved intent, resolved after the pingback grace). Any other
extra provider task is a violation. A reply-lost task's pingback that
arrives after the resubmission names a provider id other than the one on record and becomes a
``ProviderTaskMismatch`` dead letter (documented): those are counted apart, not as unplanted.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from captchatask import model
from captchatask.signing import PINGBACK_PREFIX

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

UNSOLVABLE_CODE: Final = "ERROR_CAPTCHA_UNSOLVABLE"
#: The operator's own failure code when a task's deadline passes without an outcome.
DEADLINE_EXCEEDED: Final = "DeadlineExceeded"
SOLVED: Final = str(model.Phase.SOLVED)
FAILED: Final = str(model.Phase.FAILED)
TERMINAL: Final = frozenset({SOLVED, FAILED})
#: Upper bounds of the operator's ``captchatask_poll_batch_size`` buckets (ids per request).
BATCH_BOUNDS: Final = (1, 2, 3, 5, 10, 20, 50, 100)
#: Event reasons that announce a task's result (one per task, or a result was recorded twice).
RESULT_EVENT_REASONS: Final = frozenset({"Solved", "Failed"})


@dataclass(frozen=True, slots=True)
class KillWindow:
    """From (last scrape - slack) to the SIGKILL: results recorded here are in no scrape."""

    start: float
    end: float

    def holds(self, at: float) -> bool:
        """Whether a ledger timestamp falls into the window."""
        return self.start <= at <= self.end


@dataclass(frozen=True, slots=True)
class LateTask:
    """A task of the ``apiserver-away-past-deadlines`` fault and its acknowledged pingback."""

    name: str
    provider_task_id: str
    #: When the receiver acknowledged the pingback (epoch seconds; it was spooled), or ``None``
    #: if it refused it (503, its spool at its bound) until the outage ended.
    acknowledged_at: float | None
    #: The task's deadline (creation + ``spec.deadlineSeconds``, epoch seconds).
    deadline: float
    #: When the task was created (epoch seconds).
    created: float

    @property
    def in_time(self) -> bool:
        """Whether the result was acknowledged before the deadline (so it must be the outcome)."""
        return self.acknowledged_at is not None and self.acknowledged_at <= self.deadline


@dataclass
class Snapshot:
    """Everything the verdict looks at, collected once the run settled."""

    planned: dict[str, str]
    tasks: list[dict[str, Any]]
    dead_letters: list[dict[str, Any]]
    events: list[dict[str, Any]]
    emulator_tasks: list[dict[str, Any]]
    emulator_summary: dict[str, Any]
    operator_metrics: list[Samples]
    sidecar_metrics: list[Samples]
    operator_kills: list[KillWindow]
    sidecar_kills: list[KillWindow]
    spool_bytes: int
    planted: list[str]
    #: The provider's ``callbackTimeoutSeconds`` (recovery delay is measured from it).
    callback_timeout_seconds: float = 0.0
    #: The receiver's spool bound in records (fault ``spool-full``; 0: none).
    spool_max_records: int = 0
    #: The planned ``res.php`` outages (fault ``res-502-burst``), seconds each.
    res_502_outages: list[float] = field(default_factory=list)
    late: list[LateTask] = field(default_factory=list)


@dataclass
class Verdict:
    """Figures and violations; the run passes when ``violations`` is empty."""

    figures: dict[str, Any] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """No violation."""
        return not self.violations

    def fail(self, what: str, items: Iterable[str], *, limit: int = 10) -> None:
        """Record a violation with up to ``limit`` examples."""
        listed = sorted(items)
        if listed:
            more = f" (+{len(listed) - limit} more)" if len(listed) > limit else ""
            self.violations.append(f"{what}: {len(listed)}: {', '.join(listed[:limit])}{more}")


def metric_sum(incarnations: Iterable[Samples], name: str, **labels: str) -> float:
    """Sum a series over every incarnation and every label set matching ``labels``."""
    total = 0.0
    for samples in incarnations:
        for (sample, sample_labels), value in samples.items():
            if sample == name and all(
                dict(sample_labels).get(key) == want for key, want in labels.items()
            ):
                total += value
    return total


def _time(value: object) -> float | None:
    parsed = model.parse_time(value)
    return parsed.timestamp() if parsed is not None else None


def _in_windows(at: float | None, windows: Iterable[KillWindow]) -> bool:
    return at is not None and any(window.holds(at) for window in windows)


def batch_sizes(incarnations: list[Samples]) -> dict[str, Any]:
    """The batch-size histogram (ids per ``res.php`` poll request) over every incarnation.

    Counts per size range (``"4-5"``: requests of 4 or 5 ids), from the cumulative buckets.
    """
    name = "captchatask_poll_batch_size"
    counts: dict[str, int] = {}
    below, low = 0, 1
    for bound in BATCH_BOUNDS:
        cumulative = int(metric_sum(incarnations, f"{name}_bucket", le=f"{float(bound)}"))
        label = str(bound) if low == bound else f"{low}-{bound}"
        counts[label] = cumulative - below
        below, low = cumulative, bound + 1
    total = int(metric_sum(incarnations, f"{name}_count"))
    counts[f">{BATCH_BOUNDS[-1]}"] = total - below
    ids = metric_sum(incarnations, f"{name}_sum")
    return {
        "requests": total,
        "ids": int(ids),
        "mean": round(ids / total, 2) if total else None,
        "histogram": counts,
    }


#: The recovery budget: a poll recovers a ready result within this long after the timeout.
RECOVERY_BUDGET_SECONDS: Final = 1.0


def recovery_delays(
    tasks: Iterable[Mapping[str, Any]],
    emulator: Mapping[str, Mapping[str, Any]],
    callback_timeout: float,
) -> list[tuple[float, float]]:
    """(due, delay) of every task the operator recovered; due = submittedAt + callback timeout.

    The delay runs from the callback timeout to ``finishedAt``. Only tasks solved by poll whose
    answer the provider held by the callback timeout count: a task still unsolved then is
    polled again after ``intervalSeconds`` by design, which says nothing about batching.
    Negative: recovered before the timeout (a poll carried early in a batch).
    """
    found: list[tuple[float, float]] = []
    for body in tasks:
        status = body.get("status", {})
        if status.get("phase") != SOLVED or status.get("deliveredBy") != str(
            model.DeliveredBy.POLL
        ):
            continue
        record = emulator.get(str(status.get("providerTaskId", "")))
        submitted, finished = _time(status.get("submittedAt")), _time(status.get("finishedAt"))
        if record is None or submitted is None or finished is None:
            continue
        due = submitted + callback_timeout
        solved_at = record.get("finished_at")
        if solved_at is not None and float(solved_at) <= due:
            found.append((due, finished - due))
    return found


def recovery_figures(found: list[tuple[float, float]], *, start: float | None) -> dict[str, Any]:
    """Quantiles of the recovery delay, the share within budget, and when the slow ones fell due.

    Under chaos the slow recoveries are the tasks that fell due while the API server was away
    or the operator restarted; ``over_budget_due`` (seconds after the first task was created)
    lets the reader hold them against the fault timeline.
    """
    delays = [delay for _due, delay in found]
    slow = sorted(due for due, delay in found if delay > RECOVERY_BUDGET_SECONDS)
    figures: dict[str, Any] = _quantiles(delays) | {"samples": len(delays)}
    if delays:
        figures["within_budget"] = len(delays) - len(slow)
    if slow and start is not None:
        figures["over_budget_due"] = [round(slow[0] - start, 1), round(slow[-1] - start, 1)]
    return figures


def _pingback_owner(record: Mapping[str, Any]) -> tuple[str, str] | None:
    """(CaptchaTask name, uid) named by a provider task's signed pingback URL, if it has one."""
    url = record.get("pingback", {}).get("url")
    if not url or PINGBACK_PREFIX not in str(url):
        return None
    parts = str(url).split(PINGBACK_PREFIX, 1)[1].strip("/").split("/")
    return (parts[1], parts[2]) if len(parts) >= 3 else None  # namespace, name, uid, token


@dataclass
class Submissions:
    """Provider tasks per CaptchaTask, from the emulator's records."""

    per_task: dict[str, list[Mapping[str, Any]]] = field(default_factory=dict)
    #: Extra provider tasks the at-most-once rule allows (reply lost or unseen, pingback not in).
    allowed_extra: list[str] = field(default_factory=list)
    #: Extra provider tasks it does not allow.
    twice: list[str] = field(default_factory=list)
    #: Provider ids of reply-lost (or unseen) tasks that were superseded by a resubmission.
    abandoned: set[str] = field(default_factory=set)


def count_submissions(
    emulator_tasks: Iterable[Mapping[str, Any]],
    uids: Mapping[str, str],
    operator_kills: Iterable[KillWindow] = (),
) -> Submissions:
    """Group provider tasks by the CaptchaTask their URL names; judge every extra one.

    ``operator_kills``: a provider task created in one of these windows may have had its reply
    die with the operator (see the module docs).
    """
    kills = list(operator_kills)
    found = Submissions()
    for record in emulator_tasks:
        owner = _pingback_owner(record)
        if owner is None or uids.get(owner[0]) != owner[1]:
            continue  # planted pingbacks, or a URL for no task instance of this run
        found.per_task.setdefault(owner[0], []).append(record)
    for name, records in found.per_task.items():
        ordered = sorted(records, key=lambda r: float(r.get("created_at") or 0.0))
        for earlier, later in itertools.pairwise(ordered):
            delivered = earlier.get("pingback", {}).get("delivered_at")
            unseen = earlier.get("in_reply_lost") or _in_windows(
                float(earlier.get("created_at") or 0.0), kills
            )
            lost_in_time = unseen and (
                delivered is None or float(delivered) >= float(later.get("created_at") or 0.0)
            )
            label = f"{name}({later.get('id')})"
            if lost_in_time:
                found.allowed_extra.append(label)
                found.abandoned.add(str(earlier.get("id")))
            else:
                found.twice.append(label)
    return found


def _pingback_fates(emulator_tasks: Iterable[Mapping[str, Any]]) -> Counter[str]:
    fates: Counter[str] = Counter()
    for record in emulator_tasks:
        pingback = record.get("pingback", {})
        fates[str(pingback.get("outcome"))] += 1
        if int(pingback.get("copies", 0)) > 1:
            fates["duplicated"] += 1
        attempts = pingback.get("attempts", [])
        if any(a.get("status") is None for a in attempts):
            fates["hit_dead_receiver"] += 1
    return fates


def evaluate(snap: Snapshot) -> Verdict:
    """Check the snapshot; return the figures and every violation found."""
    verdict = Verdict()
    emulator = {str(record["id"]): record for record in snap.emulator_tasks}
    tasks = {str(body["metadata"]["name"]): body for body in snap.tasks}
    late = {task.name: task for task in snap.late}
    letters_by_task: dict[str, list[dict[str, Any]]] = {}
    for letter in snap.dead_letters:
        meant_for = str(letter.get("spec", {}).get("taskRef", {}).get("name"))
        letters_by_task.setdefault(meant_for, []).append(letter)

    unfinished: list[str] = []
    missing: list[str] = []
    mixups: list[str] = []
    wrong_failures: list[str] = []
    past_deadline: list[str] = []
    unsolvable_solved: list[str] = []
    delivered: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    by_type: Counter[str] = Counter()
    referenced: Counter[str] = Counter()
    poll_times: list[float | None] = []
    pingback_times: list[float | None] = []
    solve_seconds: list[float] = []

    for name, task_type in snap.planned.items():
        by_type[task_type] += 1
        body = tasks.get(name)
        if body is None:
            missing.append(name)
            continue
        status = body.get("status", {})
        phase = status.get("phase")
        if phase not in TERMINAL:
            unfinished.append(f"{name}({phase})")
            continue
        provider_id = str(status.get("providerTaskId", ""))
        if provider_id:
            referenced[provider_id] += 1
        record = emulator.get(provider_id)
        created = _time(body["metadata"].get("creationTimestamp"))
        finished = _time(status.get("finishedAt"))
        deadline = int(body["spec"].get("deadlineSeconds", model.DEFAULT_DEADLINE_SECONDS))
        if name in late:
            pass  # its deadline passed while the API server was away: nobody could write then
        elif created is None or finished is None or finished > created + deadline + 1.0:
            past_deadline.append(name)
        elif phase == SOLVED:
            solve_seconds.append(finished - created)
        by = str(status.get("deliveredBy", "none"))
        delivered[by] += 1
        if by == str(model.DeliveredBy.POLL):
            poll_times.append(finished)
        elif by == str(model.DeliveredBy.PINGBACK):
            pingback_times.append(finished)
        if phase == SOLVED:
            token = status.get("solution", {}).get("token")
            if record is None or record.get("token") != token or record.get("state") != "solved":
                mixups.append(name)
            continue
        code = str(status.get("failure", {}).get("code", ""))
        failures[code] += 1
        if (
            name in late
            and not late[name].in_time
            and _kept_as_letter(letters_by_task.get(name, []), record)
        ):
            continue  # acknowledged after its deadline: a TaskFailed letter keeps the answer
        if name in late and late[name].acknowledged_at is None and code == DEADLINE_EXCEEDED:
            continue  # refused while the spool was full: never acknowledged, the deadline ends it
        if record is None or record.get("state") != "unsolvable" or code != UNSOLVABLE_CODE:
            wrong_failures.append(f"{name}({code})")

    for provider_id, record in emulator.items():
        if record.get("state") == "unsolvable" and provider_id in referenced:
            owner = next(
                (
                    n
                    for n, b in tasks.items()
                    if b.get("status", {}).get("providerTaskId") == provider_id
                ),
                None,
            )
            if owner and tasks[owner]["status"].get("phase") == SOLVED:
                unsolvable_solved.append(owner)
    submissions = count_submissions(
        snap.emulator_tasks,
        {name: str(body["metadata"].get("uid", "")) for name, body in tasks.items()},
        snap.operator_kills,
    )
    owned = {str(r.get("id")) for records in submissions.per_task.values() for r in records}
    # Provider tasks no CaptchaTask's URL names (poll-only submissions) fall back to the ledger.
    orphans = [pid for pid in emulator if pid not in referenced and pid not in owned]
    shared = [pid for pid, count in referenced.items() if count > 1]
    extra_tasks = [name for name in tasks if name not in snap.planned]

    # A result announced twice by Events means it was recorded twice.
    results_announced: Counter[str] = Counter()
    for event in snap.events:
        involved = event.get("involvedObject", {})
        if involved.get("kind") == model.TASK_KIND and event.get("reason") in RESULT_EVENT_REASONS:
            results_announced[str(involved.get("name"))] += int(event.get("count", 1) or 1)
    recorded_twice = [name for name, count in results_announced.items() if count > 1]

    letters = {
        str(letter.get("spec", {}).get("taskRef", {}).get("name")): letter
        for letter in snap.dead_letters
    }
    abandoned_letters = [
        name
        for name, letter in letters.items()
        if letter.get("spec", {}).get("reason")
        == str(model.DeadLetterReason.PROVIDER_TASK_MISMATCH)
        and str(letter.get("spec", {}).get("providerTaskId")) in submissions.abandoned
    ]
    unexpected_letters = [
        f"{name}({letter['spec'].get('reason')})"
        for name, letter in letters.items()
        if name not in snap.planted
        and name not in abandoned_letters
        and not (
            name in late and _kept_as_letter([letter], emulator.get(late[name].provider_task_id))
        )
    ]
    missing_letters = [name for name in snap.planted if name not in letters]

    # -- metrics against the ledger ------------------------------------------------------------
    op, sc = snap.operator_metrics, snap.sidecar_metrics
    recoveries = metric_sum(op, "captchatask_fallback_recoveries_total")
    poll_solved = sum(
        1
        for body in tasks.values()
        if body.get("status", {}).get("phase") == SOLVED
        and body["status"].get("deliveredBy") == str(model.DeliveredBy.POLL)
    )
    poll_solved_in_gaps = sum(
        1
        for body in tasks.values()
        if body.get("status", {}).get("phase") == SOLVED
        and body["status"].get("deliveredBy") == str(model.DeliveredBy.POLL)
        and _in_windows(_time(body["status"].get("finishedAt")), snap.operator_kills)
    )
    unsolvable_metric = metric_sum(op, "captchatask_permanent_failures_total", code=UNSOLVABLE_CODE)
    poll_failed = [
        body
        for body in tasks.values()
        if body.get("status", {}).get("phase") == FAILED
        and body["status"].get("deliveredBy") == str(model.DeliveredBy.POLL)
    ]
    poll_failed_in_gaps = sum(
        1
        for body in poll_failed
        if _in_windows(_time(body["status"].get("finishedAt")), snap.operator_kills)
    )
    sc_recorded = metric_sum(sc, "captchatask_pingbacks_total", outcome="recorded") + metric_sum(
        sc, "captchatask_spool_replays_total", outcome="recorded"
    )
    # Ledger writes whose fate the receiver could not know: the request timed out or the
    # connection broke, so it spooled the result, yet the API server may have applied it. The
    # replay then finds it recorded and counts a duplicate, not a recording: each such write can
    # lower the "recorded" count by one (and never raise it).
    in_doubt = (
        metric_sum(sc, "captchatask_ledger_write_errors_total", reason="timeout")
        + metric_sum(sc, "captchatask_ledger_write_errors_total", reason="unavailable")
        + metric_sum(sc, "captchatask_spool_replays_total", outcome="retry")
    )
    by_pingback = delivered[str(model.DeliveredBy.PINGBACK)]
    pingback_in_gaps = sum(1 for at in pingback_times if _in_windows(at, snap.sidecar_kills))
    spool_depth_final = metric_sum(sc[-1:], "captchatask_pingback_spool_depth")

    totals = snap.emulator_summary.get("totals", {})
    planned = len(snap.planned)
    fates = _pingback_fates(snap.emulator_tasks)
    in_calls = int(totals.get("in_requests", 0))
    recovery = recovery_delays(tasks.values(), emulator, snap.callback_timeout_seconds)
    created_at = [_time(body["metadata"].get("creationTimestamp")) for body in tasks.values()]
    first_created = min((at for at in created_at if at is not None), default=None)
    res_calls = int(totals.get("res_requests", 0))

    verdict.figures = {
        "tasks": planned,
        "tasks_by_type": dict(sorted(by_type.items())),
        "faults": {
            "pingbacks_dropped": fates.get("dropped", 0),
            "pingbacks_duplicated": fates.get("duplicated", 0),
            "pingbacks_delayed_past_threshold": int(totals.get("pingbacks_late", 0)),
            "pingbacks_to_a_dead_receiver": fates.get("hit_dead_receiver", 0),
            "unsolvable": int(totals.get("tasks_unsolvable", 0)),
            "res_php_html_502": int(totals.get("html_502_injected", 0)),
            "res_php_502_outage_seconds": list(snap.res_502_outages),
            "sidecar_sigkills": len(snap.sidecar_kills),
            "operator_sigkills": len(snap.operator_kills),
            "planted_dead_letters": len(snap.planted),
            "in_php_replies_lost": int(totals.get("in_replies_lost", 0)),
            "spool_bound_records": snap.spool_max_records,
            "spool_full_503s": int(
                metric_sum(sc, "captchatask_pingback_unavailable_total", reason="spool_full")
            ),
        },
        "delivered_by": {
            "pingback": by_pingback,
            "poll": delivered[str(model.DeliveredBy.POLL)],
            "deadLetter": delivered[str(model.DeliveredBy.DEAD_LETTER)],
        },
        "solved": sum(1 for b in tasks.values() if b.get("status", {}).get("phase") == SOLVED),
        "failed_by_code": dict(sorted(failures.items())),
        "lost": len(unfinished) + len(missing),
        "mixed_up": len(mixups),
        # A result recorded twice shows as more recordings than ledger entries for that path,
        # as a provider task claimed twice, or as a result announced twice by Events.
        "duplicates_recorded": len(recorded_twice)
        + len(shared)
        + int(max(0.0, sc_recorded - by_pingback))
        + int(max(0.0, recoveries - poll_solved)),
        "submitted_twice": len(submissions.twice) + len(orphans),
        # Allowed by the rule: the earlier in.php reply was lost and no pingback had come.
        "resubmitted_after_lost_reply": len(submissions.allowed_extra),
        "provider_tasks_per_task_max": max(
            (len(records) for records in submissions.per_task.values()), default=0
        ),
        "past_deadline": len(past_deadline),
        "dead_letters": len(letters) - len(abandoned_letters),
        "dead_letters_from_abandoned_submissions": len(abandoned_letters),
        "late_outage": _late_figures(snap, tasks, letters_by_task),
        "spool_bytes_left": snap.spool_bytes,
        "spool_depth_left": spool_depth_final,
        "provider_calls": {
            "in_php": in_calls,
            "res_php": res_calls,
            "res_php_bulk": int(totals.get("res_bulk_requests", 0)),
            "per_task": round((in_calls + res_calls) / planned, 3) if planned else 0.0,
        },
        "poll_batch_sizes": batch_sizes(op),
        # The operator's own count of solver requests by endpoint (inline retries included):
        # what the res.php calls were spent on (polls, bulk polls, account checks).
        "operator_requests": {
            endpoint: int(metric_sum(op, "captchatask_provider_requests_total", endpoint=endpoint))
            for endpoint in ("submit", "get", "get_bulk", "getbalance", "threadsinfo")
        },
        "recovery_after_callback_timeout": recovery_figures(recovery, start=first_created),
        "sidecar_pingbacks": {
            outcome: int(metric_sum(sc, "captchatask_pingbacks_total", outcome=outcome))
            for outcome in ("recorded", "duplicate", "late", "rejected", "spooled", "dead_lettered")
        },
        "sidecar_spool_replays": {
            outcome: int(metric_sum(sc, "captchatask_spool_replays_total", outcome=outcome))
            for outcome in ("recorded", "duplicate", "late", "dead_lettered", "retry")
        },
        "metrics_vs_ledger": {
            "operator_recoveries_metric": int(recoveries),
            "ledger_solved_by_poll": poll_solved,
            "ledger_solved_by_poll_in_kill_gaps": poll_solved_in_gaps,
            "operator_unsolvable_failures_metric": int(unsolvable_metric),
            "ledger_failed_by_poll": len(poll_failed),
            "sidecar_recorded_metric": int(sc_recorded),
            "ledger_by_pingback": by_pingback,
            "ledger_by_pingback_in_kill_gaps": pingback_in_gaps,
            "sidecar_writes_in_doubt": int(in_doubt),
        },
        "solve_seconds": _quantiles(solve_seconds),
        "event_reasons": dict(sorted(Counter(str(e.get("reason")) for e in snap.events).items())),
        "submission_attempts": dict(
            sorted(
                Counter(
                    str(b.get("status", {}).get("submission", {}).get("attempts"))
                    for b in tasks.values()
                ).items()
            )
        ),
    }

    verdict.fail("tasks never created", missing)
    verdict.fail("tasks not terminal (lost)", unfinished)
    verdict.fail("tasks not planned by the run", extra_tasks)
    verdict.fail("solved tasks whose token is not the emulator's (mix-up)", mixups)
    verdict.fail("failed tasks that the emulator did not fail that way", wrong_failures)
    verdict.fail("unsolvable tasks recorded as Solved", unsolvable_solved)
    verdict.fail("tasks finished past their deadline", past_deadline)
    verdict.fail("provider tasks created for no task (submitted twice)", orphans)
    verdict.fail(
        "further provider tasks for one task without a lost in.php reply (submitted twice)",
        submissions.twice,
    )
    verdict.fail("provider tasks claimed by several tasks", shared)
    verdict.fail("tasks whose result was announced more than once", recorded_twice)
    verdict.fail("dead letters nobody planted", unexpected_letters)
    verdict.fail("planted dead letters that never appeared", missing_letters)
    if snap.spool_bytes:
        verdict.violations.append(f"spool not drained: {snap.spool_bytes} bytes left")
    if spool_depth_final:
        verdict.violations.append(f"spool depth metric not 0: {spool_depth_final}")
    if not poll_solved - poll_solved_in_gaps <= recoveries <= poll_solved:
        verdict.violations.append(
            f"operator recoveries metric {recoveries:.0f} disagrees with the ledger: "
            f"{poll_solved} solved by poll ({poll_solved_in_gaps} inside kill gaps)"
        )
    if not len(poll_failed) - poll_failed_in_gaps <= unsolvable_metric <= len(poll_failed):
        verdict.violations.append(
            f"operator permanent-failure metric {unsolvable_metric:.0f} disagrees with the "
            f"ledger: {len(poll_failed)} failed by poll ({poll_failed_in_gaps} inside kill gaps)"
        )
    if not by_pingback - pingback_in_gaps - in_doubt <= sc_recorded <= by_pingback:
        verdict.violations.append(
            f"sidecar recorded metric {sc_recorded:.0f} disagrees with the ledger: "
            f"{by_pingback} delivered by pingback ({pingback_in_gaps} inside kill gaps, "
            f"{in_doubt:.0f} writes in doubt)"
        )
    return verdict


def _kept_as_letter(letters: Iterable[Mapping[str, Any]], record: Mapping[str, Any] | None) -> bool:
    """Whether a ``TaskFailed`` letter holds exactly the emulator's answer for the task."""
    if record is None:
        return False
    answer = record.get("token") if record.get("state") == "solved" else UNSOLVABLE_CODE
    return any(
        letter.get("spec", {}).get("reason") == str(model.DeadLetterReason.TASK_FAILED)
        and letter.get("spec", {}).get("payload", {}).get("code") == answer
        for letter in letters
    )


def _late_figures(
    snap: Snapshot,
    tasks: Mapping[str, Mapping[str, Any]],
    letters_by_task: Mapping[str, list[dict[str, Any]]],
) -> dict[str, float]:
    """What became of the tasks whose deadlines passed while the API server was away."""
    # From the ledger, not from Events: Events are posted best effort (a bounded queue).
    replaced = {
        name
        for name, body in tasks.items()
        if any(
            condition.get("type") == "Complete" and "; replaces " in str(condition.get("message"))
            for condition in body.get("status", {}).get("conditions") or []
        )
    }
    phases = Counter(
        str(tasks.get(task.name, {}).get("status", {}).get("phase")) for task in snap.late
    )
    return {
        "tasks": len(snap.late),
        "seconds_to_acknowledge_max": round(
            max(
                (
                    task.acknowledged_at - task.created
                    for task in snap.late
                    if task.acknowledged_at is not None
                ),
                default=0.0,
            ),
            1,
        ),
        "refused_while_spool_full": sum(1 for task in snap.late if task.acknowledged_at is None),
        "acknowledged_before_deadline": sum(1 for task in snap.late if task.in_time),
        "solved": phases[SOLVED],
        "failed": phases[FAILED],
        "failures_replaced": sum(1 for task in snap.late if task.name in replaced),
        "task_failed_letters": sum(
            1
            for task in snap.late
            for letter in letters_by_task.get(task.name, [])
            if letter.get("spec", {}).get("reason") == str(model.DeadLetterReason.TASK_FAILED)
        ),
    }


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(fraction: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 2)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": round(ordered[-1], 2)}


def utc(at: float) -> str:
    """Format an epoch timestamp for the report."""
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%H:%M:%S.%f")[:-3]
