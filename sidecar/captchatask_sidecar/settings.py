"""The sidecar's configuration: read once at startup into one frozen :class:`Settings`.

Config flow: Helm values -> container env ``CAPTCHATASK_*`` (1:1, in :data:`ENV` order) ->
:func:`load` (env first, then command-line flags, which win) -> ``Settings`` -> passed down to the
app factories. Nothing below this module reads ``os.environ``.

The pod's namespace comes from ``CAPTCHATASK_NAMESPACE`` (the chart maps the downward API
``metadata.namespace`` onto it); when unset, the caller falls back to the kubeconfig context's
namespace (:func:`Settings.with_namespace`).
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

#: Defaults, each with its reason.
DEFAULT_PINGBACK_ADDR: Final = "0.0.0.0:8080"
DEFAULT_LOCAL_ADDR: Final = "127.0.0.1:8081"  # the pod's own containers only
DEFAULT_ADMIN_ADDR: Final = "0.0.0.0:9090"
DEFAULT_SPOOL_DIR: Final = "/var/lib/captchatask/spool"
#: The spool's byte bound: three quarters of the chart's default 256 MiB ``emptyDir`` limit, so the
#: receiver refuses (503) long before the kubelet would evict the pod and delete the volume.
DEFAULT_SPOOL_MAX_BYTES: Final = 192 * 1024 * 1024
#: The spool's record bound: each pending result costs ~270 bytes of memory (its location; the
#: payload stays on disk; measured), so this caps the backlog's memory near 27 MiB, within a
#: small container's limit.
DEFAULT_SPOOL_MAX_RECORDS: Final = 100_000
#: Readiness turns false at this fraction of either bound: the Service stops routing pingbacks
#: here while requests already on their way still find room.
DEFAULT_SPOOL_READY_FRACTION: Final = 0.8
#: A smaller byte bound could not hold one large pingback.
MIN_SPOOL_MAX_BYTES: Final = 1024 * 1024
#: Binary and decimal suffixes accepted in byte settings (Kubernetes quantity spelling).
_BYTE_SUFFIXES: Final = {
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "k": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
}
#: How long a pingback waits for the API server before it is spooled instead: short, because
#: some providers close the connection after about 2 s (CapMonster clones document it).
DEFAULT_LEDGER_BUDGET_SECONDS: Final = 0.5
#: Bounds of the adaptive limit on pingback ledger writes in flight (:mod:`.limiter`): the
#: pingback path writes to the ledger only within it and spools the rest at once. One write
#: always goes through (the minimum); 16 is past the point where a measured kube-apiserver took
#: more results per second, and only adds queueing (a few in flight already saturate it).
DEFAULT_LEDGER_MIN_IN_FLIGHT: Final = 1
DEFAULT_LEDGER_MAX_IN_FLIGHT: Final = 16
#: How many times its unloaded time a ledger write may take before the limit shrinks: 2 keeps a
#: pingback's own wait within a few milliseconds of what an idle API server needs.
DEFAULT_LEDGER_LATENCY_TOLERANCE: Final = 2.0
#: A token is at most 64 KiB (the CRD's limit); the form/multipart envelope adds a little.
DEFAULT_MAX_BODY_BYTES: Final = 96 * 1024
#: An image task carries up to 800 KiB of base64; the local API accepts that plus the JSON.
DEFAULT_LOCAL_MAX_BODY_BYTES: Final = 1024 * 1024
#: Slow-loris bound: the whole body (and, via keep-alive, the headers) must arrive in this time.
DEFAULT_READ_TIMEOUT_SECONDS: Final = 10.0
#: Per-request budget of the spool drainer (it is not on the hot path, so it can be patient).
DEFAULT_DRAIN_TIMEOUT_SECONDS: Final = 5.0
#: Replays in flight at once at most when the spool drains (the drainer keeps at most its
#: ``BUSY_CONCURRENCY`` while pingbacks arrive, and up to this once they stop). A deeper drain
#: is faster and worse for everyone else: an unrelated client's requests wait behind ours. At
#: twice the API server's limit on its own core, 32 once pingbacks stop (8 before) put results
#: into the ledger at 0.94-1.01 of the raw ceiling instead of 0.84-0.97 with 8 throughout, the
#: API server spending 3.1-3.3 ms of CPU per patch instead of 3.1-3.6 ms (``python -m
#: bench.ingest --limit-only``, interleaved runs); with Kubernetes' default FlowSchemas (the
#: chart's ``apiPriority`` off) it raised another client's ``list pods`` p99 during the storm
#: and its drain from 147-166 ms to 434-530 ms (idle 4.8-7.5 ms; ``python -m
#: bench.fairness --storm kubernetes_defaults``). So the default stays gentle;
#: raise it where the API server has cores to spare.
DEFAULT_DRAIN_CONCURRENCY: Final = 8
#: Results written to the ledger per second at most (0: no ceiling, the adaptive limit alone).
DEFAULT_LEDGER_WRITES_PER_SECOND: Final = 0.0
#: Results that may be written at once under that ceiling (client-go's default burst).
DEFAULT_LEDGER_WRITES_BURST: Final = 10
#: In-flight requests get this long to finish on SIGTERM (below the pod's 30 s grace period).
DEFAULT_SHUTDOWN_TIMEOUT_SECONDS: Final = 10.0
#: Upper bound of ``?wait=`` on the local API (a long-poll, not a subscription).
DEFAULT_MAX_WAIT_SECONDS: Final = 300.0

ENV_PREFIX: Final = "CAPTCHATASK_"

#: field name -> (env var, help). The chart maps each value to one of these, in this order.
ENV: Final[dict[str, tuple[str, str]]] = {
    "pingback_addr": ("CAPTCHATASK_PINGBACK_ADDR", "host:port of the pingback listener"),
    "local_addr": (
        "CAPTCHATASK_LOCAL_ADDR",
        "host:port of the local task API (empty: disabled, e.g. for a standalone receiver)",
    ),
    "admin_addr": ("CAPTCHATASK_ADMIN_ADDR", "host:port of /metrics, /healthz, /readyz"),
    "namespace": (
        "CAPTCHATASK_NAMESPACE",
        "the pod's namespace (downward API); default: the kubeconfig context's",
    ),
    "pingback_namespaces": (
        "CAPTCHATASK_PINGBACK_NAMESPACES",
        "comma-separated namespaces whose pingbacks are accepted (default: the pod's)",
    ),
    "pingback_key_file": (
        "CAPTCHATASK_PINGBACK_KEY_FILE",
        "file with the pingback HMAC key(s), one per line; the first signs",
    ),
    "spool_dir": ("CAPTCHATASK_SPOOL_DIR", "directory (a volume) of the durable spool"),
    "spool_max_bytes": (
        "CAPTCHATASK_SPOOL_MAX_BYTES",
        "bytes the spool may take (e.g. 192Mi; keep it below the volume's size): past it "
        "pingbacks are answered 503",
    ),
    "spool_max_records": (
        "CAPTCHATASK_SPOOL_MAX_RECORDS",
        "results the spool may hold: past it pingbacks are answered 503",
    ),
    "spool_ready_fraction": (
        "CAPTCHATASK_SPOOL_READY_FRACTION",
        "readiness turns false once the spool holds this fraction of either bound (0-1]",
    ),
    "ledger_budget_seconds": (
        "CAPTCHATASK_LEDGER_BUDGET_SECONDS",
        "how long a pingback waits for the API server before it is spooled",
    ),
    "ledger_min_in_flight": (
        "CAPTCHATASK_LEDGER_MIN_IN_FLIGHT",
        "lower bound of the adaptive limit on pingback ledger writes in flight",
    ),
    "ledger_max_in_flight": (
        "CAPTCHATASK_LEDGER_MAX_IN_FLIGHT",
        "upper bound of that limit (beyond it pingbacks go to the spool at once;"
        " min = max fixes it)",
    ),
    "ledger_latency_tolerance": (
        "CAPTCHATASK_LEDGER_LATENCY_TOLERANCE",
        "times its unloaded duration a ledger write may take before the limit shrinks",
    ),
    "max_body_bytes": ("CAPTCHATASK_MAX_BODY_BYTES", "largest accepted pingback body"),
    "read_timeout_seconds": (
        "CAPTCHATASK_READ_TIMEOUT_SECONDS",
        "time allowed to send a request's headers and body (slow-loris bound)",
    ),
    "verify_by_poll": (
        "CAPTCHATASK_VERIFY_BY_POLL",
        "confirm each pingback with res.php before recording it (needs the key Secret)",
    ),
    "provider": (
        "CAPTCHATASK_PROVIDER",
        "CaptchaProvider for the public URL and verify-by-poll",
    ),
    "pod_name": ("CAPTCHATASK_POD_NAME", "this receiver's name, written as receivedBy"),
    "public_url": (
        "CAPTCHATASK_PUBLIC_URL",
        "public base URL of pingbacks (default: the provider's spec.pingback.publicURL)",
    ),
    "dialect": (
        "CAPTCHATASK_DIALECT",
        "solver dialect used to classify ERROR_ codes: captchaai or 2captcha",
    ),
    "kubeconfig": ("CAPTCHATASK_KUBECONFIG", "kubeconfig path (default: in-cluster/KUBECONFIG)"),
    "local_max_body_bytes": (
        "CAPTCHATASK_LOCAL_MAX_BODY_BYTES",
        "largest accepted local-API body (image tasks are large)",
    ),
    "drain_timeout_seconds": (
        "CAPTCHATASK_DRAIN_TIMEOUT_SECONDS",
        "per-request timeout of the spool drainer",
    ),
    "drain_concurrency": (
        "CAPTCHATASK_DRAIN_CONCURRENCY",
        "spool replays in flight at once at most (at most 8 while pingbacks arrive)",
    ),
    "ledger_writes_per_second": (
        "CAPTCHATASK_LEDGER_WRITES_PER_SECOND",
        "results written to the ledger per second at most, the rest spooled (0: no ceiling)",
    ),
    "ledger_writes_burst": (
        "CAPTCHATASK_LEDGER_WRITES_BURST",
        "results that may be written at once under that ceiling",
    ),
    "shutdown_timeout_seconds": (
        "CAPTCHATASK_SHUTDOWN_TIMEOUT_SECONDS",
        "time in-flight requests get to finish on SIGTERM",
    ),
    "max_wait_seconds": ("CAPTCHATASK_MAX_WAIT_SECONDS", "upper bound of ?wait= long-polls"),
    "access_log": (
        "CAPTCHATASK_ACCESS_LOG",
        "log every request, path token and query values masked (off: it costs throughput)",
    ),
    "log_level": ("CAPTCHATASK_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR"),
}

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})
_DIALECTS: Final = ("captchaai", "2captcha")


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the env var / flag."""


