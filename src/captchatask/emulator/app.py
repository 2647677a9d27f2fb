"""The emulator's aiohttp application: ``/in.php``, ``/res.php`` and the ``/_emulator`` admin.

The solver endpoints follow ``provider-api.md`` section 8: GET, urlencoded POST and multipart
POST on both endpoints; plain text unless ``json=1``; ``header_acao=1`` adds
``Access-Control-Allow-Origin: *``. Handlers validate the request, ask
:class:`~captchatask.emulator.state.EmulatorState` what happens, and format the reply.

The admin API lives on the same port under ``/_emulator/`` (a prefix no solver client uses),
so a test needs one URL. It serves JSON accounting and lets faults be changed at runtime:

=========================================  ==================================================
``GET  /_emulator/healthz``                 ``ok``
``GET  /_emulator/summary``                 totals, reply codes, load, balance, faults, seed
``GET  /_emulator/tasks``                   every remembered task's accounting record
``GET  /_emulator/tasks/{id}``              one record (404 once expired or unknown)
``GET  /_emulator/faults``                  current fault knobs
``POST /_emulator/faults``                  JSON object of knobs to change (400 if invalid)
``POST /_emulator/faults/res-502-burst``    ``{"count": N}``: the next N ``res.php`` get 502;
                                            ``{"seconds": S}``: every ``res.php`` for S seconds
                                            (an outage, however many requests come);
                                            ``"until_met": true``: if none came meanwhile,
                                            the next ``res.php`` still gets it
``POST /_emulator/faults/in-reply-lost``    ``{"count": N, "mode": "502"|"drop"}``: the next N
                                            ``in.php`` that create a task lose their reply;
                                            ``{"clear": true}`` drops the ones still pending
``POST /_emulator/reset``                   forget tasks, counters and bans
=========================================  ==================================================
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from aiohttp import web

from captchatask.emulator.config import EmulatorConfig, IdType
from captchatask.emulator.pingback import PingbackSender
from captchatask.emulator.state import (
    SOLVED,
    UNSOLVABLE,
    UNSOLVABLE_CODE,
    EmulatorState,
    SubmitRejectedError,
    TaskRecord,
)

__all__ = ["ADMIN_PREFIX", "Runtime", "create_app", "runtime_key"]

ADMIN_PREFIX: Final = "/_emulator"
NOT_READY: Final = "CAPCHA_NOT_READY"
_MAX_BODY_BYTES: Final = 4 * 1024 * 1024  # a 600 kB image is ~800 kB of base64; leave room
_MIN_IMAGE_BYTES: Final = 100  # 2captcha: under 100 bytes -> ERROR_ZERO_CAPTCHA_FILESIZE
_MAX_IMAGE_BYTES: Final = 600 * 1024  # 2captcha: over 600 kB -> ERROR_TOO_BIG_CAPTCHA_FILESIZE
_SITEKEY: Final = re.compile(r"^[A-Za-z0-9_\-]{8,128}$")
_MIN_SCORE_RANGE: Final = (0.1, 0.9)  # CaptchaAI SDK: min_score 0.1-0.9
_HTML_502: Final = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
_FLAG_ON: Final = "1"


@dataclass
class Runtime:
    """Per-application objects: the state, and the pingback sender once started."""

    state: EmulatorState
    sender: PingbackSender | None = None


runtime_key: Final = web.AppKey("runtime", Runtime)


@dataclass(frozen=True)
class _Submission:
    method: str
    kind: str
    enterprise: bool
    challenge: str | None


class _Rejected(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


async def _read_params(request: web.Request) -> tuple[dict[str, str], dict[str, bytes]]:
    """Merge the query string and a urlencoded or multipart body (the body wins)."""
    params: dict[str, str] = dict(request.query)
    files: dict[str, bytes] = {}
    if request.method == "POST":
        form = await request.post()
        for name, value in form.items():
            if isinstance(value, web.FileField):
                files[name] = value.file.read()
            elif isinstance(value, bytes | bytearray):
                params[name] = bytes(value).decode("utf-8", "replace")
            else:
                params[name] = str(value)
    return params, files


class _Replier:
    """Formats replies for one request (plain or JSON, CORS header, plain-error fault)."""

    def __init__(self, state: EmulatorState, params: Mapping[str, str]) -> None:
        self._state = state
        self._json = params.get("json") == _FLAG_ON
        self._headers = (
            {"Access-Control-Allow-Origin": "*"} if params.get("header_acao") == _FLAG_ON else {}
        )

    def ok(self, json_body: Mapping[str, Any], plain: str) -> web.Response:
        if self._json:
            return web.json_response(dict(json_body), headers=self._headers)
        return web.Response(text=plain, headers=self._headers)

    def status(self, code: str) -> web.Response:
        """Reply ``status: 0`` with an error code or ``CAPCHA_NOT_READY``."""
        self._state.reply_codes[code] += 1
        plain_despite_json = code.startswith("ERROR") and self._state.roll(
            self._state.faults.plain_error_rate
        )
        if plain_despite_json:
            self._state.totals["plain_errors_injected"] += 1
        if self._json and not plain_despite_json:
            return web.json_response({"status": 0, "request": code}, headers=self._headers)
        return web.Response(text=code, headers=self._headers)


def _html_502(state: EmulatorState) -> web.Response:
    state.totals["html_502_injected"] += 1
    return web.Response(status=502, text=_HTML_502, content_type="text/html")


def _lose_reply(
    state: EmulatorState, request: web.Request, task: TaskRecord
) -> web.Response | None:
    """Lose the reply of an ``in.php`` that created ``task``, if the fault says so.

    The task stays created, solved and reported by pingback; only the reply is gone, as when a
    proxy gives up on a slow upstream (502) or a connection breaks mid-reply (``drop``).
    """
    mode = state.take_in_reply_lost()
    if mode is None:
        return None
    task.reply_lost = mode
    state.totals["in_replies_lost"] += 1
    if mode == "502":
        return web.Response(status=502, text=_HTML_502, content_type="text/html")
    if request.transport is not None:
        request.transport.abort()
    raise web.HTTPBadGateway  # never written: the connection is already closed


def _sitekey(params: Mapping[str, str], name: str) -> str:
    if name not in params:
        raise _Rejected("ERROR_WRONG_GOOGLEKEY")  # 2captcha: "googlekey missing"
    if not _SITEKEY.match(params[name]):
        raise _Rejected("ERROR_GOOGLEKEY")  # "sitekey blank or malformed"
    return params[name]


def _pageurl(params: Mapping[str, str]) -> None:
    if not params.get("pageurl", "").strip():
        raise _Rejected("ERROR_PAGEURL")


def _image_bytes(params: Mapping[str, str], files: Mapping[str, bytes]) -> bytes:
    if "file" in files:
        return files["file"]
    body = params.get("body", "")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _Rejected("ERROR_UPLOAD") from exc


def _validate(params: Mapping[str, str], files: Mapping[str, bytes]) -> _Submission:
    method = params.get("method", "")
    if method == "userrecaptcha":
        _sitekey(params, "googlekey")
        _pageurl(params)
        enterprise = params.get("enterprise") == _FLAG_ON
        is_v3 = params.get("version") == "v3"
        if is_v3 and "min_score" in params:
            try:
                score = float(params["min_score"])
            except ValueError as exc:
                raise _Rejected("ERROR_BAD_PARAMETERS") from exc
            if not _MIN_SCORE_RANGE[0] <= score <= _MIN_SCORE_RANGE[1]:
                raise _Rejected("ERROR_BAD_PARAMETERS")
        kind = "recaptcha_enterprise" if enterprise else "recaptcha_v3" if is_v3 else "recaptcha_v2"
        return _Submission(method, kind, enterprise, None)
    if method in {"turnstile", "hcaptcha"}:
        _sitekey(params, "sitekey")
        _pageurl(params)
        return _Submission(method, method, enterprise=False, challenge=None)
    if method in {"geetest", "geetest_v4"}:
        is_v4 = method == "geetest_v4" or params.get("version") == "4"
        gt = params.get("captcha_id" if method == "geetest_v4" else "gt", "")
        if not gt or (not is_v4 and not params.get("challenge")):
            raise _Rejected("ERROR_BAD_PARAMETERS")
        _pageurl(params)
        if is_v4:
            return _Submission(method, "geetest_v4", enterprise=False, challenge=gt)
        return _Submission(method, "geetest", enterprise=False, challenge=params["challenge"])
    if method in {"base64", "post"}:
        image = _image_bytes(params, files)
        if len(image) < _MIN_IMAGE_BYTES:
            raise _Rejected("ERROR_ZERO_CAPTCHA_FILESIZE")
        if len(image) > _MAX_IMAGE_BYTES:
            raise _Rejected("ERROR_TOO_BIG_CAPTCHA_FILESIZE")
        grid = params.get("recaptcha") == _FLAG_ON or "grid_size" in params
        return _Submission(method, "grid" if grid else "image", enterprise=False, challenge=None)
    raise _Rejected("ERROR_BAD_PARAMETERS")


def _gate(
    state: EmulatorState,
    request: web.Request,
    params: Mapping[str, str],
    note: Callable[[], str | None],
) -> None:
    """Apply the checks every keyed request passes: key, bans, rate limits, server errors."""
    key_error = state.check_key(params.get("key"), peer=request.remote or "unknown")
    if key_error is not None:
        raise _Rejected(key_error)
    limited = note()
    if limited is not None:
        raise _Rejected(limited)
    if state.roll(state.faults.server_error_rate):
        raise _Rejected("ERROR_SERVER_ERROR")


async def handle_in(request: web.Request) -> web.Response:
    """``in.php``: validate a submit and create a task."""
    state = request.app[runtime_key].state
    state.sweep()
    state.totals["in_requests"] += 1
    if state.roll(state.faults.in_502_rate):
        return _html_502(state)
    params, files = await _read_params(request)
    replier = _Replier(state, params)
    try:
        _gate(state, request, params, state.note_in_request)
        submission = _validate(params, files)
        task = state.submit(
            method=submission.method,
            kind=submission.kind,
            enterprise=submission.enterprise,
            challenge=submission.challenge,
            pingback_url=params.get("pingback") or None,
        )
    except (_Rejected, SubmitRejectedError) as rejection:
        return replier.status(rejection.code)
    lost = _lose_reply(state, request, task)
    if lost is not None:
        return lost
    task_id: int | str = int(task.task_id) if state.config.id_type is IdType.INT else task.task_id
    return replier.ok({"status": 1, "request": task_id}, f"OK|{task.task_id}")


def _lookup(state: EmulatorState, raw_id: str | None) -> TaskRecord:
    if not raw_id or not raw_id.strip().isdigit():
        raise _Rejected("ERROR_WRONG_ID_FORMAT")
    task = state.tasks.get(raw_id.strip())
    if task is None:
        raise _Rejected("ERROR_WRONG_CAPTCHA_ID")
    return task


def _answer_code(task: TaskRecord) -> str | None:
    """Return the status code of a task without an answer, else ``None``."""
    if task.state == UNSOLVABLE:
        return UNSOLVABLE_CODE
    if task.state != SOLVED or task.token is None:
        return NOT_READY
    return None


def _get(state: EmulatorState, replier: _Replier, params: Mapping[str, str]) -> web.Response:
    task = _lookup(state, params.get("id"))
    task.res_calls += 1
    code = _answer_code(task)
    if code is not None:
        return replier.status(code)
    assert task.token is not None
    body: dict[str, Any] = {"status": 1, "request": task.token}
    if task.enterprise:
        # CaptchaAI SDK reads Enterprise answers from `result` + `user_agent`.
        body["result"] = task.token
        body["user_agent"] = task.user_agent
    if params.get("action") == "get2":
        price = f"{state.config.price:g}"
        body["price"] = price
        return replier.ok(body, f"OK|{task.token}|{price}")
    return replier.ok(body, f"OK|{task.token}")


def _get_bulk(state: EmulatorState, replier: _Replier, raw_ids: str) -> web.Response:
    ids = [item.strip() for item in raw_ids.split(",") if item.strip()]
    if not ids or len(ids) > state.config.bulk_max_ids:
        raise _Rejected("ERROR_BAD_PARAMETERS")
    state.totals["res_bulk_requests"] += 1
    items: list[str] = []
    for raw_id in ids:
        try:
            task = _lookup(state, raw_id)
        except _Rejected as rejection:
            items.append(rejection.code)
            continue
        task.res_calls += 1
        task.res_bulk_calls += 1
        items.append(_answer_code(task) or str(task.token))
    joined = "|".join(items)
    return replier.ok({"status": 1, "request": joined}, joined)


def _report(
    state: EmulatorState, replier: _Replier, params: Mapping[str, str], *, good: bool
) -> web.Response:
    task = _lookup(state, params.get("id"))
    code = state.report(task, good=good)
    if code != "OK_REPORT_RECORDED":
        return replier.status(code)
    return replier.ok({"status": 1, "request": code}, code)


def _pingback_action(
    state: EmulatorState, replier: _Replier, action: str, params: Mapping[str, str]
) -> web.Response:
    if action == "get_pingback":
        addrs = list(state.pingback_addrs)
        return replier.ok({"status": 1, "request": addrs}, "|".join(["OK", *addrs]))
    addr = params.get("addr", "")
    if not addr:
        raise _Rejected("ERROR_BAD_PARAMETERS")
    if action == "add_pingback":
        if addr not in state.pingback_addrs:
            state.pingback_addrs.append(addr)
        return replier.ok({"status": 1, "request": "OK_PINGBACK"}, "OK")
    if addr == "all":
        state.pingback_addrs.clear()
    elif addr in state.pingback_addrs:
        state.pingback_addrs.remove(addr)
    return replier.ok({"status": 1, "request": "OK"}, "OK")


def _dispatch(state: EmulatorState, replier: _Replier, params: Mapping[str, str]) -> web.Response:
    action = params.get("action", "")
    if not action:
        raise _Rejected("ERROR_EMPTY_ACTION")
    if action == "get" and "ids" in params:
        return _get_bulk(state, replier, params["ids"])
    if action in {"get", "get2"}:
        return _get(state, replier, params)
    if action == "getbalance":
        balance = f"{state.balance:.5f}"
        return replier.ok({"status": 1, "request": balance}, balance)
    if action == "threadsinfo":
        # Only a JSON shape has been seen; it is sent whether or not json=1 was asked for.
        info = {"threads": state.config.threads, "working_threads": state.working_threads}
        return replier.ok(info, json.dumps(info))
    if action in {"reportbad", "reportgood"}:
        return _report(state, replier, params, good=action == "reportgood")
    if action in {"add_pingback", "get_pingback", "del_pingback"}:
        return _pingback_action(state, replier, action, params)
    raise _Rejected("ERROR_BAD_PARAMETERS")


async def handle_res(request: web.Request) -> web.Response:
    """``res.php``: results and account actions."""
    state = request.app[runtime_key].state
    state.sweep()
    state.totals["res_requests"] += 1
    if state.take_res_502():
        return _html_502(state)
    params, _ = await _read_params(request)
    replier = _Replier(state, params)
    try:
        _gate(state, request, params, state.note_res_request)
        return _dispatch(state, replier, params)
    except _Rejected as rejection:
        return replier.status(rejection.code)


# -- admin ------------------------------------------------------------------------------------


async def admin_healthz(request: web.Request) -> web.Response:
    """Liveness for scripts waiting on a separately started emulator."""
    del request
    return web.Response(text="ok")


async def admin_summary(request: web.Request) -> web.Response:
    """Global totals and current load."""
    return web.json_response(request.app[runtime_key].state.summary())


async def admin_tasks(request: web.Request) -> web.Response:
    """Every remembered task's accounting record."""
    state = request.app[runtime_key].state
    state.sweep()
    return web.json_response({"tasks": [task.as_json() for task in state.tasks.values()]})


