"""Operator settings: environment first, command-line flags override, read once at startup.

Config flow: the Helm chart sets ``CAPTCHATASK_*`` environment variables (one per value in
``values.yaml``); :func:`parse` reads them into defaults for an :mod:`argparse` parser whose
flags can override each one; the result is one frozen :class:`Settings` that ``cli.main`` hands
to everything else. Nothing below this module reads ``os.environ``.

Only the *location* of the pingback HMAC key is a setting (``CAPTCHATASK_PINGBACK_KEY_FILE``, the
mounted install-time Secret); the key itself is read by ``cli.main`` into the signer and never
stored here, logged or printed. Provider API keys are not settings at all: they live in the
Secrets that ``CaptchaProvider`` objects reference.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from captchatask import deadletters

ENV_PREFIX: Final = "CAPTCHATASK_"

#: Default admin port for /metrics, /healthz and /readyz (not kopf's liveness port).
DEFAULT_ADMIN_PORT: Final = 9090
#: Long enough to keep watch reconnects rare, short enough that a half-dead connection heals.
DEFAULT_WATCH_SERVER_TIMEOUT: Final = 300
#: How often a provider that is not Ready is re-checked (a fixed Secret is noticed this fast).
DEFAULT_PROVIDER_RETRY_SECONDS: Final = 10.0
#: Transient provider-check failures in a row (5xx page, transport error, unparseable reply)
#: before a provider is declared Unreachable; fewer keep its last known readiness (BUG-1).
DEFAULT_PROVIDER_UNREACHABLE_AFTER: Final = 3
#: Per-request budget towards the solver API (the official SDKs use 30 s).
DEFAULT_PROVIDER_TIMEOUT: Final = 30.0
#: Transport retries inside one solver request (the client backs off from the documented 5 s).
DEFAULT_PROVIDER_TRANSPORT_RETRIES: Final = 2
#: in.php calls one task may cost when their outcome stays unknown (crash, timeout): no storm.
DEFAULT_MAX_SUBMIT_ATTEMPTS: Final = 3
#: How long an unresolved submission intent of a poll-only provider waits before resubmitting.
DEFAULT_INTENT_GRACE_SECONDS: Final = 30.0
#: Concurrent in.php calls across all providers.
DEFAULT_SUBMIT_CONCURRENCY: Final = 16
#: Concurrent res.php batches (one batch = the tasks of one provider due at the same moment).
DEFAULT_POLL_CONCURRENCY: Final = 8
#: A provider's due polls gather into one bulk request until it holds ``bulk_max_ids`` ids or
#: its oldest poll is late by this much, and the request also carries the provider's polls due
#: within the next window (early costs no recovery delay). 0.9 s: at 20 tasks/s and 30 %
#: pingback loss that is ~6 ids per request late-only (BENCH-6: 0.2 s gave ~2; 0.8 s measured
#: 5.5), and the p99 recovery delay (~window + 10 ms) stays under 1 s; a higher rate fills
#: the batch sooner.
DEFAULT_POLL_BATCH_WINDOW: Final = 0.9
#: Persist polls/lastPollAt/nextPollAt every Nth poll only: API writes per poll matter at scale.
DEFAULT_POLL_STATUS_EVERY: Final = 5
#: Dead letters: attempts and age after which an unmatched letter is Expired (for a human).
DEFAULT_DEAD_LETTER_MAX_ATTEMPTS: Final = deadletters.DEFAULT_MAX_ATTEMPTS
DEFAULT_DEAD_LETTER_MAX_AGE_SECONDS: Final = deadletters.DEFAULT_MAX_AGE.total_seconds()
#: Dead letters: the first retry waits about this long, doubling per attempt up to the cap.
DEFAULT_DEAD_LETTER_RETRY_BASE_SECONDS: Final = deadletters.BASE_DELAY_SECONDS
DEFAULT_DEAD_LETTER_RETRY_MAX_SECONDS: Final = deadletters.MAX_DELAY_SECONDS
#: Dead letters: a Requeued letter is kept this long for audit, then deleted.
DEFAULT_DEAD_LETTER_REQUEUED_TTL_SECONDS: Final = deadletters.DEFAULT_REQUEUED_TTL.total_seconds()
#: Upper bound for the random default peering priority (any two replicas differ, see parse()).
_PRIORITY_RANGE: Final = 1_000_000
_TRUE: Final = frozenset({"1", "true", "yes", "on"})


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the operator is configured with; see the module docstring for the flow."""

    namespaces: tuple[str, ...] = ()
    all_namespaces: bool = False
    standalone: bool = False
    peering: str | None = None
    peering_priority: int = 0
    peering_lifetime: int = 60
    admin_host: str = "0.0.0.0"  # noqa: S104 - the admin port must be scrapeable in-cluster
    admin_port: int = DEFAULT_ADMIN_PORT
    pingback_key_file: str | None = None
    watch_server_timeout: int = DEFAULT_WATCH_SERVER_TIMEOUT
    provider_retry_seconds: float = DEFAULT_PROVIDER_RETRY_SECONDS
    provider_unreachable_after: int = DEFAULT_PROVIDER_UNREACHABLE_AFTER
    provider_timeout: float = DEFAULT_PROVIDER_TIMEOUT
    provider_transport_retries: int = DEFAULT_PROVIDER_TRANSPORT_RETRIES
    max_submit_attempts: int = DEFAULT_MAX_SUBMIT_ATTEMPTS
    intent_grace_seconds: float = DEFAULT_INTENT_GRACE_SECONDS
    submit_concurrency: int = DEFAULT_SUBMIT_CONCURRENCY
    poll_concurrency: int = DEFAULT_POLL_CONCURRENCY
    poll_batch_window: float = DEFAULT_POLL_BATCH_WINDOW
    poll_status_every: int = DEFAULT_POLL_STATUS_EVERY
    dead_letter_max_attempts: int = DEFAULT_DEAD_LETTER_MAX_ATTEMPTS
    dead_letter_max_age_seconds: float = DEFAULT_DEAD_LETTER_MAX_AGE_SECONDS
    dead_letter_retry_base_seconds: float = DEFAULT_DEAD_LETTER_RETRY_BASE_SECONDS
    dead_letter_retry_max_seconds: float = DEFAULT_DEAD_LETTER_RETRY_MAX_SECONDS
    dead_letter_requeued_ttl_seconds: float = DEFAULT_DEAD_LETTER_REQUEUED_TTL_SECONDS
    events: bool = True
    routine_events: bool = False
    strip_managed_fields: bool = True
    log_level: str = "INFO"

    @property
    def peering_enabled(self) -> bool:
        """Whether this replica takes part in active/standby peering."""
        return self.peering is not None and not self.standalone


