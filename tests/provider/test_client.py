"""ProviderClient against the emulator over real HTTP on 127.0.0.1.

Waits are never slept for real: a RecordingSleep records the waits the client asks for (the
assertions are on that sequence) and moves the emulator's manual clock or waits for a condition.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from captchatask.emulator.config import (
    DEFAULT_API_KEY,
    BusyBehaviour,
    EmulatorConfig,
    Faults,
    IdType,
)
from captchatask.emulator.server import RunningEmulator, run_emulator
from captchatask.emulator.testing import ManualClock, RecordingSleep
from captchatask.provider.client import ProviderClient
from captchatask.provider.codes import Classification, Dialect, Verdict
from captchatask.provider.errors import (
    ConfigError,
    ProviderError,
    RetryLaterError,
    SubmitAmbiguousError,
    TaskFailedError,
    UnknownReplyError,
)
from captchatask.provider.replies import Solution, ThreadsInfo
from captchatask.provider.tasks import build_submit_params

SITEKEY = "6LeIxAcTAAAAAJcZVRqyHh71UMIEGNQ_MXjiZKhI"
PAGE = "https://example.com/"
V2 = {"type": "RecaptchaV2", "siteKey": SITEKEY, "pageURL": PAGE}
FAST = EmulatorConfig(seed=7, solve_time_scale=0.0)


def params(
    spec: dict[str, Any] | None = None, dialect: Dialect = Dialect.CAPTCHAAI
) -> dict[str, str]:
    return build_submit_params(spec or V2, dialect=dialect, pingback_url=None)


class Observed:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, endpoint: str, outcome: str, seconds: float) -> None:
        assert seconds >= 0
        self.calls.append((endpoint, outcome))


def make_client(
    session: aiohttp.ClientSession,
    base_url: str,
    *,
    dialect: Dialect = Dialect.CAPTCHAAI,
    sleep: RecordingSleep | None = None,
    observer: Observed | None = None,
    api_key: str = DEFAULT_API_KEY,
    **kwargs: Any,
) -> ProviderClient:
    return ProviderClient(
        session=session,
        base_url=base_url,
        api_key=api_key,
        dialect=dialect,
        timeout=5.0,
        observer=observer,
        sleep=sleep or RecordingSleep(),
        rng=random.Random(1),
        **kwargs,
    )


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - polls emulator state, which has no event
            await asyncio.sleep(0.002)


async def solved(emulator: RunningEmulator, task_id: str) -> None:
    await until(lambda: emulator.task(task_id).finished)


def within_jitter(waits: list[float], documented: list[float]) -> bool:
    return len(waits) == len(documented) and all(
        base <= wait <= base * 1.1 for wait, base in zip(waits, documented, strict=True)
    )


async def test_submit_and_poll_returns_exactly_the_issued_token(
    session: aiohttp.ClientSession,
) -> None:
    async with run_emulator(FAST) as emulator:
        observer = Observed()
        client = make_client(session, emulator.base_url, observer=observer)
        task_id = await client.submit(params())
        await solved(emulator, task_id)
        result = await client.get_result(task_id)
        assert result == Solution(token=emulator.task(task_id).token or "")
        assert observer.calls == [("submit", "ok"), ("get", "ok")]
        assert emulator.task(task_id).res_calls == 1


async def test_not_ready_is_a_classification_not_an_error(session: aiohttp.ClientSession) -> None:
    config = EmulatorConfig(solve_times={"recaptcha_v2": (60.0, 60.0)})
    async with run_emulator(config) as emulator:
        observer = Observed()
        client = make_client(session, emulator.base_url, observer=observer)
        result = await client.get_result(await client.submit(params()))
        assert isinstance(result, Classification)
        assert (result.verdict, result.wait_seconds) == (Verdict.NOT_READY, 5.0)
        assert observer.calls[-1] == ("get", "not_ready")


async def test_string_ids_and_enterprise_answers(session: aiohttp.ClientSession) -> None:
    config = EmulatorConfig(seed=1, solve_time_scale=0.0, id_type=IdType.STR)
    async with run_emulator(config) as emulator:
        client = make_client(session, emulator.base_url)
        task_id = await client.submit(params({**V2, "type": "RecaptchaEnterprise"}))
        await solved(emulator, task_id)
        result = await client.get_result(task_id)
        assert isinstance(result, Solution)
        assert result.token == emulator.task(task_id).token
        assert result.user_agent == config.user_agent


async def test_geetest_answer_is_decoded(session: aiohttp.ClientSession) -> None:
    async with run_emulator(FAST) as emulator:
        client = make_client(session, emulator.base_url)
        spec = {
            "type": "GeeTest",
            "siteKey": "gt-key",
            "pageURL": PAGE,
            "geetest": {"challenge": "ch1"},
        }
        task_id = await client.submit(params(spec))
        await solved(emulator, task_id)
        result = await client.get_result(task_id)
        assert isinstance(result, Solution)
        assert isinstance(result.data, dict)
        assert result.data["challenge"] == "ch1"
        assert result.token == emulator.task(task_id).token


async def test_image_submit_goes_multipart_and_solves(session: aiohttp.ClientSession) -> None:
    async with run_emulator(FAST) as emulator:
        client = make_client(session, emulator.base_url)
        body = "aGVsbG8gd29ybGQh" * 20  # 240 bytes decoded
        task_id = await client.submit(params({"type": "Image", "image": {"body": body}}))
        await solved(emulator, task_id)
        result = await client.get_result(task_id)
        assert isinstance(result, Solution)
        assert result.token == emulator.task(task_id).token
        assert emulator.task(task_id).kind == "image"


async def test_unsolvable_and_expired_tasks_are_task_failures(
    session: aiohttp.ClientSession,
) -> None:
    clock = ManualClock()
    config = EmulatorConfig(solve_time_scale=0.0, unsolvable_rate=1.0, retention_seconds=60)
    async with run_emulator(config, clock=clock) as emulator:
        client = make_client(session, emulator.base_url)
        task_id = await client.submit(params())
        await solved(emulator, task_id)
        result = await client.get_result(task_id)
        assert isinstance(result, Classification)
        assert (result.verdict, result.code) == (Verdict.TASK_FAILED, "ERROR_CAPTCHA_UNSOLVABLE")
        clock.advance(61)
        gone = await client.get_result(task_id)
        assert isinstance(gone, Classification)
        assert (gone.verdict, gone.code) == (Verdict.TASK_FAILED, "ERROR_WRONG_CAPTCHA_ID")


async def test_html_502_burst_is_retried_with_exponential_backoff_and_recovers(
    session: aiohttp.ClientSession,
) -> None:
    async with run_emulator(FAST) as emulator:
        sleep, observer = RecordingSleep(), Observed()
        client = make_client(session, emulator.base_url, sleep=sleep, observer=observer)
        task_id = await client.submit(params())
        await solved(emulator, task_id)
        emulator.burst_res_502(2)
        result = await client.get_result(task_id)
        assert isinstance(result, Solution)
        assert within_jitter(sleep.waits, [5.0, 10.0])
        assert [outcome for _, outcome in observer.calls[1:]] == ["http_5xx", "http_5xx", "ok"]
        assert emulator.summary()["totals"]["html_502_injected"] == 2


async def test_502_burst_longer_than_the_budget_raises_retry_later(
    session: aiohttp.ClientSession,
) -> None:
    async with run_emulator(FAST) as emulator:
        sleep = RecordingSleep()
        client = make_client(session, emulator.base_url, sleep=sleep, transport_retries=2)
        emulator.burst_res_502(10)
        with pytest.raises(RetryLaterError) as caught:
            await client.get_balance()
        assert caught.value.classification.code == "HTTP_5XX"
        assert within_jitter(sleep.waits, [5.0, 10.0])


async def test_busy_threads_with_no_slot_wait_five_seconds_and_recover(
    session: aiohttp.ClientSession,
) -> None:
    config = EmulatorConfig(
        threads=1, busy=BusyBehaviour.NO_SLOT, solve_times={"recaptcha_v2": (0.05, 0.05)}
    )
    async with run_emulator(config) as emulator:
        sleep = RecordingSleep(until=lambda: emulator.state.working_threads == 0)
        observer = Observed()
        client = make_client(session, emulator.base_url, sleep=sleep, observer=observer)
        await client.submit(params())
        second = await client.submit(params())
        assert within_jitter(sleep.waits, [5.0])
        assert observer.calls == [("submit", "ok"), ("submit", "retry_later"), ("submit", "ok")]
        assert emulator.task(second).in_calls == 1
        assert emulator.summary()["reply_codes"] == {"ERROR_NO_SLOT_AVAILABLE": 1}


async def test_busy_threads_with_zero_balance_depend_on_the_dialect(
    session: aiohttp.ClientSession,
) -> None:
    config = EmulatorConfig(
        threads=1, busy=BusyBehaviour.ZERO_BALANCE, solve_times={"recaptcha_v2": (60.0, 60.0)}
    )
    async with run_emulator(config) as emulator:
        sleep = RecordingSleep()
        captchaai = make_client(session, emulator.base_url, sleep=sleep)
        await captchaai.submit(params())
        assert await captchaai.threads_info() == ThreadsInfo(threads=1, working_threads=1)
        with pytest.raises(RetryLaterError) as busy:
            await captchaai.submit(params())
        assert (busy.value.classification.code, busy.value.classification.wait_seconds) == (
            "ERROR_ZERO_BALANCE",
            60.0,
        )
        assert sleep.waits == []  # 60 s is too long to block a worker: raised at once
        twocaptcha = make_client(session, emulator.base_url, dialect=Dialect.TWOCAPTCHA)
        with pytest.raises(ConfigError):
            await twocaptcha.submit(params())


async def test_queue_mode_accepts_and_solves_in_order(session: aiohttp.ClientSession) -> None:
    config = EmulatorConfig(
        threads=1, busy=BusyBehaviour.QUEUE, solve_times={"recaptcha_v2": (0.02, 0.02)}
    )
    async with run_emulator(config) as emulator:
        client = make_client(session, emulator.base_url)
        first = await client.submit(params())
        second = await client.submit(params())
        assert emulator.task(second).state == "queued"
        await solved(emulator, second)
        first_task, second_task = emulator.task(first), emulator.task(second)
        assert first_task.finished_at is not None
        assert second_task.started_at is not None
        assert second_task.started_at >= first_task.finished_at
        assert isinstance(await client.get_result(second), Solution)


async def test_max_user_turn_waits_ten_seconds_and_recovers(session: aiohttp.ClientSession) -> None:
    clock = ManualClock()
    config = EmulatorConfig(solve_time_scale=0.0, max_user_turn=True, max_user_turn_limit=2)
    async with run_emulator(config, clock=clock) as emulator:
        sleep = RecordingSleep(clock=clock)
        client = make_client(session, emulator.base_url, sleep=sleep)
        for _ in range(3):
            await client.submit(params())
        assert within_jitter(sleep.waits, [10.0])
        assert emulator.summary()["reply_codes"] == {"MAX_USER_TURN": 1}
        assert emulator.summary()["totals"]["tasks_created"] == 3


async def test_res_rate_limit_1005_is_raised_with_its_block_time(
    session: aiohttp.ClientSession,
) -> None:
    clock = ManualClock()
    config = EmulatorConfig(res_rate_limit=True, res_limit_per_task=0, res_limit_base=2)
    async with run_emulator(config, clock=clock) as emulator:
        sleep = RecordingSleep(clock=clock)
        client = make_client(session, emulator.base_url, sleep=sleep)
        await client.get_balance()
        await client.get_balance()
        with pytest.raises(RetryLaterError) as blocked:
            await client.get_balance()
        assert (blocked.value.classification.code, blocked.value.classification.wait_seconds) == (
            "ERROR: 1005",
            300.0,
        )
        assert sleep.waits == []
        clock.advance(300)
        assert await client.get_balance() == pytest.approx(100.0)


async def test_bulk_polls_use_one_request_on_2captcha(session: aiohttp.ClientSession) -> None:
    config = EmulatorConfig(
        seed=3, solve_times={"recaptcha_v2": (0.0, 0.0), "turnstile": (60.0, 60.0)}
    )
    async with run_emulator(config) as emulator:
        observer = Observed()
        client = make_client(
            session, emulator.base_url, dialect=Dialect.TWOCAPTCHA, observer=observer
        )
        ready = [await client.submit(params(dialect=Dialect.TWOCAPTCHA)) for _ in range(2)]
        pending = await client.submit(
            params(
                {"type": "Turnstile", "siteKey": "0x4AAAAAAAB", "pageURL": PAGE}, Dialect.TWOCAPTCHA
            )
        )
        for task_id in ready:
            await solved(emulator, task_id)
        results = await client.get_results([*ready, pending, "1234567890"])
        for task_id in ready:
            assert results[task_id] == Solution(token=emulator.task(task_id).token or "")
            assert emulator.task(task_id).res_bulk_calls == 1
        not_ready = results[pending]
        assert isinstance(not_ready, Classification)
        assert not_ready.verdict is Verdict.NOT_READY
        missing = results["1234567890"]
        assert isinstance(missing, Classification)
        assert missing.code == "ERROR_WRONG_CAPTCHA_ID"
        assert observer.calls[-1] == ("get_bulk", "ok")
        assert emulator.summary()["totals"]["res_bulk_requests"] == 1


async def test_bulk_is_off_for_captchaai_and_falls_back_to_single_gets(
    session: aiohttp.ClientSession,
) -> None:
    async with run_emulator(FAST) as emulator:
        client = make_client(session, emulator.base_url)
        ids = [await client.submit(params()) for _ in range(3)]
        for task_id in ids:
            await solved(emulator, task_id)
        results = await client.get_results(ids)
        assert all(isinstance(result, Solution) for result in results.values())
        assert "res_bulk_requests" not in emulator.summary()["totals"]
        forced = make_client(session, emulator.base_url, bulk_results=True, bulk_max_ids=2)
        await forced.get_results(ids)
        assert emulator.summary()["totals"]["res_bulk_requests"] == 1  # 2 ids bulk + 1 single


async def test_account_calls_and_reports(session: aiohttp.ClientSession) -> None:
    async with run_emulator(FAST) as emulator:
        client = make_client(session, emulator.base_url)
        task_id = await client.submit(params())
        await solved(emulator, task_id)
        assert await client.get_balance() == pytest.approx(100.0 - FAST.price)
        assert await client.threads_info() == ThreadsInfo(threads=50, working_threads=0)
        assert await client.report(task_id, good=False) is True
        assert await client.report(task_id, good=True) is False  # duplicate report
        with pytest.raises(TaskFailedError):
            await client.report("12", good=True)


async def test_rejected_spec_is_a_task_failure_even_as_plain_text_despite_json(
    session: aiohttp.ClientSession,
) -> None:
    config = EmulatorConfig(faults=Faults(plain_error_rate=1.0))
    async with run_emulator(config) as emulator:
        client = make_client(session, emulator.base_url)
        bad = {**params(), "pageurl": ""}
        with pytest.raises(TaskFailedError) as caught:
            await client.submit(bad)
        assert caught.value.classification.code == "ERROR_PAGEURL"
        assert emulator.summary()["totals"]["plain_errors_injected"] == 1


async def test_connection_failures_back_off_exponentially_then_raise(
    session: aiohttp.ClientSession,
) -> None:
    async with run_emulator(FAST) as emulator:
        dead_url = emulator.base_url
    sleep, observer = RecordingSleep(), Observed()
    client = make_client(session, dead_url, sleep=sleep, observer=observer)
    with pytest.raises(RetryLaterError) as caught:
        await client.get_result("1234567890")
    assert caught.value.classification.code == "CONNECT_ERROR"  # refused: nothing was sent
    assert within_jitter(sleep.waits, [5.0, 10.0, 20.0])
    assert [outcome for _, outcome in observer.calls] == ["transport_error"] * 4


@asynccontextmanager
async def scripted(
    bodies: list[tuple[int, str]],
) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A real server on 127.0.0.1 answering with the given (status, body) pairs in turn."""
    seen: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        form = await request.post()
        seen.append(
            {
                "path": request.path,
                "method": request.method,
                "query": dict(request.query),
                "content_type": request.content_type,
                "form": {name: str(value) for name, value in form.items()},
            }
        )
        status, body = bodies.pop(0) if len(bodies) > 1 else bodies[0]
        return web.Response(status=status, text=body)

    app = web.Application()
    app.router.add_route("*", "/{name}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), seen
    finally:
        await server.close()


async def test_requests_are_posts_with_the_key_in_the_body(session: aiohttp.ClientSession) -> None:
    async with scripted([(200, '{"status":1,"request":1234567890}')]) as (url, seen):
        client = make_client(session, url)
        assert await client.submit(params()) == "1234567890"
        assert await client.submit({"method": "base64", "body": "QUJD"}) == "1234567890"
    form_submit, image_submit = seen
    assert form_submit["method"] == "POST"
    assert form_submit["query"] == {}
    assert form_submit["content_type"] == "application/x-www-form-urlencoded"
    assert form_submit["form"]["key"] == DEFAULT_API_KEY
    assert form_submit["form"]["json"] == "1"
    assert image_submit["content_type"] == "multipart/form-data"
    assert image_submit["form"]["body"] == "QUJD"


async def test_unknown_codes_are_counted_and_never_crash_a_poll(
    session: aiohttp.ClientSession,
) -> None:
    async with scripted([(200, '{"status":0,"request":"ERROR_BRAND_NEW"}')]) as (url, _):
        observer = Observed()
        client = make_client(session, url, observer=observer)
        result = await client.get_result("1234567890")
        assert isinstance(result, Classification)
        assert (result.verdict, result.wait_seconds) == (Verdict.UNKNOWN, 30.0)
        with pytest.raises(UnknownReplyError):
            await client.submit(params())
        assert [outcome for _, outcome in observer.calls] == ["unknown", "unknown"]


async def test_garbage_200_replies_to_a_poll_are_retried_as_unparseable(
    session: aiohttp.ClientSession,
) -> None:
    async with scripted([(200, "<html>maintenance</html>"), (200, "OK|ANSWER")]) as (url, _):
        sleep = RecordingSleep()
        client = make_client(session, url, sleep=sleep)
        assert await client.get_result("1234567890") == Solution(token="ANSWER")
        assert within_jitter(sleep.waits, [5.0])


async def test_a_garbage_200_reply_to_a_submit_is_ambiguous_and_not_repeated(
    session: aiohttp.ClientSession,
) -> None:
    async with scripted([(200, "<html>maintenance</html>"), (200, "OK|1234567890")]) as (url, seen):
        sleep = RecordingSleep()
        client = make_client(session, url, sleep=sleep)
        with pytest.raises(SubmitAmbiguousError) as caught:
            await client.submit(params())
        assert caught.value.classification.code == "UNPARSEABLE_REPLY"
        assert len(seen) == 1
        assert sleep.waits == []


SECRET_KEY = "SECRETKEY-do-not-leak-0123456789"  # 32 characters, recognisable


async def test_the_api_key_never_appears_in_errors_reprs_or_logs(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[ProviderError] = []
    async with run_emulator(FAST) as emulator:
        for key in ("x" + SECRET_KEY, SECRET_KEY):  # wrong format, then unknown
            with pytest.raises(ConfigError) as caught:
                await make_client(session, emulator.base_url, api_key=key).submit(params())
            errors.append(caught.value)
    config = EmulatorConfig(
        solve_times={"recaptcha_v2": (60.0, 60.0)},
        api_keys=frozenset({SECRET_KEY}),
        threads=1,
        busy=BusyBehaviour.ZERO_BALANCE,
    )
    async with run_emulator(config) as emulator:
        client = make_client(session, emulator.base_url, api_key=SECRET_KEY)
        assert SECRET_KEY not in repr(client)
        assert SECRET_KEY not in str(vars(client))
        emulator.burst_res_502(10)
        with pytest.raises(RetryLaterError) as fivexx:
            await client.get_balance()
        errors.append(fivexx.value)
        emulator.burst_res_502(0)
        with pytest.raises(TaskFailedError) as spec:
            await client.submit({"method": "nope"})
        errors.append(spec.value)
        await client.submit(params())
        with pytest.raises(RetryLaterError) as busy:
            await client.submit(params())
        errors.append(busy.value)
        dead_url = emulator.base_url
    with pytest.raises(RetryLaterError) as transport:
        await make_client(session, dead_url, api_key=SECRET_KEY).get_result("1")
    errors.append(transport.value)
    async with scripted([(200, '{"status":0,"request":"ERROR_NEW"}')]) as (url, _):
        with pytest.raises(UnknownReplyError) as unknown_code:
            await make_client(session, url, api_key=SECRET_KEY).get_balance()
        errors.append(unknown_code.value)
    assert len(errors) == 7
    for error in errors:
        chain = [error, error.__cause__, error.__context__]
        for item in chain:
            assert SECRET_KEY not in str(item)
            assert SECRET_KEY not in repr(item)
        assert SECRET_KEY[:10] not in str(error.classification)
    assert caplog.records, "the client logs its failures"
    for record in caplog.records:
        assert SECRET_KEY not in record.getMessage()
        assert SECRET_KEY not in repr(record.__dict__)


async def test_a_bulk_reply_that_cannot_be_split_falls_back_to_one_get_per_id(
    session: aiohttp.ClientSession,
) -> None:
    """Nothing escapes a ``|`` inside an answer: rather one call per id than no result at all."""
    singles = [(200, json.dumps({"status": 1, "request": f"tok{n}"})) for n in (1, 2, 3)]
    async with scripted([(200, "a|b|c|d"), *singles]) as (url, seen):
        client = make_client(session, url, dialect=Dialect.TWOCAPTCHA, transport_retries=0)

        results = await client.get_results(["1", "2", "3"])

    assert results == {str(n): Solution(token=f"tok{n}") for n in (1, 2, 3)}
    assert [request["form"].get("ids") for request in seen] == ["1,2,3", None, None, None]
    assert [request["form"].get("id") for request in seen] == [None, "1", "2", "3"]
