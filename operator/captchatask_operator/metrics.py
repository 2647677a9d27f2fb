"""The operator's Prometheus series, built against an injectable registry.

Production passes ``prometheus_client.REGISTRY``; tests pass a fresh ``CollectorRegistry()`` and
read values with ``get_sample_value``. Every label takes values from a small fixed set (phases,
outcomes, endpoints, known codes) or the provider's name (a handful per cluster); never a task
name or id. Series for a provider are pre-created when the provider is first seen, so rates
start from 0 instead of appearing on the first event.

The dead-letter series have no provider label (a letter belongs to a task that may no longer
exist): ``captchatask_dead_letters{reason,phase}`` is recomputed from the operator's index of
the cluster's objects on every scrape, with every reason x phase pre-created, so the DLQ depth
is right immediately after a restart; ``captchatask_dead_letter_requeues_total{outcome}`` counts
what each requeue attempt did.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from captchatask.deadletters import RequeueOutcome
from captchatask.model import DeadLetterPhase, DeadLetterReason, DeliveredBy, Phase
from captchatask.provider import codes
from captchatask.provider.client import ENDPOINTS, OUTCOMES, RequestObserver
from captchatask_operator.policy import FailureCode, PollOutcome

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


def failure_label(code: str) -> str:
    """Map a failure code to a bounded label value."""
    if code in FAILURE_CODES or code in codes.known_codes():
        return code
    return OTHER_CODE


class Metrics:
    """Every series the operator exports, on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.tasks = Gauge(
            "captchatask_tasks",
            "CaptchaTasks the operator watches, by provider and phase.",
            ["provider", "phase"],
            registry=registry,
        )
        self.submissions = Counter(
            "captchatask_submissions_total",
            "in.php submissions by outcome (ambiguous: transport failure, may exist remotely).",
            ["provider", "outcome"],
            registry=registry,
        )
        self.fallback_polls = Counter(
            "captchatask_fallback_polls_total",
            "Per-task fallback polls by what they found.",
            ["provider", "outcome"],
            registry=registry,
        )
        self.fallback_recoveries = Counter(
            "captchatask_fallback_recoveries_total",
            "Results that reached the ledger by fallback poll because no pingback came.",
            ["provider"],
            registry=registry,
        )
        self.permanent_failures = Counter(
            "captchatask_permanent_failures_total",
            "Tasks the operator failed, by failure code.",
            ["provider", "code"],
            registry=registry,
        )
        self.provider_requests = Counter(
            "captchatask_provider_requests_total",
            "HTTP exchanges with the solver API.",
            ["provider", "endpoint", "outcome"],
            registry=registry,
        )
        self.provider_request_duration = Histogram(
            "captchatask_provider_request_duration_seconds",
            "Duration of one HTTP exchange with the solver API.",
            ["provider", "endpoint"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.solve_duration = Histogram(
            "captchatask_task_solve_duration_seconds",
            "From task creation to Solved, by delivery path (observed on the transition).",
            ["provider", "delivered_by"],
            buckets=SOLVE_BUCKETS,
            registry=registry,
        )
        self.provider_ready = Gauge(
            "captchatask_provider_ready",
            "1 if the provider's Ready condition is True, else 0.",
            ["provider"],
            registry=registry,
        )
        self.tasks_past_deadline = Gauge(
            "captchatask_tasks_past_deadline",
            "Unfinished CaptchaTasks past their deadline (the operator should have failed them:"
            " its scheduler is stuck, standby or cannot write), recomputed on scrape.",
            ["provider"],
            registry=registry,
        )
        self.dead_letters = Gauge(
            "captchatask_dead_letters",
            "CaptchaDeadLetters by reason and phase (the DLQ depth), recomputed from the cluster.",
            ["reason", "phase"],
            registry=registry,
        )
        self.dead_letter_requeues = Counter(
            "captchatask_dead_letter_requeues_total",
            "Dead-letter requeue attempts by outcome.",
            ["outcome"],
            registry=registry,
        )
        for reason in DeadLetterReason:
            for phase in DeadLetterPhase:
                self.dead_letters.labels(str(reason), str(phase))
        for outcome in RequeueOutcome:
            self.dead_letter_requeues.labels(str(outcome))
        self._known: set[str] = set()

    def ensure_provider(self, provider: str) -> None:
        """Pre-create every series of a provider at 0 (idempotent)."""
        if provider in self._known:
            return
        self._known.add(provider)
        for phase in Phase:
            self.tasks.labels(provider, str(phase))
        for outcome in SUBMISSION_OUTCOMES:
            self.submissions.labels(provider, outcome)
        for outcome in POLL_OUTCOMES:
            self.fallback_polls.labels(provider, outcome)
        self.fallback_recoveries.labels(provider)
        for code in (*FAILURE_CODES, OTHER_CODE):
            self.permanent_failures.labels(provider, code)
        for endpoint in ENDPOINTS:
            self.provider_request_duration.labels(provider, endpoint)
            for outcome in OUTCOMES:
                self.provider_requests.labels(provider, endpoint, outcome)
        for delivered in DeliveredBy:
            self.solve_duration.labels(provider, str(delivered))
        self.provider_ready.labels(provider).set(0)
        self.tasks_past_deadline.labels(provider).set(0)

    def set_task_counts(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Set ``captchatask_tasks`` from (provider, phase) counts; absent pairs read 0."""
        for provider in {provider for provider, _ in counts} | self._known:
            self.ensure_provider(provider)
            for phase in Phase:
                self.tasks.labels(provider, str(phase)).set(counts.get((provider, str(phase)), 0))

    def set_past_deadline_counts(self, counts: Mapping[str, int]) -> None:
        """Set ``captchatask_tasks_past_deadline`` per provider; absent providers read 0."""
        for provider in set(counts) | self._known:
            self.ensure_provider(provider)
            self.tasks_past_deadline.labels(provider).set(counts.get(provider, 0))

    def set_dead_letter_counts(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Set ``captchatask_dead_letters`` from (reason, phase) counts; absent pairs read 0."""
        pairs = {(str(r), str(p)) for r in DeadLetterReason for p in DeadLetterPhase}
        for reason, phase in pairs | set(counts):
            self.dead_letters.labels(reason, phase).set(counts.get((reason, phase), 0))

    def observer(self, provider: str) -> RequestObserver:
        """The provider client's request observer for one provider."""

        def observe(endpoint: str, outcome: str, seconds: float) -> None:
            self.provider_requests.labels(provider, endpoint, outcome).inc()
            self.provider_request_duration.labels(provider, endpoint).observe(seconds)

        return observe

    def known_providers(self) -> Iterable[str]:
        """Providers with pre-created series."""
        return tuple(self._known)
