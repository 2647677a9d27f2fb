"""JSON problem responses (RFC 9457 style) and the middleware that guarantees them.

Every error any listener returns is ``application/problem+json`` with ``title``, ``status`` and,
where it helps the caller, ``detail``. Nothing else ever leaks: an unexpected exception is
logged here with its traceback and answered with a bare 500, so no stack trace, key or internal
path reaches a client. Pingback rejections are deliberately terse (see :mod:`.pingback`).
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Final

from aiohttp import web
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
        detail = None
        if exc.status == HTTPStatus.METHOD_NOT_ALLOWED:
            detail = "method not allowed"
        elif exc.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
            detail = "body too large"
        response = problem(exc.status, detail)
        if exc.status == HTTPStatus.METHOD_NOT_ALLOWED and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        # The route template, never the path: pingback paths carry their token.
        resource = request.match_info.route.resource
        where = resource.canonical if resource is not None else "?"
        logger.exception("unexpected error handling %s %s", request.method, where)
        return problem(500, "internal error")
