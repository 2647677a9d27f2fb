"""Classification of every solver-API status and error code into one of a few verdicts.

The solver API (``in.php``/``res.php``, shared by CaptchaAI and 2captcha) answers with free-form
codes. Callers must not branch on those strings: they branch on a :class:`Verdict` and, for
*retry later*, on the wait the provider documents. This module is the single table that turns a
code into that decision, for both dialects, and it is pure (no I/O, no clock).

The table follows ``provider-api.md`` section 4. Where the sources disagree or say nothing, the
decision taken is written next to the entry; the module docstring of :mod:`captchatask.provider`
summarises them. The verdicts are:

``not_ready``
    The task is still being solved: poll again after the wait.
``retry_later``
    Transient: wait ``wait_seconds`` (the documented wait), then repeat the same request.
``task_failed``
    Permanent for this task (or this request's input); other tasks are unaffected and a *new*
    task may be submitted.
``config_error``
    The account, key or client configuration is wrong: stop submitting and surface it on the
    provider. ``wait_seconds``, when set, is how long before a probe may succeed again.
``unknown``
    An undocumented code. It is handled exactly like ``retry_later`` with a conservative wait
    (see :attr:`Classification.effective_verdict`), but kept distinct so that it can be counted
    and alerted on instead of silently looping.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Literal

__all__ = [
    "CONNECT_ERROR",
    "HTTP_5XX",
    "NOT_READY",
    "POLL_INTERVAL_SECONDS",
    "TRANSPORT_ERROR",
    "UNPARSEABLE_REPLY",
    "Classification",
    "Dialect",
    "Endpoint",
    "Verdict",
    "classify",
    "first_poll_delay",
    "known_codes",
]


class Dialect(StrEnum):
    """Which provider's reading of the shared protocol applies."""

    CAPTCHAAI = "captchaai"
    TWOCAPTCHA = "2captcha"


class Verdict(StrEnum):
    """What the caller should do with a reply; see the module docstring."""

    NOT_READY = "not_ready"
    RETRY_LATER = "retry_later"
    TASK_FAILED = "task_failed"
    CONFIG_ERROR = "config_error"
    UNKNOWN = "unknown"


Endpoint = Literal["in", "res"]

NOT_READY: Final = "CAPCHA_NOT_READY"
"""The canonical not-ready status (sic, no "T"); ``CAPTCHA_NOT_READY`` is accepted too."""

TRANSPORT_ERROR: Final = "TRANSPORT_ERROR"
"""Pseudo-code for a request that failed after it may have been sent (timeout, reset, no reply)."""
CONNECT_ERROR: Final = "CONNECT_ERROR"
"""Pseudo-code for a connection that could not be opened (refused, DNS, TLS): nothing was sent."""
HTTP_5XX: Final = "HTTP_5XX"
"""Pseudo-code for an HTML 5xx page instead of an API reply."""
UNPARSEABLE_REPLY: Final = "UNPARSEABLE_REPLY"
"""Pseudo-code for a 200 reply that is neither a known plain-text shape nor API JSON."""

POLL_INTERVAL_SECONDS: Final = 5.0
"""Both providers say: poll every 5 seconds ("Make 5 seconds timeout and repeat")."""

# Documented waits, in seconds. Each name says where the number comes from.
_WAIT_NO_SLOT: Final = 5.0  # 2captcha limits page: ERROR_NO_SLOT_AVAILABLE -> 5 s
_WAIT_ZERO_BALANCE: Final = 60.0  # 2captcha limits page: ERROR_ZERO_BALANCE -> 60 s
_WAIT_MAX_USER_TURN: Final = 10.0  # 2captcha: >60 in.php requests in 3 s -> 10 s ban
_WAIT_SERVER_ERROR: Final = 10.0  # CaptchaAI docs: "retry after ~10s with backoff"
_WAIT_HTTP_5XX: Final = 5.0  # 2captcha: HTML 500/502 -> "make a 5 seconds timeout"
_WAIT_IP_BANNED: Final = 300.0  # both docs: "Ban will be automatically lifted after 5 minutes"
_WAIT_PROXY_RETRY: Final = 5.0  # CaptchaAI SDK: keeps polling at the poll interval
_WAIT_UNKNOWN_IN: Final = 60.0  # decision: as long as the longest plain in.php back-off
_WAIT_UNKNOWN_RES: Final = 30.0  # decision: six poll intervals; a deadline still bounds it
_WAIT_UNKNOWN_BLOCK: Final = 600.0  # decision: the longest documented "ERROR: NNNN" block