@dataclass(frozen=True, slots=True)
class Address:
    """A listen address."""

    host: str
    port: int

    @classmethod
    def parse(cls, value: str, *, what: str) -> Address:
        """Parse ``host:port`` (``[v6]:port`` too)."""
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise SettingsError(f"{what}: expected host:port, got {value!r}")
        return cls(host=host.strip("[]") or "0.0.0.0", port=int(port))  # noqa: S104

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the sidecar is configured with (see :data:`ENV` for the meaning of each)."""

    pingback_addr: Address
    local_addr: Address | None
    admin_addr: Address
    namespace: str | None
    pingback_namespaces: tuple[str, ...]
    pingback_key_file: Path
    spool_dir: Path
    spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES
    spool_max_records: int = DEFAULT_SPOOL_MAX_RECORDS
    spool_ready_fraction: float = DEFAULT_SPOOL_READY_FRACTION
    ledger_budget_seconds: float = DEFAULT_LEDGER_BUDGET_SECONDS
    ledger_min_in_flight: int = DEFAULT_LEDGER_MIN_IN_FLIGHT
    ledger_max_in_flight: int = DEFAULT_LEDGER_MAX_IN_FLIGHT
    ledger_latency_tolerance: float = DEFAULT_LEDGER_LATENCY_TOLERANCE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    read_timeout_seconds: float = DEFAULT_READ_TIMEOUT_SECONDS
    verify_by_poll: bool = False
    provider: str = "default"
    pod_name: str = ""
    public_url: str | None = None
    dialect: str = "captchaai"
    kubeconfig: str | None = None
    local_max_body_bytes: int = DEFAULT_LOCAL_MAX_BODY_BYTES
    drain_timeout_seconds: float = DEFAULT_DRAIN_TIMEOUT_SECONDS
    drain_concurrency: int = DEFAULT_DRAIN_CONCURRENCY
    ledger_writes_per_second: float = DEFAULT_LEDGER_WRITES_PER_SECOND
    ledger_writes_burst: int = DEFAULT_LEDGER_WRITES_BURST
    shutdown_timeout_seconds: float = DEFAULT_SHUTDOWN_TIMEOUT_SECONDS
    max_wait_seconds: float = DEFAULT_MAX_WAIT_SECONDS
    access_log: bool = False
    log_level: str = "INFO"

    def with_namespace(self, namespace: str) -> Settings:
        """Fill in the pod's namespace (from the kubeconfig) when the env did not give one."""
        if self.namespace:
            return self
        served = self.pingback_namespaces or (namespace,)
        return replace(self, namespace=namespace, pingback_namespaces=served)

    @property
    def pod_namespace(self) -> str:
        """The namespace the local API creates tasks in (set by :meth:`with_namespace`)."""
        if not self.namespace:
            raise SettingsError("the sidecar's namespace is not known yet")
        return self.namespace


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captchatask sidecar",
        description=(
            "Receive solver pingbacks, record them durably in the CaptchaTask ledger (or a local "
            "fsync'd spool when the API server is away), and serve a local task API."
        ),
        epilog="Every flag can also be set with the environment variable named in its help.",
    )
    for field_name, (var, help_text) in ENV.items():
        flag = "--" + field_name.replace("_", "-")
        default = env.get(var)
        if field_name in ("verify_by_poll", "access_log"):
            parser.add_argument(
                flag,
                dest=field_name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{help_text} [{var}]",
            )
        else:
            parser.add_argument(flag, dest=field_name, default=default, help=f"{help_text} [{var}]")
    return parser


