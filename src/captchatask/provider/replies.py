"""Pure parsers for every reply shape of ``in.php`` and ``res.php``.

The providers answer in plain text (``OK|123``, ``CAPCHA_NOT_READY``, ``ERROR_...``, a bare
balance) or, with ``json=1``, in JSON (``{"status":1,"request":...}``). Real replies also
include shapes the documentation does not promise: integer task ids, plain-text errors despite
``json=1``, HTML 5xx pages, Enterprise answers in ``result``/``user_agent``, JSON-encoded
answers (GeeTest objects, grid lists), pipe-joined bulk answers and ``threadsinfo`` bodies
without ``status``. Every parser here takes text and returns a value or raises
:class:`MalformedReplyError`; none of them does I/O, so they are tested exhaustively without a
server.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "MalformedReplyError",
    "Reply",
    "Solution",
    "ThreadsInfo",
    "is_not_ready",
    "parse_balance",
    "parse_bulk",
    "parse_reply",
    "parse_solution",
    "parse_solution_text",
    "parse_task_id",
    "parse_threads_info",
]

_NOT_READY_CODES: Final = frozenset({"CAPCHA_NOT_READY", "CAPTCHA_NOT_READY"})
_PLAIN_OK: Final = "OK"
_PLAIN_OK_PREFIX: Final = "OK|"
# A plain-text body that is a single code: upper-case letters, digits and underscores, or the
# "ERROR: 1001" block form. Anything else (HTML, prose, empty) is malformed.
_PLAIN_CODE: Final = re.compile(r"^(?:[A-Z][A-Z0-9_]*|ERROR:\s*\d+)$")
_DECIMAL: Final = re.compile(r"^-?\d+(?:\.\d+)?$")
_TASK_ID: Final = re.compile(r"^\d+$")
_GEETEST_PLAIN: Final = re.compile(r"^(?:\w+:[^,]*)(?:,\w+:[^,]*)+$")
_GRID_PLAIN: Final = re.compile(r"^click:(\d+(?:/\d+)*)$")
_MAX_EXCERPT: Final = 40  # characters of a malformed body kept in an error message


class MalformedReplyError(ValueError):
    """The body is not an API reply (HTML error page, empty body, unexpected JSON)."""


@dataclass(frozen=True)
class Reply:
    """One decoded API reply.

    Attributes
    ----------
    ok
        ``True`` for success (``OK|...``, ``status: 1``, a bare balance, ``OK_...``).
    request
        The success payload or the status/error code, always as a string (JSON integers are
        converted; JSON objects and lists are re-encoded compactly).
    fields
        The whole JSON object for JSON replies (``result``, ``user_agent``, ``price``...);
        empty for plain text.
    """

    ok: bool
    request: str
    fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def error_text(self) -> str | None:
        """The optional human ``error_text`` of a JSON error reply."""
        text = self.fields.get("error_text")
        return text if isinstance(text, str) else None


@dataclass(frozen=True)
class Solution:
    """A solved task's answer.

    Attributes
    ----------
    token
        The answer exactly as the provider sent it (for JSON-encoded answers, the JSON text).
    user_agent
        The user agent the token is bound to (reCAPTCHA Enterprise, Cloudflare), if sent.
    data
        The decoded structure for GeeTest (object) and grid (list) answers, else ``None``.
    """

    token: str
    user_agent: str | None = None
    data: dict[str, Any] | list[Any] | None = None


@dataclass(frozen=True)
class ThreadsInfo:
    """CaptchaAI's ``threadsinfo``: the thread cap and how many threads are busy."""

    threads: int
    working_threads: int

    @property
    def free_threads(self) -> int:
        """Threads available for a new task right now (never negative)."""
        return max(0, self.threads - self.working_threads)


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return flat[:_MAX_EXCERPT] + ("..." if len(flat) > _MAX_EXCERPT else "")


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        raise MalformedReplyError(f"unexpected request value {value!r}")
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def _parse_json(text: str) -> Reply:
    try:
        decoded = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedReplyError(f"invalid JSON reply: {_excerpt(text)}") from exc
    if not isinstance(decoded, dict):
        raise MalformedReplyError(f"JSON reply is not an object: {_excerpt(text)}")
    if "status" not in decoded:
        # threadsinfo answers with counts only; whether status/request are present is unknown.
        if "threads" in decoded:
            return Reply(ok=True, request="", fields=decoded)
        raise MalformedReplyError(f"JSON reply has no status: {_excerpt(text)}")
    try:
        status = int(decoded["status"])
    except (TypeError, ValueError) as exc:
        raise MalformedReplyError(f"JSON status is not a number: {_excerpt(text)}") from exc
    request = decoded.get("request", "")
    return Reply(ok=status == 1, request=_as_text(request), fields=decoded)


def parse_reply(text: str) -> Reply:
    """Decode any reply body into a :class:`Reply`.

    Accepts JSON whether or not ``json=1`` was sent, and plain text whether or not it was (the
    CaptchaAI SDK notes plain-text errors despite ``json=1``).

    Raises
    ------
    MalformedReplyError
        For HTML pages, empty bodies and anything else that is not an API reply.
    """
    body = text.strip()
    if not body:
        raise MalformedReplyError("empty reply")
    if body.startswith("{"):
        return _parse_json(body)
    if body.startswith(_PLAIN_OK_PREFIX):
        return Reply(ok=True, request=body[len(_PLAIN_OK_PREFIX) :])
    if body == _PLAIN_OK or (body.startswith("OK_") and _PLAIN_CODE.match(body)):
        return Reply(ok=True, request=body)
    if _DECIMAL.match(body):
        return Reply(ok=True, request=body)  # getbalance in plain text
    if _PLAIN_CODE.match(body):
        return Reply(ok=False, request=body)
    raise MalformedReplyError(f"not an API reply: {_excerpt(body)}")