_BLOCK_SECONDS: Final[dict[int, float]] = {
    1001: 600.0,  # 120 ERROR_NO_SLOT_AVAILABLE in one minute -> 10 min
    1002: 300.0,  # 120 ERROR_ZERO_BALANCE in one minute -> 5 min
    1003: 30.0,  # too many NO_SLOT relative to uploads -> 30 s
    1004: 600.0,  # IP blocked after 5 requests with an incorrect key -> 10 min
    1005: 300.0,  # res.php requests R > 20*C + 1200 -> 5 min
}
_BLOCK_CODE: Final = re.compile(r"^ERROR:\s*(\d+)$")


@dataclass(frozen=True)
class Classification:
    """The decision for one reply code.

    Attributes
    ----------
    verdict
        What to do (see :class:`Verdict`).
    code
        The code as received (stripped), or one of the pseudo-codes for transport failures.
    wait_seconds
        The documented wait before repeating the request (``None`` when waiting cannot help).
    reason
        A short human sentence; never contains request data such as the API key.
    """

    verdict: Verdict
    code: str
    wait_seconds: float | None
    reason: str

    @property
    def effective_verdict(self) -> Verdict:
        """The verdict to act on: ``unknown`` is acted on as ``retry_later``."""
        if self.verdict is Verdict.UNKNOWN:
            return Verdict.RETRY_LATER
        return self.verdict


@dataclass(frozen=True)
class _Rule:
    verdict: Verdict
    wait_seconds: float | None
    reason: str


def _fail(reason: str) -> _Rule:
    return _Rule(Verdict.TASK_FAILED, None, reason)


def _stop(reason: str, wait: float | None = None) -> _Rule:
    return _Rule(Verdict.CONFIG_ERROR, wait, reason)


def _retry(reason: str, wait: float) -> _Rule:
    return _Rule(Verdict.RETRY_LATER, wait, reason)