async def admin_task(request: web.Request) -> web.Response:
    """One task's accounting record."""
    state = request.app[runtime_key].state
    state.sweep()
    task = state.tasks.get(request.match_info["task_id"])
    if task is None:
        raise web.HTTPNotFound(text="unknown or expired task id")
    return web.json_response(task.as_json())


async def admin_get_faults(request: web.Request) -> web.Response:
    """Return the current fault knobs."""
    return web.json_response(request.app[runtime_key].state.faults.as_json())


async def admin_set_faults(request: web.Request) -> web.Response:
    """Change fault knobs at runtime; the body is a JSON object of knobs."""
    state = request.app[runtime_key].state
    try:
        changes = await request.json()
        state.faults = state.faults.updated(changes)
    except (ValueError, TypeError, AttributeError) as exc:
        raise web.HTTPBadRequest(text=f"expected a JSON object of fault knobs: {exc}") from exc
    return web.json_response(state.faults.as_json())


def _number(value: object) -> float:
    """A JSON number as a float (``TypeError`` for anything else, booleans included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("expected a number")
    return float(value)


async def admin_res_502_burst(request: web.Request) -> web.Response:
    """Answer ``res.php`` with an HTML 502 page: the next N requests, or for S seconds.

    ``{"seconds": S}`` is an outage (a span of time, see ``EmulatorState.res_502_outage``;
    with ``"until_met": true`` the next request meets it even if none came while it lasted);
    ``{"count": N}`` hits exactly N requests, for tests that need that many failures.
    """
    state = request.app[runtime_key].state
    try:
        body = await request.json()
        if "seconds" in body:
            until_met = body.get("until_met", False)
            if not isinstance(until_met, bool):
                raise TypeError("until_met")  # noqa: TRY301 - answered as the 400 below
            state.res_502_outage(_number(body["seconds"]), until_met=until_met)
        else:
            state.res_502_burst = max(0, int(body["count"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise web.HTTPBadRequest(
            text='expected {"count": N} or {"seconds": S} (a finite number >= 0) with an'
            ' optional "until_met": true | false'
        ) from exc
    return web.json_response(state.res_502_faults())


async def admin_in_reply_lost(request: web.Request) -> web.Response:
    """Lose the replies of the next N ``in.php`` requests that create a task."""
    state = request.app[runtime_key].state
    try:
        body = await request.json()
        if body.get("clear") is True:
            cleared = len(state.in_reply_lost)
            state.in_reply_lost.clear()
            return web.json_response({"in_reply_lost_cleared": cleared})
        state.lose_in_replies(int(body["count"]), mode=str(body.get("mode", "502")))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise web.HTTPBadRequest(
            text='expected {"count": N, "mode": "502"|"drop"} or {"clear": true}'
        ) from exc
    return web.json_response({"in_reply_lost_remaining": len(state.in_reply_lost)})


async def admin_reset(request: web.Request) -> web.Response:
    """Forget tasks, counters and bans."""
    request.app[runtime_key].state.reset()
    return web.json_response({"reset": True})


async def _pingback_context(app: web.Application) -> AsyncIterator[None]:
    """Own the pingback session for the app's lifetime (acquired and released in a pair)."""
    runtime = app[runtime_key]
    async with aiohttp.ClientSession() as session:
        runtime.sender = PingbackSender(runtime.state, session)
        yield
        await runtime.sender.close()
        runtime.state.close()