def is_not_ready(code: str) -> bool:
    """Return whether ``code`` means "not solved yet" (both spellings)."""
    return code.strip() in _NOT_READY_CODES


def parse_task_id(reply: Reply) -> str:
    """Return the numeric task id of a successful submit reply.

    Raises
    ------
    MalformedReplyError
        If the reply is not a success or the id is not numeric.
    """
    task_id = reply.request.strip()
    if not reply.ok or not _TASK_ID.match(task_id):
        raise MalformedReplyError(f"submit reply has no numeric task id: {_excerpt(task_id)}")
    return task_id


def _decode_structured(token: str) -> dict[str, Any] | list[Any] | None:
    stripped = token.strip()
    if stripped[:1] in {"{", "["}:
        try:
            decoded = json.loads(stripped)
        except json.JSONDecodeError:
            return None
        if isinstance(decoded, dict | list):
            return decoded
        return None
    grid = _GRID_PLAIN.match(stripped)
    if grid is not None:
        return [int(cell) for cell in grid.group(1).split("/")]
    if _GEETEST_PLAIN.match(stripped) and stripped.startswith("challenge:"):
        # The blog's plain GeeTest form "challenge:...,validate:...,seccode:...".
        pairs = (item.split(":", 1) for item in stripped.split(","))
        return {pair[0]: pair[1] for pair in pairs}
    return None


def parse_solution_text(token: str, *, user_agent: str | None = None) -> Solution:
    """Build a :class:`Solution` from an answer string (a poll or a pingback ``code``)."""
    return Solution(token=token, user_agent=user_agent, data=_decode_structured(token))


def parse_solution(reply: Reply) -> Solution:
    """Return the answer of a successful ``action=get`` reply.

    The Enterprise/Cloudflare shape puts the token in ``result`` and the bound user agent in
    ``user_agent``; when ``result`` is present it wins over ``request``.

    Raises
    ------
    MalformedReplyError
        If the reply is not a success or carries no answer.
    """
    if not reply.ok:
        raise MalformedReplyError("reply is not a solved answer")
    result = reply.fields.get("result")
    token = _as_text(result) if result not in (None, "") else reply.request
    if not token:
        raise MalformedReplyError("solved reply carries no answer")
    agent = reply.fields.get("user_agent", reply.fields.get("userAgent"))
    return parse_solution_text(token, user_agent=agent if isinstance(agent, str) else None)


def parse_bulk(text: str, ids: Sequence[str]) -> dict[str, str]:
    """Split a bulk ``action=get&ids=...`` reply into one answer or code per id.

    The reply is ``{"status":1,"request":"a|b|c"}`` or plain ``a|b|c``: each item an answer,
    ``CAPCHA_NOT_READY`` or an ``ERROR_...`` code, in the order of ``ids``. A leading ``OK``
    item (``OK|a|b``) is tolerated.

    Raises
    ------
    MalformedReplyError
        If the body is a request-level error or the item count does not match ``ids``.
    """
    body = text.strip()
    if body.startswith("{") or "|" not in body:
        reply = parse_reply(body)
        if not reply.ok and len(ids) != 1:
            raise MalformedReplyError(f"bulk request failed: {_excerpt(reply.request)}")
        items = reply.request.split("|") if reply.ok else [reply.request]
    else:
        items = body.split("|")
    if len(items) > len(ids):
        items = _rejoin_json(items)
    if len(items) == len(ids) + 1 and items[0] == _PLAIN_OK:
        items = items[1:]
    if len(items) != len(ids):
        raise MalformedReplyError(f"bulk reply has {len(items)} items for {len(ids)} ids")
    return dict(zip(ids, items, strict=True))


def _rejoin_json(pieces: Sequence[str]) -> list[str]:
    """Glue back JSON answers that the ``|`` split cut apart.

    A bulk reply joins answers with ``|``, and nothing escapes a ``|`` inside an answer: a
    GeeTest v3 answer is JSON whose ``seccode`` ends in ``|jordan``. An item that opens a JSON
    object or list but does not parse is joined with the following pieces until it does; if
    it never does, the pieces are left as they were (and the item count then says malformed).
    """
    items: list[str] = []
    index = 0
    while index < len(pieces):
        piece = pieces[index]
        end = index
        if piece.startswith(("{", "[")):
            candidate = piece
            while not _is_json(candidate) and end + 1 < len(pieces):
                end += 1
                candidate = f"{candidate}|{pieces[end]}"
            if _is_json(candidate):
                piece = candidate
            else:
                end = index
        items.append(piece)
        index = end + 1
    return items


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def parse_balance(reply: Reply) -> float:
    """Return the balance of a ``getbalance`` reply (a JSON string or number, or bare text)."""
    if not reply.ok or not _DECIMAL.match(reply.request.strip()):
        raise MalformedReplyError(f"not a balance: {_excerpt(reply.request)}")
    return float(reply.request)


def parse_threads_info(reply: Reply) -> ThreadsInfo:
    """Return the counts of a ``threadsinfo`` reply (integers or numeric strings)."""
    try:
        return ThreadsInfo(
            threads=int(reply.fields["threads"]),
            working_threads=int(reply.fields["working_threads"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedReplyError("threadsinfo reply has no thread counts") from exc