# Codes whose meaning does not depend on dialect or endpoint.
_COMMON: Final[dict[str, _Rule]] = {
    NOT_READY: _Rule(Verdict.NOT_READY, POLL_INTERVAL_SECONDS, "not solved yet"),
    # Accepted defensively, as CaptchaAI's own diagnostic client does.
    "CAPTCHA_NOT_READY": _Rule(Verdict.NOT_READY, POLL_INTERVAL_SECONDS, "not solved yet"),
    "ERROR_WRONG_USER_KEY": _stop("API key has the wrong format (must be 32 characters)"),
    # CaptchaAI: may also mean the account has no plan/threads; either way nothing to retry.
    "ERROR_KEY_DOES_NOT_EXIST": _stop("API key does not exist or the account has no plan"),
    "ERROR_NO_SLOT_AVAILABLE": _retry("no free slot or queue too long", _WAIT_NO_SLOT),
    # Request-input errors are per task: a bad spec must not stop the whole provider.
    "ERROR_PAGEURL": _fail("pageurl is missing or invalid"),
    "ERROR_GOOGLEKEY": _fail("sitekey is blank or malformed"),
    "ERROR_WRONG_GOOGLEKEY": _fail("sitekey is missing or malformed"),
    "ERROR_BAD_TOKEN_OR_PAGEURL": _fail("sitekey and pageurl do not belong together"),
    "ERROR_BAD_PARAMETERS": _fail("required parameters are missing or malformed"),
    "ERROR_ZERO_CAPTCHA_FILESIZE": _fail("image is too small"),
    "ERROR_TOO_BIG_CAPTCHA_FILESIZE": _fail("image is too large"),
    "ERROR_IMAGE_DIMENSIONS_TOO_LARGE": _fail("image dimensions are too large"),
    "ERROR_WRONG_FILE_EXTENSION": _fail("image file type is not accepted"),
    "ERROR_IMAGE_TYPE_NOT_SUPPORTED": _fail("image type is not recognised"),
    "ERROR_UPLOAD": _fail("upload was malformed or base64 invalid"),
    "ERROR_CAPTCHAIMAGE_BLOCKED": _fail("image was marked unrecognisable"),
    "ERROR_EMPTY_CAPTCHA": _fail("captcha input was empty (unconfirmed code)"),
    "ERROR_DOMAIN_NOT_ALLOWED": _fail("domain is not allowed (unconfirmed code)"),
    "TOO_MANY_BAD_IMAGES": _stop("too many unrecognisable images: investigate"),
    "ERROR_IP_NOT_ALLOWED": _stop("this IP is not on the account's allow-list"),
    "IP_BANNED": _stop(
        "IP banned after wrong-key attempts; lifted after 5 minutes", _WAIT_IP_BANNED
    ),
    "ERROR_IP_BLOCKED": _stop("IP blocked by the provider", _WAIT_IP_BANNED),
    # No per-task proxy exists in the CaptchaTask spec, so a proxy is provider configuration.
    "ERROR_PROXY_FORMAT": _stop("proxy has the wrong format"),
    "ERROR_BAD_PROXY": _fail("proxy was marked bad; resubmit through another proxy"),
    "MAX_USER_TURN": _retry("more than 60 in.php requests within 3 s", _WAIT_MAX_USER_TURN),
    "ERROR_SERVER_ERROR": _retry("transient provider error", _WAIT_SERVER_ERROR),
    "ERROR_INTERNAL_SERVER_ERROR": _retry("transient provider error", _WAIT_SERVER_ERROR),
    "ERROR_CAPTCHA_UNSOLVABLE": _fail("workers could not solve the captcha"),
    "ERROR_BAD_DUPLICATES": _fail("not enough matching answers (100% accuracy mode)"),
    # A malformed or unknown id is permanent for that id: polling it again cannot help.
    "ERROR_WRONG_ID_FORMAT": _fail("task id is not numeric"),
    "ERROR_WRONG_CAPTCHA_ID": _fail("task id is unknown or its result expired"),
    "ERROR_NO_SUCH_CAPCHA_ID": _fail("task id is unknown or its result expired"),
    "ERROR_TASK_ABSENT": _fail("task is absent"),
    "ERROR_TASK_NOT_SUPPORTED": _fail("task type is not supported"),
    "ERROR_NO_SUCH_METHOD": _fail("method is not supported by this provider"),
    "ERROR_EMPTY_ACTION": _fail("request carried no action (client bug)"),
    "ERROR_TOKEN_EXPIRED": _fail("GeeTest challenge expired"),
    # Report refusals concern only that report; callers ignore them.
    "ERROR_REPORT_NOT_RECORDED": _fail("report refused (too late or too many complaints)"),
    "REPORT_NOT_RECORDED": _fail("report refused (too late or too many complaints)"),
    "ERROR_DUPLICATE_REPORT": _fail("task was already reported"),
    "ERROR_IP_ADDRES": _stop("pingback registration must come from the pingback IP"),
    TRANSPORT_ERROR: _retry("provider unreachable or timed out", _WAIT_HTTP_5XX),
    CONNECT_ERROR: _retry("no connection to the provider; nothing was sent", _WAIT_HTTP_5XX),
    HTTP_5XX: _retry("provider answered with an HTTP 5xx page", _WAIT_HTTP_5XX),
    UNPARSEABLE_REPLY: _retry("provider reply could not be parsed", _WAIT_HTTP_5XX),
}

_ZERO_BALANCE: Final = "ERROR_ZERO_BALANCE"
_PROXY_FAILED: Final = "ERROR_PROXY_CONNECTION_FAILED"


def _dialect_rule(code: str, *, dialect: Dialect, endpoint: Endpoint) -> _Rule | None:
    if code == _ZERO_BALANCE:
        if dialect is Dialect.CAPTCHAAI:
            # CaptchaAI redefines it as "no free threads". The only documented wait is 60 s;
            # it also keeps a fleet far below the "120 per minute" ERROR: 1002 trigger.
            return _retry("all account threads are busy", _WAIT_ZERO_BALANCE)
        return _stop("account balance is zero", _WAIT_ZERO_BALANCE)
    if code == _PROXY_FAILED:
        if endpoint == "in" or dialect is Dialect.CAPTCHAAI:
            # CaptchaAI's SDK retries it on submit and keeps polling on res.php.
            return _retry("solver could not reach the page through the proxy", _WAIT_PROXY_RETRY)
        return _fail("proxy failed for this task; resubmit with another proxy")
    return None