@dataclass(frozen=True, slots=True)
class _Option:
    """One setting: its flag, its environment variable and how to parse it."""

    flag: str
    env: str
    kind: type
    help: str


_OPTIONS: Final[dict[str, _Option]] = {
    "namespaces": _Option(
        "--namespace",
        "NAMESPACES",
        list,
        "watch this namespace (repeatable; env: comma-separated); globs are allowed",
    ),
    "all_namespaces": _Option("--all-namespaces", "ALL_NAMESPACES", bool, "watch every namespace"),
    "standalone": _Option("--standalone", "STANDALONE", bool, "no peering: always active"),
    "peering": _Option(
        "--peering",
        "PEERING",
        str,
        "KopfPeering object name for active/standby replicas (the object must exist)",
    ),
    "peering_priority": _Option(
        "--peering-priority",
        "PEERING_PRIORITY",
        int,
        "priority among peers (default: random per process)",
    ),
    "peering_lifetime": _Option(
        "--peering-lifetime",
        "PEERING_LIFETIME_SECONDS",
        int,
        "seconds a silent peer is presumed alive (takeover time)",
    ),
    "admin_host": _Option("--admin-host", "ADMIN_HOST", str, "address of /metrics and /healthz"),
    "admin_port": _Option("--admin-port", "ADMIN_PORT", int, "port of /metrics and /healthz"),
    "pingback_key_file": _Option(
        "--pingback-key-file",
        "PINGBACK_KEY_FILE",
        str,
        "file with the pingback HMAC key(s), one per line",
    ),
    "watch_server_timeout": _Option(
        "--watch-server-timeout",
        "WATCH_SERVER_TIMEOUT_SECONDS",
        int,
        "server-side timeout of kopf's watch requests",
    ),
    "provider_retry_seconds": _Option(
        "--provider-retry-seconds",
        "PROVIDER_RETRY_SECONDS",
        float,
        "re-check interval of a provider that is not Ready",
    ),
    "provider_unreachable_after": _Option(
        "--provider-unreachable-after",
        "PROVIDER_UNREACHABLE_AFTER",
        int,
        "transient check failures in a row before a provider is Unreachable",
    ),
    "provider_timeout": _Option(
        "--provider-timeout", "PROVIDER_TIMEOUT_SECONDS", float, "timeout of one solver-API request"
    ),
    "provider_transport_retries": _Option(
        "--provider-transport-retries",
        "PROVIDER_TRANSPORT_RETRIES",
        int,
        "transport retries inside one solver request (never for an in.php that may have"
        " reached the provider)",
    ),
    "max_submit_attempts": _Option(
        "--max-submit-attempts",
        "MAX_SUBMIT_ATTEMPTS",
        int,
        "in.php calls per task whose outcome may be unknown",
    ),
    "intent_grace_seconds": _Option(
        "--intent-grace-seconds",
        "INTENT_GRACE_SECONDS",
        float,
        "wait before resubmitting an unresolved intent (poll-only)",
    ),
    "submit_concurrency": _Option(
        "--submit-concurrency", "SUBMIT_CONCURRENCY", int, "concurrent in.php calls"
    ),
    "poll_concurrency": _Option(
        "--poll-concurrency", "POLL_CONCURRENCY", int, "concurrent res.php batches"
    ),
    "poll_batch_window": _Option(
        "--poll-batch-window",
        "POLL_BATCH_WINDOW_SECONDS",
        float,
        "max lateness (and earliness) of a poll batched into a shared bulk request",
    ),
    "poll_status_every": _Option(
        "--poll-status-every",
        "POLL_STATUS_EVERY",
        int,
        "persist poll counters every Nth poll (1 = every poll)",
    ),
    "dead_letter_max_attempts": _Option(
        "--dead-letter-max-attempts",
        "DEAD_LETTER_MAX_ATTEMPTS",
        int,
        "requeue attempts before an unmatched dead letter is Expired",
    ),
    "dead_letter_max_age_seconds": _Option(
        "--dead-letter-max-age-seconds",
        "DEAD_LETTER_MAX_AGE_SECONDS",
        float,
        "age (since receipt or the last redrive) after which an unmatched letter is Expired",
    ),
    "dead_letter_retry_base_seconds": _Option(
        "--dead-letter-retry-base-seconds",
        "DEAD_LETTER_RETRY_BASE_SECONDS",
        float,
        "first requeue back-off ceiling; doubles per attempt",
    ),
    "dead_letter_retry_max_seconds": _Option(
        "--dead-letter-retry-max-seconds",
        "DEAD_LETTER_RETRY_MAX_SECONDS",
        float,
        "cap of the requeue back-off",
    ),
    "dead_letter_requeued_ttl_seconds": _Option(
        "--dead-letter-requeued-ttl-seconds",
        "DEAD_LETTER_REQUEUED_TTL_SECONDS",
        float,
        "delete a Requeued dead letter this long after it was applied",
    ),
    "events": _Option("--events", "EVENTS", bool, "post Kubernetes Events on transitions"),
    "routine_events": _Option(
        "--routine-events",
        "ROUTINE_EVENTS",
        bool,
        "also post the Submitted and Solved Events every task gets (a write and ~1 KiB of etcd "
        "per task each); off: they are only counted (captchatask_events_skipped_total)",
    ),
    "strip_managed_fields": _Option(
        "--strip-managed-fields",
        "STRIP_MANAGED_FIELDS",
        bool,
        "drop a task's managedFields before submitting it (about 1 KiB of etcd per task)",
    ),
    "log_level": _Option("--log-level", "LOG_LEVEL", str, "DEBUG, INFO, WARNING or ERROR"),
}


