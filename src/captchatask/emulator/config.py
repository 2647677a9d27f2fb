"""Configuration of the solver emulator: one frozen dataclass read once, plus runtime faults.

:class:`EmulatorConfig` fixes everything that shapes the emulated account (keys, threads, solve
times, limits). :class:`Faults` holds the fault-injection knobs; it is frozen too, but the
running emulator swaps it for a new value when the admin endpoint (or the Python handle)
changes a knob, so faults can be turned on and off in the middle of a test or benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_SOLVE_TIMES",
    "SOLVE_KINDS",
    "BusyBehaviour",
    "EmulatorConfig",
    "Faults",
    "IdType",
    "PingbackStyle",
]

DEFAULT_API_KEY: Final = "emulatorkey0123456789abcdef01234"
"""The key the emulator accepts unless told otherwise (32 characters, like a real key)."""

API_KEY_LENGTH: Final = 32


class BusyBehaviour(StrEnum):
    """What ``in.php`` does when every thread is busy (``provider-api.md`` section 7.1)."""

    ZERO_BALANCE = "zero_balance"  # CaptchaAI docs: "You don't have free threads"
    NO_SLOT = "no_slot"  # CaptchaAI blog: rejected with ERROR_NO_SLOT_AVAILABLE
    QUEUE = "queue"  # CaptchaAI SDK comment: queued silently


class PingbackStyle(StrEnum):
    """How a pingback is delivered."""

    CAI_GET = "cai-get"  # CaptchaAI blog: GET URL?id=...&code=...
    TWOC_POST = "2c-post"  # 2captcha: POST application/x-www-form-urlencoded id, code


class IdType(StrEnum):
    """How a task id is encoded in JSON submit replies."""

    INT = "int"  # CaptchaAI: {"status":1,"request":3397637370}
    STR = "str"  # 2captcha: {"status":1,"request":"2122988149"}


SOLVE_KINDS: Final = (
    "recaptcha_v2",
    "recaptcha_v3",
    "recaptcha_enterprise",
    "turnstile",
    "hcaptcha",
    "geetest",
    "geetest_v4",
    "image",
    "grid",
)

DEFAULT_SOLVE_TIMES: Final[Mapping[str, tuple[float, float]]] = MappingProxyType(
    {
        # Uniform (low, high) seconds. v2: a real solve took 36.8 s, the SDK says 60-80 s.
        "recaptcha_v2": (20.0, 60.0),
        "recaptcha_v3": (3.0, 10.0),  # a real v3 token arrived in about 5 s
        "recaptcha_enterprise": (20.0, 60.0),
        "turnstile": (5.0, 15.0),
        "hcaptcha": (10.0, 30.0),
        "geetest": (10.0, 25.0),
        "geetest_v4": (10.0, 25.0),
        "image": (3.0, 10.0),
        "grid": (5.0, 15.0),
    }
)


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1")


def _check_range(name: str, value: tuple[float, float]) -> None:
    low, high = value
    if not (0.0 <= low <= high) or math.isinf(high):
        raise ValueError(f"{name} must be a finite range 0 <= low <= high")


@dataclass(frozen=True)
class Faults:
    """Fault-injection knobs; each can be changed at runtime over ``/_emulator/faults``.

    Attributes
    ----------
    pingback_style
        ``cai-get`` or ``2c-post``.
    pingback_drop_rate
        Fraction of pingbacks never sent (the task still solves; only polling finds it).
    pingback_duplicate_rate
        Fraction of pingbacks sent twice.
    pingback_delay
        Uniform (low, high) seconds between solving and sending.
    pingback_late_rate, pingback_late_delay
        Fraction of pingbacks delayed by an extra ``pingback_late_delay`` seconds (past a
        receiver's patience threshold).
    pingback_reorder_window
        Seconds to hold pingbacks and release them in shuffled order (0 = in order).
    pingback_retries, pingback_retry_delay
        Extra attempts after a connection failure or 5xx (0 = none, like the real service).
    pingback_timeout
        Seconds before one delivery attempt is abandoned.
    pingback_errors
        Send ``code=ERROR_CAPTCHA_UNSOLVABLE`` for unsolvable tasks.
    res_502_rate, in_502_rate
        Fraction of ``res.php`` / ``in.php`` requests answered with an HTML 502 page.
    plain_error_rate
        Fraction of error replies sent as plain text even though ``json=1`` was asked for.
    server_error_rate
        Fraction of requests answered ``ERROR_SERVER_ERROR``.
    """

    pingback_style: PingbackStyle = PingbackStyle.CAI_GET
    pingback_drop_rate: float = 0.0
    pingback_duplicate_rate: float = 0.0
    pingback_delay: tuple[float, float] = (0.0, 0.0)
    pingback_late_rate: float = 0.0
    pingback_late_delay: float = 0.0
    pingback_reorder_window: float = 0.0
    pingback_retries: int = 0
    pingback_retry_delay: float = 1.0
    pingback_timeout: float = 5.0
    pingback_errors: bool = True
    res_502_rate: float = 0.0
    in_502_rate: float = 0.0
    plain_error_rate: float = 0.0
    server_error_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in (
            "pingback_drop_rate",
            "pingback_duplicate_rate",
            "pingback_late_rate",
            "res_502_rate",
            "in_502_rate",
            "plain_error_rate",
            "server_error_rate",
        ):
            _check_rate(name, getattr(self, name))
        _check_range("pingback_delay", self.pingback_delay)
        if self.pingback_retries < 0 or self.pingback_timeout <= 0:
            raise ValueError("pingback_retries must be >= 0 and pingback_timeout > 0")
        for name in ("pingback_late_delay", "pingback_reorder_window", "pingback_retry_delay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    def updated(self, changes: Mapping[str, Any]) -> Faults:
        """Return a copy with ``changes`` applied (JSON values coerced), validating them.

        Raises
        ------
        ValueError
            On an unknown knob or an invalid value.
        """
        known = {item.name for item in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown fault knobs: {sorted(unknown)}")
        coerced: dict[str, Any] = {}
        for name, value in changes.items():
            if name == "pingback_style":
                coerced[name] = PingbackStyle(value)
            elif name == "pingback_delay":
                low, high = value
                coerced[name] = (float(low), float(high))
            elif name == "pingback_retries":
                coerced[name] = int(value)
            elif name == "pingback_errors":
                coerced[name] = bool(value)
            else:
                coerced[name] = float(value)
        return replace(self, **coerced)

    def as_json(self) -> dict[str, Any]:
        """Return the knobs as a JSON-serialisable mapping."""
        return {
            item.name: (
                list(getattr(self, item.name))
                if item.name == "pingback_delay"
                else getattr(self, item.name)
            )
            for item in fields(self)
        }


@dataclass(frozen=True)
class EmulatorConfig:
    """Everything that shapes the emulated account; read once at start-up.

    Attributes
    ----------
    seed
        Seed for ids, tokens, solve times and fault decisions (``None``: random). The same
        seed and the same request sequence give the same replies.
    api_keys
        Keys that exist; any other 32-character key gets ``ERROR_KEY_DOES_NOT_EXIST``.
    threads
        Concurrent solves (CaptchaAI sells threads); ``threadsinfo`` reports it.
    busy
        What a submit gets while every thread is busy.
    unsolvable_rate
        Fraction of tasks that end in ``ERROR_CAPTCHA_UNSOLVABLE``.
    solve_times
        Uniform (low, high) seconds per solve kind (see :data:`SOLVE_KINDS`).
    solve_time_scale
        Factor applied to every solve time (0.001 turns seconds into milliseconds).
    retention_seconds
        How long a finished task's result stays readable; afterwards ``res.php`` answers
        ``ERROR_WRONG_CAPTCHA_ID`` and the task's accounting is dropped (bounded memory).
    max_tasks
        Hard cap on remembered tasks; the oldest finished ones are evicted first.
    id_type
        Integer or string task ids in JSON submit replies.
    balance, price
        Starting balance and the amount charged per solved task.
    report_window_seconds
        Reports later than this after solving get ``ERROR_REPORT_NOT_RECORDED``.
    max_user_turn
        Enable ``MAX_USER_TURN``: more than ``max_user_turn_limit`` ``in.php`` requests within
        ``max_user_turn_window`` seconds ban submits for ``max_user_turn_ban`` seconds.
    res_rate_limit
        Enable ``ERROR: 1005``: within ``res_limit_window`` seconds, more than
        ``res_limit_per_task`` x tasks + ``res_limit_base`` ``res.php`` requests (getbalance
        included) block ``res.php`` for ``res_limit_block`` seconds.
    ban_after_bad_keys, ban_seconds
        After this many wrong-key requests from one IP, answer ``IP_BANNED`` (0 disables).
    bulk_max_ids
        Most ids one bulk ``get`` accepts (no documented maximum; more is
        ``ERROR_BAD_PARAMETERS``).
    user_agent
        The user agent returned with Enterprise answers.
    pingback_hosts
        Host names pingbacks may be sent to besides loopback (e.g. a receiver Service's name
        inside a test cluster). Read once: unlike the faults, never changeable at runtime, so
        nothing can point the emulator at an arbitrary address later.
    faults
        The initial fault-injection knobs.
    """

    seed: int | None = None
    api_keys: frozenset[str] = frozenset({DEFAULT_API_KEY})
    threads: int = 50
    busy: BusyBehaviour = BusyBehaviour.ZERO_BALANCE
    unsolvable_rate: float = 0.0
    solve_times: Mapping[str, tuple[float, float]] = field(
        default_factory=lambda: dict(DEFAULT_SOLVE_TIMES)
    )
    solve_time_scale: float = 1.0
    retention_seconds: float = 900.0
    max_tasks: int = 100_000
    id_type: IdType = IdType.INT
    balance: float = 100.0
    price: float = 0.001
    report_window_seconds: float = 900.0
    max_user_turn: bool = False
    max_user_turn_limit: int = 60
    max_user_turn_window: float = 3.0
    max_user_turn_ban: float = 10.0
    res_rate_limit: bool = False
    res_limit_per_task: int = 20
    res_limit_base: int = 1200
    res_limit_window: float = 60.0
    res_limit_block: float = 300.0
    ban_after_bad_keys: int = 0
    ban_seconds: float = 300.0
    bulk_max_ids: int = 100
    user_agent: str = (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
    )
    pingback_hosts: frozenset[str] = frozenset()
    faults: Faults = Faults()

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError("threads must be >= 1")
        _check_rate("unsolvable_rate", self.unsolvable_rate)
        unknown = set(self.solve_times) - set(SOLVE_KINDS)
        if unknown:
            raise ValueError(f"unknown solve kinds: {sorted(unknown)}")
        for kind, value in self.solve_times.items():
            _check_range(f"solve_times[{kind}]", value)
        if self.solve_time_scale < 0 or self.retention_seconds < 0 or self.max_tasks < 1:
            raise ValueError("scale and retention must be >= 0, max_tasks >= 1")
        if self.bulk_max_ids < 1:
            raise ValueError("bulk_max_ids must be >= 1")

    def solve_range(self, kind: str) -> tuple[float, float]:
        """Return the scaled (low, high) solve time for ``kind``."""
        low, high = self.solve_times.get(kind, DEFAULT_SOLVE_TIMES[kind])
        return low * self.solve_time_scale, high * self.solve_time_scale