def _bool(raw: str | bool | None, *, name: str, default: bool) -> bool:
    if raw is None:
        return default
    if isinstance(raw, bool):
        return raw
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise SettingsError(f"{ENV[name][0]}: expected true/false, got {raw!r}")


def _number(raw: str | None, *, name: str, default: float, minimum: float) -> float:
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise SettingsError(f"{ENV[name][0]}: expected a number, got {raw!r}") from exc
    if value < minimum:
        raise SettingsError(f"{ENV[name][0]}: must be at least {minimum}, got {raw!r}")
    return value


def _bytes(raw: str | None, *, name: str, default: int, minimum: int) -> int:
    """A byte count, plain or with a Kubernetes quantity suffix (``192Mi``, ``1G``)."""
    if raw is None or raw.strip() == "":
        return default
    text = raw.strip()
    factor = 1
    for suffix, multiplier in _BYTE_SUFFIXES.items():
        if text.endswith(suffix):
            text, factor = text[: -len(suffix)], multiplier
            break
    if not text.isdigit():
        raise SettingsError(f"{ENV[name][0]}: expected bytes such as 192Mi, got {raw!r}")
    value = int(text) * factor
    if value < minimum:
        raise SettingsError(f"{ENV[name][0]}: must be at least {minimum} bytes, got {raw!r}")
    return value