def env_name(setting: str) -> str:
    """Return the environment variable of a setting (``CAPTCHATASK_...``)."""
    return ENV_PREFIX + _OPTIONS[setting].env


def _from_text(kind: type, text: str) -> object:
    if kind is bool:
        return text.strip().lower() in _TRUE
    if kind is list:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    return text


def build_parser(defaults: Mapping[str, object]) -> argparse.ArgumentParser:
    """Return the ``captchatask operator`` parser with ``defaults`` from the environment."""
    parser = argparse.ArgumentParser(
        prog="captchatask operator",
        description="Run the CaptchaTask operator (kopf): submit, poll, fail, clean up.",
    )
    for name, option in _OPTIONS.items():
        env_help = f"{option.help} [env {ENV_PREFIX}{option.env}]"
        if option.kind is bool:
            parser.add_argument(
                option.flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=defaults.get(name),
                help=env_help,
            )
        elif option.kind is list:
            parser.add_argument(
                option.flag,
                dest=name,
                action="append",
                default=None,
                metavar="NAME",
                help=env_help,
            )
        else:
            parser.add_argument(
                option.flag,
                dest=name,
                type=option.kind,
                default=defaults.get(name),
                help=env_help,
            )
    parser.add_argument("-A", dest="all_namespaces", action="store_true", help="--all-namespaces")
    return parser


