"""The operator's Prometheus series, built against an injectable registry.

Production passes ``prometheus_client.REGISTRY``; tests pass a fresh ``CollectorRegistry()`` and
read values with ``get_sample_value``. Every label takes values from a small fixed set (phases,
outcomes, endpoints, known codes) or the provider's name (a handful per cluster); never a task
name or id. Series for a provider are pre-created when the provider is first seen, so rates
start from 0 instead of appearing on the first event.

Whose object: every series about a task, provider or dead letter carries the object's
namespace in the label ``namespace``, the kube-state-metrics convention. A cluster-wide operator
serves many namespaces, and two teams may both name their provider ``default``: without the
namespace their series would be one series. The label is exposed as ``namespace`` (not a
private name) so that rules, dashboards and joins with ``kube_*`` series filter by it the usual
way; the chart's ServiceMonitor scrapes with ``honorLabels: true`` (as kube-state-metrics'
does) so the object's namespace wins over the target's ``namespace`` (the operator pod's).
Scraped without honor_labels, Prometheus renames it to ``exported_namespace``: that is the
accident this choice avoids, and the monitoring docs say so. Series about the operator itself
(``captchatask_build_info``, ``captchatask_operator_active``) have no such label and so get
the pod's namespace from the target. Cardinality stays bounded: namespaces x providers, both
counted in handfuls; never a task name.

The dead-letter series have no provider label (a letter belongs to a task that may no longer
exist): ``captchatask_dead_letters{namespace,reason,phase}`` is recomputed from the operator's
index of the cluster's objects on every scrape, with every reason x phase pre-created for each
namespace that has a provider or a letter, so the DLQ depth is right immediately after a
restart; ``captchatask_dead_letter_requeues_total{namespace,outcome}`` counts what each requeue
attempt did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from captchatask.buildinfo import register_build_info
from captchatask.deadletters import RequeueOutcome
from captchatask.events import ROUTINE_REASONS
from captchatask.model import DeadLetterPhase, DeadLetterReason, DeliveredBy, Phase
from captchatask.provider import codes
from captchatask.provider.client import ENDPOINTS, OUTCOMES, RequestObserver
from captchatask_operator.policy import FailureCode, PollOutcome

#: The object's namespace (see the module docstring for why this name).
NAMESPACE_LABEL: Final = "namespace"
NS: Final = NAMESPACE_LABEL

SUBMISSION_OUTCOMES: Final = (
    "submitted",
    "retry_later",
    "config_error",
    "task_failed",
    "ambiguous",
    "resubmitted",
)
POLL_OUTCOMES: Final = tuple(str(outcome) for outcome in PollOutcome)
#: Failure codes with their own series; any other code is counted as "other" (bounded labels).
FAILURE_CODES: Final = (
    *(str(code) for code in FailureCode),
    "ERROR_CAPTCHA_UNSOLVABLE",
    "ERROR_BAD_DUPLICATES",
    "ERROR_TOKEN_EXPIRED",
    "ERROR_BAD_PROXY",
)
OTHER_CODE: Final = "other"
#: Solve times span a fast v3 token (seconds) to a slow v2 with fallback polls (minutes).
SOLVE_BUCKETS: Final = (1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200)
REQUEST_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: The operator's supervised background loops (:mod:`captchatask.supervise`).
BACKGROUND_LOOPS: Final = ("timer", "event-poster")
#: The ``loop`` label of a one-shot background action (a poll batch, a check) that crashed.
ACTION_LOOP: Final = "action"
#: Ids per ``res.php`` poll request: 1 without bulk ``ids=``, up to the client's ``bulk_max_ids``
#: (100 by default) with it; the low buckets are fine because low rates make small batches.
BATCH_BUCKETS: Final = (1, 2, 3, 5, 10, 20, 50, 100)


def failure_label(code: str) -> str:
    """Map a failure code to a bounded label value."""
    if code in FAILURE_CODES or code in codes.known_codes():
        return code
    return OTHER_CODE


class Metrics:
    """Every series the operator exports, on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.build_info = register_build_info(registry)
        self.active = Gauge(
            "captchatask_operator_active",
            "1 on the replica that is reconciling (the active peer), 0 on a standby.",
            registry=registry,
        )
        self.tasks = Gauge(
            "captchatask_tasks",
            "CaptchaTasks the operator watches, by namespace, provider and phase.",
            [NS, "provider", "phase"],
            registry=registry,
        )
        self.submissions = Counter(
            "captchatask_submissions_total",
            "in.php submissions by outcome (ambiguous: the request may have reached the"
            " provider, so a task may exist there; the task waits for its pingback).",
            [NS, "provider", "outcome"],
            registry=registry,
        )
        self.fallback_polls = Counter(
            "captchatask_fallback_polls_total",
            "Per-task fallback polls by what they found.",
            [NS, "provider", "outcome"],
            registry=registry,
        )
        self.fallback_recoveries = Counter(
            "captchatask_fallback_recoveries_total",
            "Results that reached the ledger by fallback poll because no pingback came.",
            [NS, "provider"],
            registry=registry,
        )
        self.permanent_failures = Counter(
            "captchatask_permanent_failures_total",
            "Tasks the operator failed, by failure code.",
            [NS, "provider", "code"],
            registry=registry,
        )
        self.provider_requests = Counter(
            "captchatask_provider_requests_total",
            "HTTP exchanges with the solver API.",
            [NS, "provider", "endpoint", "outcome"],
            registry=registry,
        )
        self.provider_request_duration = Histogram(
            "captchatask_provider_request_duration_seconds",
            "Duration of one HTTP exchange with the solver API.",
            [NS, "provider", "endpoint"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.poll_batch_size = Histogram(
            "captchatask_poll_batch_size",
            "Task ids per res.php poll request (always 1 without bulk ids=): calls per poll.",
            [NS, "provider"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.solve_duration = Histogram(
            "captchatask_task_solve_duration_seconds",
            "From task creation to Solved, by delivery path (observed on the transition).",
            [NS, "provider", "delivered_by"],
            buckets=SOLVE_BUCKETS,
            registry=registry,
        )
        self.provider_ready = Gauge(
            "captchatask_provider_ready",
            "1 if the provider's Ready condition is True, else 0.",
            [NS, "provider"],
            registry=registry,
        )
        self.tasks_past_deadline = Gauge(
            "captchatask_tasks_past_deadline",
            "Unfinished CaptchaTasks past their deadline (the operator should have failed them:"
            " its scheduler is stuck, standby or cannot write), recomputed on scrape.",
            [NS, "provider"],
            registry=registry,
        )
        self.dead_letters = Gauge(
            "captchatask_dead_letters",
            "CaptchaDeadLetters by reason and phase (the DLQ depth), recomputed from the cluster.",
            [NS, "reason", "phase"],
            registry=registry,
        )
        self.dead_letter_requeues = Counter(
            "captchatask_dead_letter_requeues_total",
            "Dead-letter requeue attempts by outcome.",
            [NS, "outcome"],
            registry=registry,
        )
        self.loop_crashes = Counter(
            "captchatask_operator_background_loop_crashes_total",
            "Crashes of a supervised background loop (the timer, the event poster; each followed"
            " by a restart with back-off) or of a one-shot background action.",
            ["loop"],
            registry=registry,
        )
        self.loop_healthy = Gauge(
            "captchatask_operator_background_loop_healthy",
            "0 while a supervised background loop keeps crashing (readiness follows it), else 1.",
            ["loop"],
            registry=registry,
        )
        for loop in BACKGROUND_LOOPS:
            self.loop_crashes.labels(loop)
            self.loop_healthy.labels(loop).set(1)
        self.loop_crashes.labels(ACTION_LOOP)
        self.events_skipped = Counter(
            "captchatask_events_skipped_total",
            "Routine task Events (Submitted, Solved) counted instead of posted (--routine-events).",
            ["reason"],
            registry=registry,
        )
        for reason in sorted(ROUTINE_REASONS):
            self.events_skipped.labels(reason)
        self.dead_letters_unwritten = Gauge(
            "captchatask_dead_letters_unwritten",
            "Poll results for vanished tasks held in memory until their dead letter can be "
            "written (retried with back-off; an operator restart loses them).",
            [NS],
            registry=registry,
        )
        self.active.set(0)
        self._known: set[tuple[str, str]] = set()
        self._namespaces: set[str] = set()

    def track_loop(self, loop: str, *, healthy: Callable[[], bool]) -> Callable[[object], None]:
        """Export one supervised loop's health (read at scrape time); return its crash counter.

        The returned callable is the supervisor's ``on_crash``.
        """
        self.loop_healthy.labels(loop).set_function(lambda: 1.0 if healthy() else 0.0)
        crashes = self.loop_crashes.labels(loop)
        return lambda _exc: crashes.inc()

    def ensure_namespace(self, namespace: str) -> None:
        """Pre-create the dead-letter series of a namespace at 0 (idempotent)."""
        if namespace in self._namespaces:
            return
        self._namespaces.add(namespace)
        for reason in DeadLetterReason:
            for phase in DeadLetterPhase:
                self.dead_letters.labels(namespace, str(reason), str(phase))
        for outcome in RequeueOutcome:
            self.dead_letter_requeues.labels(namespace, str(outcome))
        self.dead_letters_unwritten.labels(namespace).set(0)

    def ensure_provider(self, namespace: str, provider: str) -> None:
        """Pre-create every series of a provider at 0 (idempotent)."""
        key = (namespace, provider)
        if key in self._known:
            return
        self._known.add(key)
        self.ensure_namespace(namespace)
        for phase in Phase:
            self.tasks.labels(*key, str(phase))
        for outcome in SUBMISSION_OUTCOMES:
            self.submissions.labels(*key, outcome)
        for outcome in POLL_OUTCOMES:
            self.fallback_polls.labels(*key, outcome)
        self.fallback_recoveries.labels(*key)
        for code in (*FAILURE_CODES, OTHER_CODE):
            self.permanent_failures.labels(*key, code)
        for endpoint in ENDPOINTS:
            self.provider_request_duration.labels(*key, endpoint)
            for outcome in OUTCOMES:
                self.provider_requests.labels(*key, endpoint, outcome)
        self.poll_batch_size.labels(*key)
        for delivered in DeliveredBy:
            self.solve_duration.labels(*key, str(delivered))
        self.provider_ready.labels(*key).set(0)
        self.tasks_past_deadline.labels(*key).set(0)

    def set_task_counts(self, counts: Mapping[tuple[str, str, str], int]) -> None:
        """Set ``captchatask_tasks`` from (namespace, provider, phase) counts; absent read 0."""
        for key in {(ns, provider) for ns, provider, _ in counts} | self._known:
            self.ensure_provider(*key)
            for phase in Phase:
                self.tasks.labels(*key, str(phase)).set(counts.get((*key, str(phase)), 0))

    def set_past_deadline_counts(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Set ``captchatask_tasks_past_deadline`` per (namespace, provider); absent read 0."""
        for key in set(counts) | self._known:
            self.ensure_provider(*key)
            self.tasks_past_deadline.labels(*key).set(counts.get(key, 0))

    def set_dead_letter_counts(self, counts: Mapping[tuple[str, str, str], int]) -> None:
        """Set ``captchatask_dead_letters`` from (namespace, reason, phase) counts; absent: 0."""
        for namespace in {ns for ns, _, _ in counts}:
            self.ensure_namespace(namespace)
        triples = {
            (ns, str(r), str(p))
            for ns in self._namespaces
            for r in DeadLetterReason
            for p in DeadLetterPhase
        }
        for triple in triples | set(counts):
            self.dead_letters.labels(*triple).set(counts.get(triple, 0))

    def observer(self, namespace: str, provider: str) -> RequestObserver:
        """The provider client's request observer for one provider."""

        def observe(endpoint: str, outcome: str, seconds: float) -> None:
            self.provider_requests.labels(namespace, provider, endpoint, outcome).inc()
            self.provider_request_duration.labels(namespace, provider, endpoint).observe(seconds)

        return observe

    def known_providers(self) -> Iterable[tuple[str, str]]:
        """(namespace, provider) pairs with pre-created series."""
        return tuple(self._known)
