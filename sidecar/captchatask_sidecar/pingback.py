"""The pingback listener: authenticate, parse, make durable, answer.

Route: ``GET|POST /v1/pingback/{namespace}/{name}/{uid}/{token}`` (the signed path the operator
and ``tasks:reserve`` hand to the provider). The order of checks is the security design:

1. the namespace must be one this receiver serves, the four segments must have the shapes of a
   namespace, a name, a uid and a token (404 otherwise);
2. the token must verify (HMAC over namespace, name and uid; constant time; stateless) - 403
   otherwise. Both happen **before the body is read and before any API call**, so forged
   requests cost a regex and an HMAC;
3. :func:`~.payload.read_pingback` reads the body under a size limit (413, checked from
   ``Content-Length`` before reading) and a time limit (408) and parses it strictly (400
   malformed, 415 unsupported type, 422 a code that is no final result).

Only then does :class:`~.recorder.Recorder` make the result durable, and only then is ``200``
sent, with the outcome in the ``X-Captchatask-Outcome`` header. Rejections are terse problem
documents with nothing an attacker can use; they never write anything.

With the API server away every pingback is CPU work on one event loop (the spool path), so the
app has no middleware: :meth:`PingbackReceiver.receive` answers its own errors and a fallback
route (:func:`~.errors.add_fallback`) the unknown paths and methods, with the same problem
documents the local API's middleware gives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from captchatask import signing
from captchatask.model import TaskRef
from captchatask.provider import codes
from captchatask.supervise import Supervisor
from captchatask_sidecar.errors import add_fallback, http_problem, internal_error, problem
from captchatask_sidecar.metrics import PINGBACK_OUTCOMES, UNATTRIBUTED, Metrics
from captchatask_sidecar.payload import PingbackError, Source, read_pingback, result_from_query
from captchatask_sidecar.recorder import SPOOLED, Recorder
from captchatask_sidecar.spool import SpoolFullError, SpoolWriteError
from captchatask_sidecar.verify import NotConfirmedError, Verifier, VerifyUnavailableError

logger = logging.getLogger(__name__)

ROUTE: Final = signing.PINGBACK_PREFIX + "/{namespace}/{name}/{uid}/{token}"
OUTCOME_HEADER: Final = "X-Captchatask-Outcome"
#: ``Retry-After`` of a ``503``: a hint only (no provider documents pingback retries); the
#: operator's fallback poll recovers a refused result either way, at its polling interval.
RETRY_AFTER_SECONDS: Final = 10
#: The answer body: providers only look at the status; "OK" is what the seed's handler sent.
OK_BODY: Final = b"OK"
#: The ``200`` headers per outcome, built once (the response copies them).
_OK_HEADERS: Final = {
    outcome: CIMultiDictProxy(
        CIMultiDict({hdrs.CONTENT_TYPE: "text/plain", OUTCOME_HEADER: outcome})
    )
    for outcome in PINGBACK_OUTCOMES
}


class RejectedError(Exception):
    """A pingback refused with a 4xx (or 503): nothing was written."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True, slots=True)