def parse(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    """Build :class:`Settings` from the environment and the command line (flags win).

    Raises
    ------
    SystemExit
        On invalid flags or an invalid combination (argparse's usual exit status 2).
    """
    defaults: dict[str, object] = {}
    for name, option in _OPTIONS.items():
        raw = environ.get(ENV_PREFIX + option.env)
        if raw is not None and raw != "":
            try:
                defaults[name] = _from_text(option.kind, raw)
            except ValueError as exc:
                raise SystemExit(f"{ENV_PREFIX}{option.env}: {exc}") from exc
    parser = build_parser(defaults)
    args = parser.parse_args(list(argv))
    values: dict[str, object] = {k: v for k, v in vars(args).items() if v is not None}
    if args.namespaces is not None:
        values["namespaces"] = tuple(args.namespaces)
    elif "namespaces" in defaults:
        values["namespaces"] = defaults["namespaces"]
    if values.get("all_namespaces") and values.get("namespaces"):
        parser.error("--namespace and --all-namespaces exclude each other")
    if not values.get("all_namespaces") and not values.get("namespaces"):
        parser.error("give --namespace NAME (repeatable) or --all-namespaces")
    if values.get("peering") and values.get("standalone"):
        parser.error("--peering and --standalone exclude each other")
    if "peering_priority" not in values:
        # Two replicas with equal priority both freeze (kopf); a random priority per process
        # makes every pair distinct, and any replica may be the active one.
        values["peering_priority"] = random.randrange(1, _PRIORITY_RANGE)  # noqa: S311
    settings = Settings(**values)  # type: ignore[arg-type]
    _validate(parser, settings)
    return settings


def _validate(parser: argparse.ArgumentParser, settings: Settings) -> None:
    if not 0 <= settings.admin_port <= 65535:
        parser.error("--admin-port must be a TCP port")
    if settings.max_submit_attempts < 1 or settings.poll_status_every < 1:
        parser.error("--max-submit-attempts and --poll-status-every must be >= 1")
    if settings.provider_unreachable_after < 1:
        parser.error("--provider-unreachable-after must be >= 1")
    if settings.submit_concurrency < 1 or settings.poll_concurrency < 1:
        parser.error("concurrency limits must be >= 1")
    if settings.poll_batch_window < 0 or settings.intent_grace_seconds < 0:
        parser.error("windows and grace periods must be >= 0")
    if settings.dead_letter_max_attempts < 1 or settings.dead_letter_max_age_seconds <= 0:
        parser.error("--dead-letter-max-attempts must be >= 1 and the max age > 0")
    if not 0 < settings.dead_letter_retry_base_seconds <= settings.dead_letter_retry_max_seconds:
        parser.error("dead-letter back-off: 0 < base <= max required")
    if settings.dead_letter_requeued_ttl_seconds < 0:
        parser.error("--dead-letter-requeued-ttl-seconds must be >= 0")
