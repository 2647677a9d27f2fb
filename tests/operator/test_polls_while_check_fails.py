"""A restarted operator polls the tasks it knows while its provider's account check fails.

The account check (``threadsinfo`` / ``getbalance`` on ``res.php``) says whether new tasks may be
submitted. A transient failure of it (an HTML 5xx page, a timeout) says nothing about results
the provider already holds: an operator that waited for the check to pass before polling would
hold back every recovery for as long as the provider's proxy hiccups, right after a restart,
when the most polls are due. A key the provider rejects is different: every poll with it fails
too, and both providers say to stop sending requests (repeated wrong keys get the client's IP
banned), so polls wait until a check passes with a key that works.

Real kube-apiserver, emulator and operator process (see ``conftest.py``); between the operator
and the emulator a real HTTP proxy answers the account check with nginx's HTML 502 page while
``checks_fail`` is set and forwards everything else.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from tests.operator.conftest import CHECK_ACTIONS, forward, serving

from captchatask import model
from captchatask.emulator.config import DEFAULT_API_KEY, EmulatorConfig
from captchatask.emulator.server import RunningEmulator, run_emulator

FAST_SOLVE = EmulatorConfig(seed=13, threads=50, solve_times={"recaptcha_v2": (1.0, 1.0)})
HTML_502 = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
#: A well-formed key the emulator does not know (``ERROR_KEY_DOES_NOT_EXIST``).
UNKNOWN_KEY = "0" * len(DEFAULT_API_KEY)


class CheckFailingProxy:
    """A real HTTP proxy to the emulator that answers account checks with 502 when told to."""

    def __init__(self, upstream: str, session: aiohttp.ClientSession) -> None:
        self.upstream = upstream
        self.session = session
        self.checks_fail = False
        self.checks_failed = 0
        self.checks_passed = 0
        #: Account checks the provider answered with a rejected key, and polls sent after the
        #: second one (the operator had the first verdict by then: its checks run one at a time).
        self.checks_rejected = 0
        self.polls_after_rejection = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        form = await request.post() if request.method == "POST" else request.query
        action = form.get("action")
        check = action in CHECK_ACTIONS
        if check and self.checks_fail:
            self.checks_failed += 1
            return web.Response(status=502, text=HTML_502, content_type="text/html")
        if action == "get" and self.checks_rejected >= 2:
            self.polls_after_rejection += 1
        response = await forward(self.session, self.upstream, request, body)
        assert isinstance(response.body, bytes)
        if check and b"ERROR_KEY_DOES_NOT_EXIST" in response.body:
            self.checks_rejected += 1
        elif check:
            self.checks_passed += 1
        return response


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[RunningEmulator, CheckFailingProxy, str]]:
    async with run_emulator(FAST_SOLVE) as emulator, aiohttp.ClientSession() as session:
        proxy = CheckFailingProxy(emulator.base_url, session)
        async with serving(proxy.handle) as url:
            yield emulator, proxy, url


async def _solved_after_its_operator_died(
    harness: Any, emulator: RunningEmulator, proxy_url: str
) -> Any:
    """A poll-only task submitted by an operator that was then killed, solved by the solver
    meanwhile: only a restarted operator's poll can bring its answer in. The solver's task."""
    await harness.secret()
    await harness.provider(SimpleNamespace(base_url=proxy_url))  # poll-only: no pingback
    first = harness.start_operator()
    await harness.started(first)
    await harness.task("known")

    async def submitted() -> bool:
        body = await harness.get("known")
        return bool(((body or {}).get("status") or {}).get("providerTaskId"))

    await harness.wait_until(submitted, what="the first operator to submit the task")
    first.kill()
    [solver_task] = emulator.tasks()

    async def solved_by_solver() -> bool:
        return bool(solver_task.finished)

    await harness.wait_until(solved_by_solver, what="the solver to solve it")
    return solver_task


async def test_a_restarted_operator_polls_known_tasks_while_its_account_check_fails_transiently(
    harness: Any, proxy: tuple[RunningEmulator, CheckFailingProxy, str]
) -> None:
    emulator, checks, proxy_url = proxy
    solver_task = await _solved_after_its_operator_died(harness, emulator, proxy_url)

    checks.checks_fail = True
    passed_before = checks.checks_passed
    second = harness.start_operator()
    await harness.started(second)
    [task] = await harness.wait_terminal(1)

    status = task["status"]
    assert status["phase"] == "Solved"
    assert status["deliveredBy"] == "poll"
    assert checks.checks_failed >= 1, "the restarted operator's check met the 502 page"
    assert checks.checks_passed == passed_before, "no check of the restarted operator passed"
    assert solver_task.res_calls >= 1


async def test_no_poll_is_sent_with_a_key_the_provider_rejected_until_a_check_passes(
    harness: Any, proxy: tuple[RunningEmulator, CheckFailingProxy, str]
) -> None:
    emulator, checks, proxy_url = proxy
    await _solved_after_its_operator_died(harness, emulator, proxy_url)

    # Its first poll is due at once (poll-only reCAPTCHA would wait 15 s): the restarted
    # operator polls while it checks the key.
    await harness.set_status("known", {"nextPollAt": model.format_time(dt.datetime.now(dt.UTC))})
    await harness.secret(api_key=UNKNOWN_KEY)  # the key is revoked (or mistyped)
    second = harness.start_operator()
    await harness.started(second)

    async def rejected_repeatedly() -> bool:
        return checks.checks_rejected >= 3  # re-checked every --provider-retry-seconds (1 s)

    await harness.wait_until(rejected_repeatedly, what="the provider to reject the key thrice")
    polls_with_a_rejected_key = checks.polls_after_rejection
    await harness.secret()  # the key is fixed
    [task] = await harness.wait_terminal(1)

    assert task["status"]["phase"] == "Solved"
    assert task["status"]["deliveredBy"] == "poll"
    assert polls_with_a_rejected_key == 0, "polls went out with a key the provider rejected"
