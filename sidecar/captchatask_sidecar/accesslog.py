"""The access log (``--access-log``): one line per request, with nothing secret in it.

aiohttp's own access logger writes the request line as sent, and the pingback request line is
made of secrets: its path ends with the signed token (whoever holds it can post a result for
the task) and a CaptchaAI ``GET`` carries the solution in ``?code=``. So the line is rebuilt:
the path up to the task's uid, every segment after it masked, every query value masked (keys
kept: they say which shape the pingback had). The Referer is left out (it could carry a URL with
a token); the User-Agent stays (it says which provider sent the request).

The same holds, access log or not, for aiohttp's own error log: a request line its HTTP parser
refuses is logged with the raw line in the exception message (a malformed request to a genuine
pingback URL would log the token). :class:`RawRequestLineFilter` keeps the record, drops the
message.
"""

from __future__ import annotations

import logging
from typing import Final

from aiohttp import hdrs
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from captchatask import signing

#: What a masked segment or value reads as.
REDACTED: Final = "<redacted>"
#: Path segments kept after the pingback prefix: namespace, name, uid (none of them secret).
KEPT_PINGBACK_SEGMENTS: Final = 3
_PINGBACK_PATH: Final = signing.PINGBACK_PREFIX + "/"
#: aiohttp's logger of connection-level errors (where refused request lines are logged).
SERVER_LOGGER: Final = "aiohttp.server"


def redact_target(path: str, query: str) -> str:
    """The request target with the pingback token and every query value masked.

    Parameters
    ----------
    path
        The raw (still percent-encoded) path.
    query
        The raw query string, without the ``?``.
    """
    if path.startswith(_PINGBACK_PATH):
        segments = path[len(_PINGBACK_PATH) :].split("/")
        kept = segments[:KEPT_PINGBACK_SEGMENTS]
        masked = [REDACTED] * (len(segments) - len(kept))
        path = _PINGBACK_PATH + "/".join(kept + masked)
    if not query:
        return path
    fields = []
    for pair in query.split("&"):
        key, sep, value = pair.partition("=")
        fields.append(f"{key}{sep}{REDACTED}" if value else pair)
    return path + "?" + "&".join(fields)


class RedactingAccessLogger(AbstractAccessLogger):
    """aiohttp access logger writing :func:`redact_target`'s request line (``INFO``).

    The format is fixed (the ``log_format`` aiohttp passes is ignored): remote address, request
    line, status, body bytes, seconds, User-Agent.
    """

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        """Write one line for a finished request."""
        url = request.rel_url
        version = request.version
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d %.6f "%s"',
            request.remote or "-",
            request.method,
            redact_target(url.raw_path, url.raw_query_string),
            version.major,
            version.minor,
            response.status,
            response.body_length,
            time,
            request.headers.get(hdrs.USER_AGENT, "-"),
        )

    @property
    def enabled(self) -> bool:
        """Whether a line would be written (aiohttp skips the call otherwise)."""
        return self.logger.isEnabledFor(logging.INFO)


class RawRequestLineFilter(logging.Filter):
    """Strip the raw request line from aiohttp's "Error handling request" records.

    The record stays (a burst of malformed requests is worth seeing), with the error's class and
    status instead of its message and traceback, which quote the request line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite a record about an unparseable request; pass every record on."""
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = f"{record.getMessage()}: {type(exc).__name__} (status {exc.code})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def install_log_filters() -> None:
    """Attach :class:`RawRequestLineFilter` to aiohttp's server logger (idempotent)."""
    logger = logging.getLogger(SERVER_LOGGER)
    if not any(isinstance(f, RawRequestLineFilter) for f in logger.filters):
        logger.addFilter(RawRequestLineFilter())