def create_app(config: EmulatorConfig, *, state: EmulatorState | None = None) -> web.Application:
    """Build the emulator application.

    Parameters
    ----------
    config
        The emulated account.
    state
        A pre-built state (to inject a clock); by default one is built from ``config``.
    """
    app = web.Application(client_max_size=_MAX_BODY_BYTES)
    app[runtime_key] = Runtime(state=state or EmulatorState(config))
    app.cleanup_ctx.append(_pingback_context)
    app.add_routes(
        [
            web.route("*", "/in.php", handle_in),
            web.route("*", "/res.php", handle_res),
            web.get(f"{ADMIN_PREFIX}/healthz", admin_healthz),
            web.get(f"{ADMIN_PREFIX}/summary", admin_summary),
            web.get(f"{ADMIN_PREFIX}/tasks", admin_tasks),
            web.get(f"{ADMIN_PREFIX}/tasks/{{task_id}}", admin_task),
            web.get(f"{ADMIN_PREFIX}/faults", admin_get_faults),
            web.post(f"{ADMIN_PREFIX}/faults", admin_set_faults),
            web.post(f"{ADMIN_PREFIX}/faults/res-502-burst", admin_res_502_burst),
            web.post(f"{ADMIN_PREFIX}/faults/in-reply-lost", admin_in_reply_lost),
            web.post(f"{ADMIN_PREFIX}/reset", admin_reset),
        ]
    )
    return app
