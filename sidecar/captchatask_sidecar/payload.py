"""From an aiohttp request to one :class:`Pingback`: every wire shape, read and parsed strictly.

The one place that knows how a provider delivers a result; the route in
:mod:`~captchatask_sidecar.pingback` authenticates the path, calls :func:`read_pingback`, turns
the pingback into a ledger :class:`~captchatask.decision.Result` with :meth:`Pingback.to_result`
and hands it to the recorder. Accepted shapes (``provider-api.md`` section 3):

* CaptchaAI: ``GET <url>?id=<task id>&code=<answer or ERROR_...>`` (also a ``POST`` with an
  empty body to such a URL: CaptchaAI appends the fields to any URL);
* 2captcha: ``POST`` with the same two fields, urlencoded (UTF-8) or ``multipart/form-data``;
* Anti-Captcha style JSON, the body of ``getTaskResult``:
  ``{"taskId": .., "errorId": 0, "status": "ready", "solution": {"gRecaptchaResponse" |
  "token" | "text": .., "userAgent": ..}}`` or ``{"errorId": 12, "errorCode": "ERROR_..."}``.

Anything else is refused with a :class:`PingbackError` that carries the HTTP status to answer:
a missing or repeated field, an id that is not a provider task id, an empty or oversize answer,
a field that is not UTF-8 text (a ``%FF`` escape, a raw byte 0xFF, a lone surrogate) or JSON
nested deeper than the parser recurses (400), a body over the limit (413) or too slow to
arrive (408), an unknown media type (415), a code that is no final result (422). The limits
are the CRD's, so a result accepted here always fits the ledger. Text is decoded strictly, never
with replacement characters: a token we could only keep mangled is refused (the fallback poll
still fetches the real one), so what is recorded as the solution is what the provider sent.
Below :func:`read_pingback` the parsers are pure functions of bytes and fields.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Final
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import MultiDictProxy

from captchatask.decision import Result
from captchatask.model import DeliveredBy
from captchatask.provider import codes

#: The CRD's ``spec.providerTaskId`` pattern (and what both providers issue: digits).
PROVIDER_TASK_ID_RE: Final = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
#: The CRD's ``status.solution.token`` / ``payload.code`` limit.
MAX_CODE_CHARS: Final = 65536
#: The CRD's ``status.failure.code`` limit.
MAX_ERROR_CODE_CHARS: Final = 128
#: The CRD's ``status.solution.userAgent`` limit.
MAX_USER_AGENT_CHARS: Final = 1024
#: Field names a form pingback may carry a user agent under (not documented; tolerated).
USER_AGENT_FIELDS: Final = ("userAgent", "useragent", "user_agent")
#: Anti-Captcha's solution keys, most specific first.
SOLUTION_KEYS: Final = ("gRecaptchaResponse", "token", "text")
#: A form pingback has two fields; anything far beyond that is not a pingback.
MAX_FIELDS: Final = 16
FORM: Final = "application/x-www-form-urlencoded"
MULTIPART: Final = "multipart/form-data"
JSON_TYPES: Final = frozenset({"application/json", "text/json"})
#: The answer to a field that is not UTF-8 text (decoded strictly, never with replacements).
NOT_UTF8: Final = "a field is not UTF-8"


class Source(StrEnum):
    """How a pingback arrived (the dead-letter CRD's ``payload.source`` enum)."""

    GET = "get"
    FORM = "form"
    MULTIPART = "multipart"
    JSON = "json"


class PingbackError(ValueError):
    """The request is not an acceptable pingback; nothing was written.

    :attr:`status` is the HTTP status to answer, :attr:`detail` the text to show the sender
    (safe: it never echoes the request).
    """

    status: ClassVar[int] = 400

    @property
    def detail(self) -> str:
        """What the problem document says."""
        return str(self)


class MalformedPingbackError(PingbackError):
    """The request is not a well-formed pingback; the message is safe to show the sender."""


class NotAResultError(PingbackError):
    """An authentic pingback whose code is not a final result.

    ``CAPCHA_NOT_READY``, a rate limit or an undocumented code: fallback polling settles the
    task instead.
    """

    status: ClassVar[int] = 422

    @property
    def detail(self) -> str:
        """Terse on purpose: the classification stays in the log, not in the answer."""
        return "not a final result"


class BodyTooLargeError(PingbackError):
    """The body is over the limit (checked from ``Content-Length`` before reading)."""

    status: ClassVar[int] = 413


class BodyTimeoutError(PingbackError):
    """The body took longer than the read timeout to arrive."""

    status: ClassVar[int] = 408


class UnsupportedMediaTypeError(PingbackError):
    """A body of a media type no provider sends."""

    status: ClassVar[int] = 415


@dataclass(frozen=True, slots=True)
class Pingback:
    """One well-formed pingback (authenticity is checked from the path, not here)."""

    provider_task_id: str
    code: str
    source: Source
    user_agent: str | None = None
    error: bool = False

    def to_result(self, *, dialect: codes.Dialect) -> Result:
        """Turn the pingback into a ledger :class:`Result`.

        ``ERROR_...`` codes are classified like the operator classifies ``res.php`` replies:
        a per-task failure becomes ``Result.failed``; anything else is not a result.

        Raises
        ------
        NotAResultError
            The code is a status or account-level error, not this task's outcome.
        """
        return result_of(
            self.provider_task_id,
            self.code,
            user_agent=self.user_agent,
            error=self.error,
            dialect=dialect,
        )


def result_of(
    provider_task_id: str,
    code: str,
    *,
    user_agent: str | None,
    error: bool,
    dialect: codes.Dialect,
) -> Result:
    """:meth:`Pingback.to_result` from the pingback's fields (see there).

    Raises
    ------
    NotAResultError
        The code is a status or account-level error, not this task's outcome.
    """
    if error or is_error_code(code):
        verdict = codes.classify(code, dialect=dialect, endpoint="res")
        if verdict.verdict is not codes.Verdict.TASK_FAILED:
            raise NotAResultError(f"{verdict.verdict}: not a final result")
        if len(verdict.code) > MAX_ERROR_CODE_CHARS:
            raise MalformedPingbackError("malformed code")
        return Result.failed(
            code=verdict.code,
            message=verdict.reason,
            delivered_by=DeliveredBy.PINGBACK,
            provider_task_id=provider_task_id,
        )
    return Result.solved(
        token=code,
        delivered_by=DeliveredBy.PINGBACK,
        provider_task_id=provider_task_id,
        user_agent=user_agent,
    )


@functools.cache
def _known_codes() -> frozenset[str]:
    return codes.known_codes()


def is_error_code(code: str) -> bool:
    """Whether a pingback ``code`` is a status/error code rather than an answer."""
    return code.startswith("ERROR") or code in _known_codes()


def _task_id(value: object) -> str:
    if isinstance(value, bool):
        raise MalformedPingbackError("malformed id")
    if isinstance(value, int) and value >= 0:
        value = str(value)
    if not isinstance(value, str) or not PROVIDER_TASK_ID_RE.fullmatch(value):
        raise MalformedPingbackError("malformed id")
    return value


def _code(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_CODE_CHARS:
        raise MalformedPingbackError("malformed code")
    return value


def _user_agent(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_USER_AGENT_CHARS:
        raise MalformedPingbackError("malformed user agent")
    return value


def from_fields(pairs: Iterable[tuple[str, str]], *, source: Source) -> Pingback:
    """Parse ``id``/``code`` (+ optional user agent) from query or form fields.

    Raises
    ------
    MalformedPingbackError
        A field is missing, repeated or malformed.
    """
    task_id, code, agent = _fields(pairs)
    return Pingback(provider_task_id=task_id, code=code, source=source, user_agent=agent)


def _fields(pairs: Iterable[tuple[str, str]]) -> tuple[str, str, str | None]:
    """The provider task id, code and user agent of query or form fields, checked."""
    seen: dict[str, str] = {}
    for count, (key, value) in enumerate(pairs, start=1):
        if count > MAX_FIELDS:
            raise MalformedPingbackError("too many fields")
        if key in seen:
            raise MalformedPingbackError(f"repeated field {key!r}"[:64])
        seen[key] = value
    if "id" not in seen or "code" not in seen:
        raise MalformedPingbackError("id and code are required")
    agent: str | None = None
    for name in USER_AGENT_FIELDS:
        if name in seen:
            agent = _user_agent(seen[name])
            break
    return _task_id(seen["id"]), _code(seen["code"]), agent


def query_fields(raw: str) -> list[tuple[str, str]] | None:
    """Split a raw query string into fields when that needs no decoding; ``None`` otherwise.

    The hot path of a GET pingback: without any ``%`` escape, decoding is only ``+`` -> space,
    and the result is exactly what the framework's own parser (``yarl``, which follows
    ``urllib.parse.parse_qsl(..., keep_blank_values=True)``) returns, without building its
    multidict. With an escape the caller falls back to the framework's parser.
    """
    if "%" in raw:
        return None
    fields: list[tuple[str, str]] = []
    for pair in raw.replace("+", " ").split("&"):
        if pair:
            key, _, value = pair.partition("=")
            fields.append((key, value))
    return fields


def from_json(raw: bytes) -> Pingback:
    """Parse an Anti-Captcha style JSON pingback.

    Raises
    ------
    MalformedPingbackError
        Not JSON, not an object, or missing the fields of a finished task.
    """
    try:
        body: Any = json.loads(raw)
    except RecursionError as exc:
        # Authentic but absurd (a pingback is three levels deep): the parser's recursion limit
        # is the bound, and hitting it is the sender's error, not ours.
        raise MalformedPingbackError("JSON nested too deeply") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedPingbackError("malformed JSON") from exc
    if not isinstance(body, Mapping):
        raise MalformedPingbackError("JSON body must be an object")
    task_id = _task_id(body.get("taskId", body.get("id")))
    error_id = body.get("errorId", 0)
    if isinstance(error_id, bool) or not isinstance(error_id, int):
        raise MalformedPingbackError("malformed errorId")
    if error_id != 0:
        code = body.get("errorCode")
        if not isinstance(code, str) or not code or len(code) > MAX_ERROR_CODE_CHARS:
            raise MalformedPingbackError("errorCode is required when errorId is not 0")
        return Pingback(
            provider_task_id=task_id, code=_unicode_text(code), source=Source.JSON, error=True
        )
    if body.get("status") != "ready":
        raise MalformedPingbackError("status must be 'ready'")
    solution = body.get("solution")
    if not isinstance(solution, Mapping):
        raise MalformedPingbackError("solution is required")
    for key in SOLUTION_KEYS:
        if key in solution:
            agent = _user_agent(solution.get("userAgent"))
            return Pingback(
                provider_task_id=task_id,
                code=_unicode_text(_code(solution[key])),
                source=Source.JSON,
                user_agent=None if agent is None else _unicode_text(agent),
            )
    raise MalformedPingbackError("solution has no answer")


async def read_pingback(
    request: web.Request, *, max_body_bytes: int, read_timeout: float
) -> Pingback:
    """Read and parse the pingback a request carries, whatever its shape.

    Raises
    ------
    PingbackError
        The request is refused; its ``status`` says with what.
    """
    if request.method == "GET":
        return from_query(request)
    length = request.content_length
    if length is not None and length > max_body_bytes:
        raise BodyTooLargeError("body too large")
    content_type = request.content_type
    try:
        async with asyncio.timeout(read_timeout):
            if content_type == MULTIPART:
                return from_fields(_form_fields(await request.post()), source=Source.MULTIPART)
            raw = await request.read()
    except TimeoutError as exc:
        raise BodyTimeoutError("request timeout") from exc
    except web.HTTPRequestEntityTooLarge as exc:
        raise BodyTooLargeError("body too large") from exc
    except (ValueError, web.HTTPException, web.RequestPayloadError) as exc:
        # Malformed multipart, a body that does not decode with its Content-Encoding, or a
        # multipart form without its fields: all answered alike.
        raise MalformedPingbackError("malformed body") from exc
    if content_type in JSON_TYPES or content_type.endswith("+json"):
        return from_json(raw)
    if not raw:
        # A POST to a URL that carries ?id=&code= (CaptchaAI appends them to any URL).
        return from_fields(_query(request), source=Source.GET)
    if content_type in (FORM, "application/octet-stream", "text/plain"):
        return from_fields(_parse_form(raw), source=Source.FORM)
    raise UnsupportedMediaTypeError("unsupported media type")


def _unicode_text(value: str) -> str:
    """``value`` if it encodes as UTF-8 (a JSON escape of a lone surrogate makes one that won't).

    Such a string cannot be spooled, stored in the ledger or handed to a browser: refused.
    """
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise MalformedPingbackError(NOT_UTF8) from exc
    return value


def from_query(request: web.Request) -> Pingback:
    """The pingback of a GET (``?id=&code=``): no body, so nothing to await.

    :func:`read_pingback` does the same for a GET; the pingback route calls
    :func:`result_from_query` for the most common shape, without the coroutine (the spool path
    is CPU-bound per request).

    Raises
    ------
    MalformedPingbackError
        A field is missing, repeated or malformed.
    """
    return from_fields(_query(request), source=Source.GET)


def result_from_query(request: web.Request, *, dialect: codes.Dialect) -> Result:
    """``from_query(request).to_result(dialect=dialect)`` without the :class:`Pingback`.

    The spool path's hot spot (every ``GET`` pingback, all CPU work on one event loop): the same
    checks, one frozen object fewer to build per pingback.

    Raises
    ------
    PingbackError
        Malformed (400) or not a final result (422).
    """
    task_id, code, agent = _fields(_query(request))
    return result_of(task_id, code, user_agent=agent, error=False, dialect=dialect)


def _query(request: web.Request) -> Iterable[tuple[str, str]]:
    raw = request.rel_url.raw_query_string
    fields = query_fields(raw)
    if fields is not None:
        return fields
    # Not the framework's ``request.query``: it decodes ``%FF`` to U+FFFD, which would record
    # a token the provider never sent.
    try:
        return parse_qsl(raw, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError as exc:
        raise MalformedPingbackError(NOT_UTF8) from exc


def _parse_form(raw: bytes) -> list[tuple[str, str]]:
    try:
        text = raw.decode("utf-8")
        return parse_qsl(
            text, keep_blank_values=True, strict_parsing=True, max_num_fields=16, errors="strict"
        )
    except UnicodeDecodeError as exc:
        raise MalformedPingbackError(NOT_UTF8) from exc
    except ValueError as exc:
        raise MalformedPingbackError("malformed form body") from exc


def _form_fields(
    form: MultiDictProxy[str | bytes | bytearray | web.FileField],
) -> Iterable[tuple[str, str]]:
    for key, value in form.items():
        if not isinstance(value, str):
            raise MalformedPingbackError("unexpected file field")
        yield key, value