def _fraction(raw: str | None, *, name: str, default: float) -> float:
    value = _number(raw, name=name, default=default, minimum=0.0)
    if not 0.0 < value <= 1.0:
        raise SettingsError(f"{ENV[name][0]}: must be above 0 and at most 1, got {raw!r}")
    return value


def load(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    """Build :class:`Settings` from ``CAPTCHATASK_*`` env vars overridden by flags.

    Raises
    ------
    SettingsError
        A value is malformed or the pingback key file is not configured.
    SystemExit
        ``--help`` or an unknown flag (argparse's behaviour).
    """
    ns = vars(_parser(environ).parse_args(list(argv)))
    boolean = {
        "verify_by_poll": environ.get(ENV["verify_by_poll"][0]),
        "access_log": environ.get(ENV["access_log"][0]),
    }
    key_file = ns["pingback_key_file"]
    if not key_file:
        raise SettingsError(f"{ENV['pingback_key_file'][0]} (--pingback-key-file) is required")
    local_raw = ns["local_addr"] if ns["local_addr"] is not None else DEFAULT_LOCAL_ADDR
    dialect = (ns["dialect"] or "captchaai").strip().lower()
    if dialect not in _DIALECTS:
        raise SettingsError(f"{ENV['dialect'][0]}: expected one of {_DIALECTS}, got {dialect!r}")
    namespace = (ns["namespace"] or "").strip() or None
    served = tuple(n.strip() for n in (ns["pingback_namespaces"] or "").split(",") if n.strip())
    if not served and namespace:
        served = (namespace,)
    min_in_flight = int(
        _number(
            ns["ledger_min_in_flight"],
            name="ledger_min_in_flight",
            default=DEFAULT_LEDGER_MIN_IN_FLIGHT,
            minimum=1,
        )
    )
    max_in_flight = int(
        _number(
            ns["ledger_max_in_flight"],
            name="ledger_max_in_flight",
            default=max(DEFAULT_LEDGER_MAX_IN_FLIGHT, min_in_flight),
            minimum=1,
        )
    )
    if max_in_flight < min_in_flight:
        raise SettingsError(
            f"{ENV['ledger_max_in_flight'][0]}: must be at least"
            f" {ENV['ledger_min_in_flight'][0]} ({min_in_flight}), got {max_in_flight}"
        )
    level = (ns["log_level"] or "INFO").strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SettingsError(f"{ENV['log_level'][0]}: unknown level {level!r}")
    return Settings(
        pingback_addr=Address.parse(
            ns["pingback_addr"] or DEFAULT_PINGBACK_ADDR, what="pingback address"
        ),
        local_addr=Address.parse(local_raw, what="local address") if local_raw else None,
        admin_addr=Address.parse(ns["admin_addr"] or DEFAULT_ADMIN_ADDR, what="admin address"),
        namespace=namespace,
        pingback_namespaces=served,
        pingback_key_file=Path(key_file),
        spool_dir=Path(ns["spool_dir"] or DEFAULT_SPOOL_DIR),
        spool_max_bytes=_bytes(
            ns["spool_max_bytes"],
            name="spool_max_bytes",
            default=DEFAULT_SPOOL_MAX_BYTES,
            minimum=MIN_SPOOL_MAX_BYTES,
        ),
        spool_max_records=int(
            _number(
                ns["spool_max_records"],
                name="spool_max_records",
                default=DEFAULT_SPOOL_MAX_RECORDS,
                minimum=1,
            )
        ),
        spool_ready_fraction=_fraction(
            ns["spool_ready_fraction"],
            name="spool_ready_fraction",
            default=DEFAULT_SPOOL_READY_FRACTION,
        ),
        ledger_budget_seconds=_number(
            ns["ledger_budget_seconds"],
            name="ledger_budget_seconds",
            default=DEFAULT_LEDGER_BUDGET_SECONDS,
            minimum=0.01,
        ),
        ledger_min_in_flight=min_in_flight,
        ledger_max_in_flight=max_in_flight,
        ledger_latency_tolerance=_number(
            ns["ledger_latency_tolerance"],
            name="ledger_latency_tolerance",
            default=DEFAULT_LEDGER_LATENCY_TOLERANCE,
            minimum=1.0,
        ),
        max_body_bytes=int(
            _number(
                ns["max_body_bytes"],
                name="max_body_bytes",
                default=DEFAULT_MAX_BODY_BYTES,
                minimum=256,
            )
        ),
        read_timeout_seconds=_number(
            ns["read_timeout_seconds"],
            name="read_timeout_seconds",
            default=DEFAULT_READ_TIMEOUT_SECONDS,
            minimum=0.1,
        ),
        verify_by_poll=_bool(
            ns["verify_by_poll"] if ns["verify_by_poll"] is not None else boolean["verify_by_poll"],
            name="verify_by_poll",
            default=False,
        ),
        provider=(ns["provider"] or "default").strip(),
        pod_name=(ns["pod_name"] or socket.gethostname()).strip(),
        public_url=(ns["public_url"] or "").strip() or None,
        dialect=dialect,
        kubeconfig=(ns["kubeconfig"] or "").strip() or None,
        local_max_body_bytes=int(
            _number(
                ns["local_max_body_bytes"],
                name="local_max_body_bytes",
                default=DEFAULT_LOCAL_MAX_BODY_BYTES,
                minimum=1024,
            )
        ),
        drain_timeout_seconds=_number(
            ns["drain_timeout_seconds"],
            name="drain_timeout_seconds",
            default=DEFAULT_DRAIN_TIMEOUT_SECONDS,
            minimum=0.1,
        ),
        drain_concurrency=int(
            _number(
                ns["drain_concurrency"],
                name="drain_concurrency",
                default=DEFAULT_DRAIN_CONCURRENCY,
                minimum=1,
            )
        ),
        ledger_writes_per_second=_number(
            ns["ledger_writes_per_second"],
            name="ledger_writes_per_second",
            default=DEFAULT_LEDGER_WRITES_PER_SECOND,
            minimum=0.0,
        ),
        ledger_writes_burst=int(
            _number(
                ns["ledger_writes_burst"],
                name="ledger_writes_burst",
                default=DEFAULT_LEDGER_WRITES_BURST,
                minimum=1,
            )
        ),
        shutdown_timeout_seconds=_number(
            ns["shutdown_timeout_seconds"],
            name="shutdown_timeout_seconds",
            default=DEFAULT_SHUTDOWN_TIMEOUT_SECONDS,
            minimum=0.0,
        ),
        max_wait_seconds=_number(
            ns["max_wait_seconds"],
            name="max_wait_seconds",
            default=DEFAULT_MAX_WAIT_SECONDS,
            minimum=0.0,
        ),
        access_log=_bool(
            ns["access_log"] if ns["access_log"] is not None else boolean["access_log"],
            name="access_log",
            default=False,
        ),
        log_level=level,
    )