def classify(code: str, *, dialect: Dialect, endpoint: Endpoint) -> Classification:
    """Classify one reply code.

    Parameters
    ----------
    code
        The code from the reply (``request`` of a ``status: 0`` JSON reply, or the plain-text
        body), or one of the pseudo-codes :data:`TRANSPORT_ERROR`, :data:`HTTP_5XX`,
        :data:`UNPARSEABLE_REPLY`.
    dialect
        The provider; ``ERROR_ZERO_BALANCE`` and ``ERROR_PROXY_CONNECTION_FAILED`` depend on it.
    endpoint
        ``"in"`` or ``"res"``; unknown codes get a different conservative wait on each.

    Returns
    -------
    Classification
        Always a value, never an exception: an unknown code yields ``Verdict.UNKNOWN`` with a
        conservative wait, so a polling loop can never crash on a new code.
    """
    stripped = code.strip()
    rule = _dialect_rule(stripped, dialect=dialect, endpoint=endpoint) or _COMMON.get(stripped)
    if rule is not None:
        return Classification(rule.verdict, stripped, rule.wait_seconds, rule.reason)
    block = _BLOCK_CODE.match(stripped)
    if block is not None:
        number = int(block.group(1))
        if number in _BLOCK_SECONDS:
            return Classification(
                Verdict.RETRY_LATER,
                stripped,
                _BLOCK_SECONDS[number],
                f"temporarily blocked for violating request limits ({number})",
            )
        return Classification(
            Verdict.UNKNOWN, stripped, _WAIT_UNKNOWN_BLOCK, "undocumented block code"
        )
    wait = _WAIT_UNKNOWN_IN if endpoint == "in" else _WAIT_UNKNOWN_RES
    return Classification(Verdict.UNKNOWN, stripped, wait, "undocumented reply code")


def known_codes() -> frozenset[str]:
    """Return every literal code the table knows (for tests and documentation)."""
    documented = {_ZERO_BALANCE, _PROXY_FAILED, *_COMMON}
    documented.update(f"ERROR: {number}" for number in _BLOCK_SECONDS)
    return frozenset(documented)


# First-poll delays per CaptchaTask type. CaptchaAI: the official SDK 1.0.1 registry;
# 2captcha: its "Request limits" section. HCaptcha appears in neither current source: it is
# treated like the other token captchas (decision).
_FIRST_POLL_CAPTCHAAI: Final[dict[str, float]] = {
    "RecaptchaV2": 15.0,
    "RecaptchaEnterprise": 15.0,  # the SDK's v2 Enterprise row; v3 Enterprise would be 10
    "RecaptchaV3": 10.0,
    "Turnstile": 10.0,
    "HCaptcha": 10.0,
    "GeeTest": 15.0,
    "GeeTestV4": 15.0,
    "Image": 1.0,
}
_FIRST_POLL_2CAPTCHA: Final[dict[str, float]] = {
    "RecaptchaV2": 20.0,  # "20 seconds for reCAPTCHA" (overview; 15-20 s in the limits table)
    "RecaptchaEnterprise": 20.0,
    "RecaptchaV3": 15.0,  # "10-15 s for v3": the upper bound, to save a wasted poll
    "Turnstile": 5.0,
    "HCaptcha": 5.0,
    "GeeTest": 5.0,
    "GeeTestV4": 5.0,
    "Image": 5.0,
}
_FIRST_POLL_DEFAULT: Final = 15.0  # unknown type: the longest common delay


def first_poll_delay(task_type: str, *, dialect: Dialect = Dialect.CAPTCHAAI) -> float:
    """Return how long a poll-only client waits after submit before the first ``res.php``.

    Parameters
    ----------
    task_type
        A ``CaptchaTask`` ``spec.type`` value such as ``"RecaptchaV2"``.
    dialect
        The provider whose documented delays apply.

    Returns
    -------
    float
        Seconds; polls earlier than this only cost rate-limit budget (``ERROR: 1005``).
    """
    table = _FIRST_POLL_CAPTCHAAI if dialect is Dialect.CAPTCHAAI else _FIRST_POLL_2CAPTCHA
    return table.get(task_type, _FIRST_POLL_DEFAULT)
