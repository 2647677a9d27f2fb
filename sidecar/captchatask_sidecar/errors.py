"""JSON problem responses (RFC 9457 style) and the two ways they are guaranteed.

Every error any listener returns is ``application/problem+json`` with ``title``, ``status`` and,
where it helps the caller, ``detail``. Nothing else ever leaks: an unexpected exception is
logged here with its traceback and answered with a bare 500, so no stack trace, key or internal
path reaches a client. Pingback rejections are deliberately terse (see :mod:`.pingback`).

The local API and admin apps get these answers from :func:`problem_middleware`. The pingback app
has no middleware: there a middleware is a wrapper call on every pingback of the CPU-bound spool
path, for errors that almost never happen. Its handler catches its own errors
(:func:`http_problem`, :func:`internal_error`) and :func:`add_fallback` gives it a catch-all
route that answers 404 and 405 exactly as the middleware would.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Final

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

logger = logging.getLogger(__name__)

PROBLEM_JSON: Final = "application/problem+json"


class ProblemError(Exception):
    """Raise from a handler to answer with a problem document."""

    def __init__(self, status: int, detail: str | None = None, *, title: str | None = None) -> None:
        super().__init__(detail or title or HTTPStatus(status).phrase)
        self.status = status
        self.detail = detail
        self.title = title


def problem(status: int, detail: str | None = None, *, title: str | None = None) -> web.Response:
    """Build a problem response; ``title`` defaults to the status phrase."""
    body: dict[str, object] = {
        "type": "about:blank",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    return web.Response(
        status=status,
        body=json.dumps(body, separators=(",", ":")).encode(),
        content_type=PROBLEM_JSON,
    )


def http_problem(exc: web.HTTPException) -> web.Response:
    """The problem document for an aiohttp error (status 400 or more): router or body errors."""
    detail = None
    if exc.status == HTTPStatus.METHOD_NOT_ALLOWED:
        detail = "method not allowed"
    elif exc.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
        detail = "body too large"
    response = problem(exc.status, detail)
    if exc.status == HTTPStatus.METHOD_NOT_ALLOWED and hdrs.ALLOW in exc.headers:
        response.headers[hdrs.ALLOW] = exc.headers[hdrs.ALLOW]
    return response


def internal_error(request: web.Request) -> web.Response:
    """Log the exception being handled (with its traceback) and answer a bare 500.

    Call from an ``except`` block. The log names the route template, never the path: pingback
    paths carry their token.
    """
    resource = request.match_info.route.resource
    where = resource.canonical if resource is not None else "?"
    logger.exception("unexpected error handling %s %s", request.method, where)
    return problem(500, "internal error")


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn router errors, :class:`ProblemError` and crashes into problem documents."""
    try:
        return await handler(request)
    except ProblemError as exc:
        return problem(exc.status, exc.detail, title=exc.title)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like pass through
            raise
        return http_problem(exc)
    except Exception:  # noqa: BLE001 - internal_error logs it, with its traceback
        return internal_error(request)


#: The catch-all route :func:`add_fallback` adds (every path, every method).
FALLBACK_PATH: Final = "/{fallback:.*}"


def add_fallback(app: web.Application) -> None:
    """Answer every request no route takes with the problem document the middleware would give.

    Add it after the application's routes. The router tries a catch-all resource last (it is
    indexed under ``/``), so it costs the routed requests nothing; here it tells a known path
    asked with another method (405, with ``Allow``) from an unknown path (404).
    """
    router = app.router
    # Only the routes registered before the fallback: they are what a 405 is about.
    resources = list(router.resources())

    async def unrouted(request: web.Request) -> web.Response:
        allowed: set[str] = set()
        for resource in resources:
            _match, methods = await resource.resolve(request)
            allowed |= methods
        if allowed:
            return http_problem(web.HTTPMethodNotAllowed(request.method, allowed))
        return http_problem(web.HTTPNotFound())

    router.add_route(hdrs.METH_ANY, FALLBACK_PATH, unrouted)