class PingbackReceiver:
    """Everything the pingback handler needs, looked up once per request.

    Parameters
    ----------
    namespaces
        The namespaces whose pingbacks are accepted.
    signer
        Verifies path tokens.
    recorder
        Makes results durable.
    metrics
        The sidecar's metrics.
    dialect
        How ``ERROR_...`` codes are classified.
    max_body_bytes
        Largest accepted body.
    read_timeout
        Seconds the body may take to arrive.
    verifier
        Confirms answers with ``res.php`` (verify-by-poll), or ``None``.
    """

    namespaces: frozenset[str]
    signer: signing.PingbackSigner
    recorder: Recorder
    metrics: Metrics
    dialect: codes.Dialect
    max_body_bytes: int
    read_timeout: float
    verifier: Verifier | None = None

    def admit(self, request: web.Request) -> asyncio.Future[int] | Coroutine[Any, Any, str]:
        """Authenticate and parse one pingback and hand it to the recorder; await the result.

        What :meth:`Recorder.admit <.recorder.Recorder.admit>` returns: the spool append's
        future (``spooled`` once it resolves) or a coroutine that returns the outcome label. A
        ``GET`` without verify-by-poll (the common shape, and all of the spool path's CPU work)
        is handled here without a coroutine of its own; anything else goes through
        :meth:`_admit_slowly`.

        Raises
        ------
        RejectedError
            The request is refused; nothing was written and no API call was made.
        SpoolWriteError
            The result could not be made durable (``SpoolFullError`` at once, any other from
            what is returned).
        """
        match = request.match_info
        namespace = match["namespace"]
        name = match["name"]
        uid = match["uid"]
        token = match["token"]
        if namespace not in self.namespaces or not signing.path_parts_ok(
            namespace, name, uid, token
        ):
            raise RejectedError(404, "not found")
        if not self.signer.verify_parts(namespace, name, uid, token):
            raise RejectedError(403, "forbidden")
        ref = TaskRef(namespace=namespace, name=name, uid=uid)
        if request.method != hdrs.METH_GET or self.verifier is not None:
            return self._admit_slowly(request, ref)
        try:
            result = result_from_query(request, dialect=self.dialect)
        except PingbackError as exc:
            raise RejectedError(exc.status, exc.detail) from exc
        return self.recorder.admit(ref, result, source=Source.GET.value)

    async def _admit_slowly(self, request: web.Request, ref: TaskRef) -> str:
        """A pingback with a body to read, or an answer to confirm first; its outcome label."""
        try:
            pingback = await read_pingback(
                request, max_body_bytes=self.max_body_bytes, read_timeout=self.read_timeout
            )
            result = pingback.to_result(dialect=self.dialect)
        except PingbackError as exc:
            raise RejectedError(exc.status, exc.detail) from exc
        if self.verifier is not None:
            try:
                result = await self.verifier.confirm(ref, result)
            except NotConfirmedError as exc:
                raise RejectedError(409, "not confirmed by the provider") from exc
            except VerifyUnavailableError as exc:
                raise RejectedError(503, "cannot confirm now") from exc
        return await self.recorder.accept(ref, result, source=pingback.source.value)

    async def receive(self, request: web.Request) -> web.Response:
        """The route handler: one pingback (see the module docstring); idempotent per result.

        Every error is answered here, as the middleware of the other apps would answer it: an
        aiohttp error as its problem document, anything unexpected as a logged bare ``500``.
        """
        metrics = self.metrics
        started = time.perf_counter()
        try:
            try:
                admitted = self.admit(request)
                if isinstance(admitted, asyncio.Future):
                    await admitted
                    outcome = SPOOLED
                else:
                    outcome = await admitted
            except (RejectedError, SpoolWriteError) as exc:
                return self._refusal(exc)
            finally:
                metrics.handle_duration.observe(time.perf_counter() - started)
            # Counted only once authenticated, so the path's namespace is one this process serves.
            metrics.pingback(request.match_info["namespace"], outcome).inc()
            return web.Response(body=OK_BODY, headers=_OK_HEADERS[outcome])
        except web.HTTPException as exc:
            if exc.status < 400:  # redirects and the like pass through
                raise
            return http_problem(exc)
        except Exception:  # noqa: BLE001 - internal_error logs it, with its traceback
            return internal_error(request)

    def _refusal(self, exc: RejectedError | SpoolWriteError) -> web.Response:
        """The answer to a pingback refused without writing anything (counted)."""
        metrics = self.metrics
        if isinstance(exc, RejectedError):
            if exc.status == 503:
                metrics.unavailable("verify_unavailable").inc()
                return _unavailable(exc.detail)
            metrics.pingback(UNATTRIBUTED, "rejected").inc()
            return problem(exc.status, exc.detail)
        if isinstance(exc, SpoolFullError):
            # Refused before anything was written: a result we cannot hold must not be claimed.
            metrics.unavailable("spool_full").inc()
            return _unavailable("spool full, retry later")
        metrics.spool_write_errors.inc()
        metrics.unavailable("spool_unwritable").inc()
        return _unavailable("not stored, retry later")


def _unavailable(detail: str) -> web.Response:
    response = problem(503, detail)
    response.headers[hdrs.RETRY_AFTER] = str(RETRY_AFTER_SECONDS)
    return response


def create_pingback_app(
    receiver: PingbackReceiver, *, drainer: Supervisor | None = None
) -> web.Application:
    """Build the pingback application (one route, problem-JSON errors, no middleware).

    Parameters
    ----------
    receiver
        The handler's dependencies.
    drainer
        The supervised drainer (restarted after a crash, see :mod:`captchatask.supervise`):
        started with the app and stopped after in-flight pingbacks finished, so nothing is
        replayed while the last requests still write to the spool.
    """
    app = web.Application(client_max_size=receiver.max_body_bytes)
    # The bound method: no application lookup per request.
    app.router.add_route(hdrs.METH_GET, ROUTE, receiver.receive)
    app.router.add_route(hdrs.METH_POST, ROUTE, receiver.receive)
    add_fallback(app)
    if drainer is not None:

        async def run_drainer(_app: web.Application) -> AsyncIterator[None]:
            task = asyncio.create_task(drainer.run(), name="spool-drainer")
            yield
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        app.cleanup_ctx.append(run_drainer)
    return app
