"""Asynchronous client for the ``in.php``/``res.php`` solver API (CaptchaAI and 2captcha).

The client owns no resources: the caller creates the :class:`aiohttp.ClientSession` in a
startup hook and closes it in the matching cleanup, and passes it in. Every request is a POST
with the API key in the form body (CaptchaAI: "sent in body, NOT URL"), so the key never
appears in a URL, an access log or an exception; ``repr`` and messages never show it either.

Failures are handled in two layers:

* **Transport** (connection error, timeout, HTML 5xx page, unparseable body): retried inside
  the client with jittered exponential back-off from the documented 5 s, at most
  ``transport_retries`` times, then raised as :class:`RetryLaterError` -- except on ``in.php``
  (below).
* **Reply codes**: classified by :func:`captchatask.provider.codes.classify`. Short documented
  waits (``ERROR_NO_SLOT_AVAILABLE`` 5 s, ``MAX_USER_TURN`` 10 s, ``ERROR_SERVER_ERROR`` 10 s;
  anything up to ``max_inline_wait``) are waited for and retried inside the same budget; longer
  ones (``ERROR_ZERO_BALANCE`` 60 s, ``ERROR: 1005`` 5 min) are raised at once so the caller
  can reschedule instead of blocking a worker.

**Submits are at most once per call.** ``in.php`` is the one request that creates (and bills) a
task, so a submit whose request *may have reached the provider* is never repeated: a timeout,
a connection reset or closed before the reply, an HTTP 5xx page (a proxy may have forwarded
the request) and a 200 reply that cannot be parsed all raise :class:`SubmitAmbiguousError` at
once; the caller waits for the task's pingback before it submits again. Only failures that
certainly sent nothing are retried inline: a connection that could not be opened (refused,
DNS failure, TLS handshake, connect timeout: pseudo-code ``CONNECT_ERROR``) and a well-formed
reply carrying an error code (the provider answered and created nothing).

Each HTTP exchange is reported to an optional observer ``(endpoint, outcome, seconds)`` for the
``captchatask_provider_requests_total`` and ``..._request_duration_seconds`` metrics; both label
values come from small fixed sets (:data:`ENDPOINTS`, :data:`OUTCOMES`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias, TypeVar

import aiohttp

from captchatask.provider import codes, replies
from captchatask.provider.codes import Classification, Dialect, Verdict
from captchatask.provider.errors import (
    ConfigError,
    ProviderError,
    RetryLaterError,
    SubmitAmbiguousError,
    TaskFailedError,
    UnknownReplyError,
    error_for,
)
from captchatask.provider.replies import MalformedReplyError, Solution, ThreadsInfo

__all__ = [
    "ENDPOINTS",
    "OUTCOMES",
    "ConfigError",
    "PollResult",
    "ProviderClient",
    "ProviderError",
    "RequestObserver",
    "RetryLaterError",
    "Solution",
    "SubmitAmbiguousError",
    "TaskFailedError",
    "ThreadsInfo",
    "UnknownReplyError",
]

logger = logging.getLogger(__name__)

PollResult: TypeAlias = Solution | Classification
"""A poll outcome: the answer, or a ``not_ready``/``task_failed``/``unknown`` classification."""

RequestObserver: TypeAlias = Callable[[str, str, float], None]
"""Called once per HTTP exchange with ``(endpoint, outcome, seconds)``."""

Sleep: TypeAlias = Callable[[float], Awaitable[None]]

ENDPOINTS: Final = ("submit", "get", "get_bulk", "getbalance", "threadsinfo", "report")
OUTCOMES: Final = (
    "ok",
    "not_ready",
    "retry_later",
    "task_failed",
    "config_error",
    "unknown",
    "transport_error",
    "http_5xx",
)
#: Failures after which a request may have reached the provider (see the module docstring).
_MAYBE_RECEIVED: Final = frozenset({codes.TRANSPORT_ERROR, codes.HTTP_5XX, codes.UNPARSEABLE_REPLY})
#: aiohttp's errors raised while the connection is being opened, before any byte is sent.
_NOT_SENT: Final = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)

DEFAULT_BASE_URLS: Final = {
    Dialect.CAPTCHAAI: "https://ocr.captchaai.com",
    Dialect.TWOCAPTCHA: "https://2captcha.com",
}
DEFAULT_MAX_INLINE_WAIT: Final = 10.0  # covers NO_SLOT (5 s), MAX_USER_TURN and SERVER_ERROR
DEFAULT_BULK_MAX_IDS: Final = 100  # no documented maximum; 100 is the commonly assumed one
MAX_BACKOFF_SECONDS: Final = 60.0  # transport back-off never grows beyond a minute
JITTER_FRACTION: Final = 0.1  # waits are stretched by up to 10%, never shortened
_HTTP_SERVER_ERROR: Final = 500
_REPORT_REFUSALS: Final = frozenset(
    {"ERROR_DUPLICATE_REPORT", "ERROR_REPORT_NOT_RECORDED", "REPORT_NOT_RECORDED"}
)

_T = TypeVar("_T")


class _ReplyCodeError(Exception):
    """Internal: a well-formed reply carried an error code."""

    def __init__(self, classification: Classification) -> None:
        super().__init__(classification.code)
        self.classification = classification


@dataclass(frozen=True)
class _Secret:
    """Holds the API key so that it cannot leak through ``repr`` or ``str``."""

    value: str

    def __repr__(self) -> str:
        return "_Secret('***')"

    __str__ = __repr__


def _outcome_of(classification: Classification) -> str:
    if classification.code in {codes.TRANSPORT_ERROR, codes.CONNECT_ERROR}:
        return "transport_error"
    if classification.code == codes.HTTP_5XX:
        return "http_5xx"
    if classification.code == codes.UNPARSEABLE_REPLY:
        return "unknown"
    return classification.verdict.value


def _is_item_code(item: str) -> bool:
    """Whether a bulk item is a status code rather than an (upper-case) image answer."""
    return replies.is_not_ready(item) or item.startswith("ERROR") or item in codes.known_codes()


class ProviderClient:
    """One provider account: submit tasks, poll results, query the account.

    Parameters
    ----------
    session
        The caller-owned HTTP session (the client never creates or closes one).
    base_url
        Scheme and host serving ``/in.php`` and ``/res.php``, e.g. ``https://ocr.captchaai.com``.
    api_key
        The account key; kept out of every log line, message and ``repr``.
    dialect
        Which provider's reading of the protocol applies.
    timeout
        Total seconds for one HTTP exchange (the official SDKs use 30 s).
    transport_retries
        Retries of one request after transport failures or short documented waits.
    observer
        Optional metrics hook, see :data:`RequestObserver`.
    bulk_results
        Use one ``ids=`` request for many polls. ``None`` picks the dialect default: on for
        2captcha (documented), off for CaptchaAI (unconfirmed there).
    bulk_max_ids
        Ids per bulk request (no documented maximum exists).
    max_inline_wait
        Reply-code waits up to this many seconds are slept inside the client.
    sleep
        Awaitable sleep (tests inject a recorder so they never wait for real).
    wait_scale
        Factor applied to every wait before sleeping (1.0 in production).
    rng
        Source of jitter (tests pass a seeded one).
    """

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str,
        dialect: Dialect,
        timeout: float = 30.0,
        transport_retries: int = 3,
        observer: RequestObserver | None = None,
        bulk_results: bool | None = None,
        bulk_max_ids: int = DEFAULT_BULK_MAX_IDS,
        max_inline_wait: float = DEFAULT_MAX_INLINE_WAIT,
        sleep: Sleep = asyncio.sleep,
        wait_scale: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        if transport_retries < 0:
            raise ValueError("transport_retries must be >= 0")
        if bulk_max_ids < 1:
            raise ValueError("bulk_max_ids must be >= 1")
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._key = _Secret(api_key)
        self._dialect = dialect
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._retries = transport_retries
        self._observer = observer
        self._bulk = dialect is Dialect.TWOCAPTCHA if bulk_results is None else bulk_results
        self._bulk_max_ids = bulk_max_ids
        self._max_inline_wait = max_inline_wait
        self._sleep = sleep
        self._wait_scale = wait_scale
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography

    def __repr__(self) -> str:
        return (
            f"ProviderClient(base_url={self._base_url!r}, dialect={self._dialect.value!r}, "
            f"bulk_results={self._bulk})"
        )

    @property
    def dialect(self) -> Dialect:
        """The provider dialect this client speaks."""
        return self._dialect

    @property
    def bulk_results(self) -> bool:
        """Whether :meth:`get_results` sends one ``ids=`` request for many polls."""
        return self._bulk

    @property
    def bulk_max_ids(self) -> int:
        """Ids per bulk request."""
        return self._bulk_max_ids

    # -- public API ---------------------------------------------------------------------------

    async def submit(self, params: Mapping[str, str]) -> str:
        """Submit one task to ``in.php`` and return its numeric id as a string.

        ``params`` come from :func:`captchatask.provider.tasks.build_submit_params`; the key
        and ``json=1`` are added here. An image ``body`` is sent as ``multipart/form-data``
        (CaptchaAI's documented encoding), everything else url-encoded.

        Raises
        ------
        SubmitAmbiguousError
            The request may have reached the provider and no id came back: a task may exist.
            Never retried here (see the module docstring).
        ProviderError
            The subclass matching the verdict (``TaskFailedError`` for a rejected spec,
            ``ConfigError`` for key/account problems, ``RetryLaterError`` otherwise).
        """
        fields = {**params, "json": "1"}

        def handle(text: str) -> str:
            reply = replies.parse_reply(text)
            if not reply.ok:
                raise _ReplyCodeError(self._classify(reply.request, "in"))
            return replies.parse_task_id(reply)

        return await self._call(
            "submit",
            "in.php",
            fields,
            handle,
            multipart="body" in params or "file" in params,
            creates=True,
        )

    async def get_result(self, task_id: str) -> PollResult:
        """Poll one task.

        Returns
        -------
        PollResult
            The :class:`Solution`, or a classification with verdict ``not_ready``,
            ``task_failed`` (e.g. ``ERROR_CAPTCHA_UNSOLVABLE``, an expired id) or ``unknown``.

        Raises
        ------
        ProviderError
            For request-level failures (rate limits, key problems, exhausted transport retries).
        """

        def handle(text: str) -> PollResult:
            reply = replies.parse_reply(text)
            if reply.ok:
                return replies.parse_solution(reply)
            return self._task_outcome(self._classify(reply.request, "res"))

        return await self._call(
            "get",
            "res.php",
            {"action": "get", "id": task_id, "json": "1"},
            handle,
            outcome=self._poll_outcome,
        )

    async def get_results(self, task_ids: Iterable[str]) -> dict[str, PollResult]:
        """Poll many tasks, with bulk ``ids=`` requests when enabled, else one by one.

        Returns one :data:`PollResult` per id (same meaning as :meth:`get_result`).
        """
        ids = list(dict.fromkeys(task_ids))
        results: dict[str, PollResult] = {}
        if not self._bulk:
            for task_id in ids:
                results[task_id] = await self.get_result(task_id)
            return results
        for start in range(0, len(ids), self._bulk_max_ids):
            chunk = ids[start : start + self._bulk_max_ids]
            if len(chunk) == 1:
                results[chunk[0]] = await self.get_result(chunk[0])
                continue
            try:
                results.update(await self._get_bulk(chunk))
            except ProviderError as exc:
                if exc.classification.code != codes.UNPARSEABLE_REPLY:
                    raise
                # An answer holding an unescaped "|" that no rule could glue back: one call
                # per id costs more, but a bulk request that never parses would cost the
                # results themselves.
                for task_id in chunk:
                    results[task_id] = await self.get_result(task_id)
        return results

    async def get_balance(self) -> float:
        """Return the account balance (``action=getbalance``)."""

        def handle(text: str) -> float:
            reply = replies.parse_reply(text)
            if not reply.ok:
                raise _ReplyCodeError(self._classify(reply.request, "res"))
            return replies.parse_balance(reply)

        return await self._call(
            "getbalance", "res.php", {"action": "getbalance", "json": "1"}, handle
        )

    async def threads_info(self) -> ThreadsInfo:
        """Return CaptchaAI's thread cap and busy threads (``action=threadsinfo``)."""

        def handle(text: str) -> ThreadsInfo:
            reply = replies.parse_reply(text)
            if not reply.ok:
                raise _ReplyCodeError(self._classify(reply.request, "res"))
            return replies.parse_threads_info(reply)

        return await self._call(
            "threadsinfo", "res.php", {"action": "threadsinfo", "json": "1"}, handle
        )

    async def report(self, task_id: str, *, good: bool) -> bool:
        """Report an answer as good or bad.

        Returns
        -------
        bool
            ``True`` if recorded; ``False`` if the provider refused the report (duplicate,
            older than 15 minutes, too many complaints), which callers may ignore.
        """

        def handle(text: str) -> bool:
            reply = replies.parse_reply(text)
            if reply.ok:
                return True
            if reply.request.strip() in _REPORT_REFUSALS:
                return False
            raise _ReplyCodeError(self._classify(reply.request, "res"))

        action = "reportgood" if good else "reportbad"
        return await self._call(
            "report", "res.php", {"action": action, "id": task_id, "json": "1"}, handle
        )

    # -- internals ----------------------------------------------------------------------------

    def _classify(self, code: str, endpoint: codes.Endpoint) -> Classification:
        return codes.classify(code, dialect=self._dialect, endpoint=endpoint)

    @staticmethod
    def _task_outcome(classification: Classification) -> PollResult:
        """Per-task verdicts are results; request-level ones are raised."""
        if classification.verdict in {Verdict.NOT_READY, Verdict.TASK_FAILED, Verdict.UNKNOWN}:
            return classification
        raise _ReplyCodeError(classification)

    @staticmethod
    def _poll_outcome(result: PollResult) -> str:
        if isinstance(result, Solution):
            return "ok"
        return result.verdict.value

    def _item(self, item: str) -> PollResult:
        if _is_item_code(item):
            return self._task_outcome(self._classify(item, "res"))
        return replies.parse_solution_text(item)

    async def _get_bulk(self, chunk: Sequence[str]) -> dict[str, PollResult]:
        def handle(text: str) -> dict[str, PollResult]:
            try:
                reply = replies.parse_reply(text)
            except MalformedReplyError:
                items = replies.parse_bulk(text, chunk)  # plain "a|b|c"
            else:
                if not reply.ok and "|" not in reply.request:
                    classification = self._classify(reply.request, "res")
                    if classification.verdict is not Verdict.NOT_READY:
                        raise _ReplyCodeError(classification)
                    items = dict.fromkeys(chunk, reply.request)  # none of them ready
                else:
                    items = replies.parse_bulk(reply.request, chunk)
            return {task_id: self._item(item) for task_id, item in items.items()}

        fields = {"action": "get", "ids": ",".join(chunk), "json": "1"}
        return await self._call("get_bulk", "res.php", fields, handle)

    def _jittered(self, seconds: float) -> float:
        return seconds * self._rng.uniform(1.0, 1.0 + JITTER_FRACTION)

    async def _send(
        self, path: str, fields: Mapping[str, str], *, multipart: bool
    ) -> tuple[int, str]:
        data: aiohttp.FormData | dict[str, str]
        body = {**fields, "key": self._key.value}
        if multipart:
            data = aiohttp.FormData()
            for name, value in body.items():
                # A content type forces multipart encoding even without a file name.
                data.add_field(name, value, content_type="text/plain")
        else:
            data = body
        async with self._session.post(
            f"{self._base_url}/{path}", data=data, timeout=self._timeout
        ) as response:
            return response.status, await response.text(errors="replace")

    async def _call(
        self,
        endpoint: str,
        path: str,
        fields: Mapping[str, str],
        handle: Callable[[str], _T],
        *,
        multipart: bool = False,
        outcome: Callable[[_T], str] | None = None,
        creates: bool = False,
    ) -> _T:
        """Run one request with bounded retries; see the module docstring for the policy.

        ``creates`` marks the request that creates a task (``in.php``): it is never repeated
        after a failure that may have reached the provider.
        """
        attempt = 0
        while True:
            started = time.monotonic()
            transport_failure: BaseException | None = None
            try:
                status, text = await self._send(path, fields, multipart=multipart)
            except _NOT_SENT as exc:
                transport_failure = exc
                classification = self._classify(codes.CONNECT_ERROR, "res")
            except (aiohttp.ClientError, TimeoutError) as exc:
                transport_failure = exc
                classification = self._classify(codes.TRANSPORT_ERROR, "res")
            else:
                if status >= _HTTP_SERVER_ERROR:
                    classification = self._classify(codes.HTTP_5XX, "res")
                else:
                    try:
                        value = handle(text)
                    except MalformedReplyError:
                        classification = self._classify(codes.UNPARSEABLE_REPLY, "res")
                    except _ReplyCodeError as code_error:
                        classification = code_error.classification
                    else:
                        label = outcome(value) if outcome is not None else "ok"
                        self._observe(endpoint, label, started)
                        return value
            self._observe(endpoint, _outcome_of(classification), started)
            if creates and classification.code in _MAYBE_RECEIVED:
                logger.warning(
                    "provider request may have been received; not repeated",
                    extra={"endpoint": endpoint, "code": classification.code},
                )
                raise SubmitAmbiguousError(classification) from transport_failure
            wait = self._retry_wait(classification, attempt)
            if wait is None:
                logger.warning(
                    "provider request failed",
                    extra={"endpoint": endpoint, "code": classification.code},
                )
                raise error_for(classification) from transport_failure
            logger.info(
                "provider request will be retried",
                extra={"endpoint": endpoint, "code": classification.code, "wait": wait},
            )
            await self._sleep(wait * self._wait_scale)
            attempt += 1

    def _retry_wait(self, classification: Classification, attempt: int) -> float | None:
        """Return the jittered wait before retrying inline, or ``None`` to raise."""
        if attempt >= self._retries or classification.verdict is not Verdict.RETRY_LATER:
            return None
        base = classification.wait_seconds or 0.0
        if classification.code in _MAYBE_RECEIVED or classification.code == codes.CONNECT_ERROR:
            return self._jittered(min(MAX_BACKOFF_SECONDS, base * 2**attempt))
        if base > self._max_inline_wait:
            return None
        return self._jittered(base)

    def _observe(self, endpoint: str, outcome: str, started: float) -> None:
        if self._observer is not None:
            self._observer(endpoint, outcome, time.monotonic() - started)
