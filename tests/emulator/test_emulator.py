"""The emulator's solver endpoints and admin API, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from captchatask.emulator.config import (
    DEFAULT_API_KEY,
    BusyBehaviour,
    EmulatorConfig,
    Faults,
    IdType,
)
from captchatask.emulator.server import RunningEmulator, run_emulator
from captchatask.emulator.testing import ManualClock

KEY = DEFAULT_API_KEY
SITEKEY = "6LeIxAcTAAAAAJcZVRqyHh71UMIEGNQ_MXjiZKhI"
PAGE = "https://example.com/"
V2 = {"key": KEY, "method": "userrecaptcha", "googlekey": SITEKEY, "pageurl": PAGE}
FAST = EmulatorConfig(seed=11, solve_time_scale=0.0)
IMAGE = base64.b64encode(b"\x89PNG" + bytes(200)).decode()


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - polls emulator state, which has no event
            await asyncio.sleep(0.002)


async def call(
    session: aiohttp.ClientSession,
    url: str,
    fields: dict[str, str],
    *,
    how: str = "post",
) -> tuple[int, str, CIMultiDictProxy[str]]:
    if how == "get":
        request = session.get(url, params=fields)
    elif how == "multipart":
        form = aiohttp.FormData()
        for name, value in fields.items():
            form.add_field(name, value, content_type="text/plain")
        request = session.post(url, data=form)
    else:
        request = session.post(url, data=fields)
    async with request as response:
        return response.status, await response.text(), response.headers


async def submit(session: aiohttp.ClientSession, emulator: RunningEmulator, **extra: str) -> str:
    _, text, _ = await call(session, f"{emulator.base_url}/in.php", {**V2, **extra})
    assert text.startswith("OK|"), text
    return text[3:]


async def res(session: aiohttp.ClientSession, emulator: RunningEmulator, **fields: str) -> str:
    _, text, _ = await call(session, f"{emulator.base_url}/res.php", {"key": KEY, **fields})
    return text


@pytest.mark.parametrize("how", ["get", "post", "multipart"])
async def test_both_endpoints_accept_get_urlencoded_and_multipart(
    session: aiohttp.ClientSession, how: str
) -> None:
    async with run_emulator(FAST) as emulator:
        _, text, _ = await call(session, f"{emulator.base_url}/in.php", V2, how=how)
        task_id = text.removeprefix("OK|")
        await until(lambda: emulator.task(task_id).finished)
        _, answer, _ = await call(
            session,
            f"{emulator.base_url}/res.php",
            {"key": KEY, "action": "get", "id": task_id},
            how=how,
        )
        assert answer == f"OK|{emulator.task(task_id).token}"


async def test_ids_are_ten_digit_json_ints_by_default_and_strings_when_asked(
    session: aiohttp.ClientSession,
) -> None:
    for id_type, expected in ((IdType.INT, int), (IdType.STR, str)):
        async with run_emulator(EmulatorConfig(id_type=id_type)) as emulator:
            _, text, _ = await call(session, f"{emulator.base_url}/in.php", {**V2, "json": "1"})
            body = json.loads(text)
            assert body["status"] == 1
            assert isinstance(body["request"], expected)
            assert len(str(body["request"])) == 10


async def test_json_and_plain_not_ready_and_header_acao(session: aiohttp.ClientSession) -> None:
    async with run_emulator(EmulatorConfig(solve_time_scale=1000)) as emulator:
        task_id = await submit(session, emulator)
        assert await res(session, emulator, action="get", id=task_id) == "CAPCHA_NOT_READY"
        _, text, headers = await call(
            session,
            f"{emulator.base_url}/res.php",
            {"key": KEY, "action": "get", "id": task_id, "json": "1", "header_acao": "1"},
        )
        assert json.loads(text) == {"status": 0, "request": "CAPCHA_NOT_READY"}
        assert headers["Access-Control-Allow-Origin"] == "*"
        assert emulator.task(task_id).res_calls == 2


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({**V2, "key": "short"}, "ERROR_WRONG_USER_KEY"),
        ({k: v for k, v in V2.items() if k != "key"}, "ERROR_WRONG_USER_KEY"),
        ({**V2, "key": "x" * 32}, "ERROR_KEY_DOES_NOT_EXIST"),
        ({k: v for k, v in V2.items() if k != "pageurl"}, "ERROR_PAGEURL"),
        ({k: v for k, v in V2.items() if k != "googlekey"}, "ERROR_WRONG_GOOGLEKEY"),
        ({**V2, "googlekey": "a b"}, "ERROR_GOOGLEKEY"),
        ({**V2, "version": "v3", "min_score": "2"}, "ERROR_BAD_PARAMETERS"),
        ({**V2, "method": "nonsense"}, "ERROR_BAD_PARAMETERS"),
        ({"key": KEY, "method": "turnstile", "pageurl": PAGE}, "ERROR_WRONG_GOOGLEKEY"),
        ({"key": KEY, "method": "geetest", "gt": "g", "pageurl": PAGE}, "ERROR_BAD_PARAMETERS"),
        ({"key": KEY, "method": "base64", "body": "!!notbase64"}, "ERROR_UPLOAD"),
        ({"key": KEY, "method": "base64", "body": "QUJD"}, "ERROR_ZERO_CAPTCHA_FILESIZE"),
        (
            {"key": KEY, "method": "base64", "body": base64.b64encode(bytes(700_000)).decode()},
            "ERROR_TOO_BIG_CAPTCHA_FILESIZE",
        ),
    ],
)
async def test_submit_validation_errors(
    session: aiohttp.ClientSession, fields: dict[str, str], code: str
) -> None:
    async with run_emulator(FAST) as emulator:
        _, plain, _ = await call(session, f"{emulator.base_url}/in.php", fields)
        assert plain == code
        _, text, _ = await call(session, f"{emulator.base_url}/in.php", {**fields, "json": "1"})
        assert json.loads(text) == {"status": 0, "request": code}


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"action": "get", "id": "abc"}, "ERROR_WRONG_ID_FORMAT"),
        ({"action": "get"}, "ERROR_WRONG_ID_FORMAT"),
        ({"action": "get", "id": "1234567890"}, "ERROR_WRONG_CAPTCHA_ID"),
        ({}, "ERROR_EMPTY_ACTION"),
        ({"action": "whatever"}, "ERROR_BAD_PARAMETERS"),
        ({"action": "reportbad", "id": "1234567890"}, "ERROR_WRONG_CAPTCHA_ID"),
    ],
)
async def test_result_validation_errors(
    session: aiohttp.ClientSession, fields: dict[str, str], code: str
) -> None:
    async with run_emulator(FAST) as emulator:
        assert await res(session, emulator, **fields) == code


async def test_answer_shapes_per_type(session: aiohttp.ClientSession) -> None:
    async with run_emulator(FAST) as emulator:
        ids = {
            "enterprise": await submit(session, emulator, enterprise="1"),
            "v3": await submit(session, emulator, version="v3", action="login", min_score="0.3"),
            "turnstile": await submit(session, emulator, method="turnstile", sitekey="0x4AAAAAAAB"),
            "hcaptcha": await submit(session, emulator, method="hcaptcha", sitekey="a5f74b19-9e45"),
            "geetest": await submit(
                session, emulator, method="geetest", gt="gt-1", challenge="ch-1"
            ),
            "geetest_v4": await submit(
                session, emulator, method="geetest", gt="cid-1", version="4"
            ),
            "image": await submit(session, emulator, method="base64", body=IMAGE),
            "grid": await submit(session, emulator, method="base64", body=IMAGE, grid_size="3x3"),
        }
        await until(lambda: all(emulator.task(task_id).finished for task_id in ids.values()))
        replies = {
            name: json.loads(await res(session, emulator, action="get", id=task_id, json="1"))
            for name, task_id in ids.items()
        }
        enterprise = replies["enterprise"]
        assert (
            enterprise["result"] == enterprise["request"] == emulator.task(ids["enterprise"]).token
        )
        assert enterprise["user_agent"].startswith("Mozilla/5.0")
        assert "result" not in replies["v3"]
        assert emulator.task(ids["v3"]).kind == "recaptcha_v3"
        assert replies["turnstile"]["request"].startswith("0.")
        assert replies["hcaptcha"]["request"].startswith("P1_")
        geetest = json.loads(replies["geetest"]["request"])
        assert set(geetest) == {"challenge", "validate", "seccode"}
        assert geetest["challenge"] == "ch-1"
        assert json.loads(replies["geetest_v4"]["request"])["captcha_id"] == "cid-1"
        assert replies["image"]["request"].isalnum()
        assert isinstance(json.loads(replies["grid"]["request"]), list)
        for name, task_id in ids.items():
            assert replies[name]["request"] == emulator.task(task_id).token


async def test_get2_adds_the_price(session: aiohttp.ClientSession) -> None:
    async with run_emulator(FAST) as emulator:
        task_id = await submit(session, emulator)
        await until(lambda: emulator.task(task_id).finished)
        token = emulator.task(task_id).token
        assert await res(session, emulator, action="get2", id=task_id) == f"OK|{token}|0.001"
        body = json.loads(await res(session, emulator, action="get2", id=task_id, json="1"))
        assert body == {"status": 1, "request": token, "price": "0.001"}


async def test_tokens_are_unique_per_task_and_recorded(session: aiohttp.ClientSession) -> None:
    async with run_emulator(FAST) as emulator:
        ids = [await submit(session, emulator) for _ in range(30)]
        await until(lambda: all(emulator.task(task_id).finished for task_id in ids))
        tokens = [emulator.task(task_id).token for task_id in ids]
        assert len(set(tokens)) == 30
        assert all(tokens)


async def test_unsolvable_rate(session: aiohttp.ClientSession) -> None:
    async with run_emulator(EmulatorConfig(solve_time_scale=0.0, unsolvable_rate=1.0)) as emulator:
        task_id = await submit(session, emulator)
        await until(lambda: emulator.task(task_id).finished)
        assert await res(session, emulator, action="get", id=task_id) == "ERROR_CAPTCHA_UNSOLVABLE"
        assert emulator.task(task_id).token is None
        assert emulator.summary()["totals"]["tasks_unsolvable"] == 1


@pytest.mark.parametrize(
    ("busy", "reply"),
    [
        (BusyBehaviour.ZERO_BALANCE, "ERROR_ZERO_BALANCE"),
        (BusyBehaviour.NO_SLOT, "ERROR_NO_SLOT_AVAILABLE"),
        (BusyBehaviour.QUEUE, "OK|"),
    ],
)
async def test_thread_cap_busy_behaviours(
    session: aiohttp.ClientSession, busy: BusyBehaviour, reply: str
) -> None:
    config = EmulatorConfig(threads=2, busy=busy, solve_time_scale=1000)
    async with run_emulator(config) as emulator:
        await submit(session, emulator)
        await submit(session, emulator)
        _, text, _ = await call(session, f"{emulator.base_url}/in.php", V2)
        assert text.startswith(reply)
        info = json.loads(await res(session, emulator, action="threadsinfo", json="1"))
        assert info == {"threads": 2, "working_threads": 2}


async def test_max_user_turn_bans_submits_for_the_configured_time(
    session: aiohttp.ClientSession,
) -> None:
    clock = ManualClock()
    config = EmulatorConfig(solve_time_scale=0.0, max_user_turn=True, max_user_turn_limit=3)
    async with run_emulator(config, clock=clock) as emulator:
        for _ in range(3):
            await submit(session, emulator)
        _, text, _ = await call(session, f"{emulator.base_url}/in.php", V2)
        assert text == "MAX_USER_TURN"
        clock.advance(9.9)
        assert (await call(session, f"{emulator.base_url}/in.php", V2))[1] == "MAX_USER_TURN"
        clock.advance(0.2)
        await submit(session, emulator)


async def test_res_rate_limit_counts_getbalance_and_scales_with_tasks(
    session: aiohttp.ClientSession,
) -> None:
    clock = ManualClock()
    config = EmulatorConfig(
        solve_time_scale=0.0, res_rate_limit=True, res_limit_per_task=2, res_limit_base=1
    )
    async with run_emulator(config, clock=clock) as emulator:
        await submit(session, emulator)  # allows 2*1 + 1 = 3 res.php requests
        for _ in range(3):
            assert await res(session, emulator, action="getbalance") != "ERROR: 1005"
        assert await res(session, emulator, action="getbalance") == "ERROR: 1005"
        clock.advance(301)
        assert await res(session, emulator, action="getbalance") != "ERROR: 1005"


async def test_bad_keys_get_the_ip_banned(session: aiohttp.ClientSession) -> None:
    clock = ManualClock()
    async with run_emulator(EmulatorConfig(ban_after_bad_keys=2), clock=clock) as emulator:
        for _ in range(2):
            assert (await call(session, f"{emulator.base_url}/in.php", {**V2, "key": "y" * 32}))[
                1
            ] == ("ERROR_KEY_DOES_NOT_EXIST")
        assert (await call(session, f"{emulator.base_url}/in.php", V2))[1] == "IP_BANNED"
        clock.advance(301)
        await submit(session, emulator)


async def test_bulk_get_answers_in_id_order_and_counts_per_id(
    session: aiohttp.ClientSession,
) -> None:
    config = EmulatorConfig(
        solve_times={"recaptcha_v2": (0.0, 0.0), "turnstile": (999.0, 999.0)}, bulk_max_ids=3
    )
    async with run_emulator(config) as emulator:
        done = await submit(session, emulator)
        pending = await submit(session, emulator, method="turnstile", sitekey="0x4AAAAAAAB")
        await until(lambda: emulator.task(done).finished)
        ids = f"{done},{pending},1234567890"
        token = emulator.task(done).token
        expected = f"{token}|CAPCHA_NOT_READY|ERROR_WRONG_CAPTCHA_ID"
        assert await res(session, emulator, action="get", ids=ids) == expected
        assert json.loads(await res(session, emulator, action="get", ids=ids, json="1")) == {
            "status": 1,
            "request": expected,
        }
        assert emulator.task(done).res_bulk_calls == 2
        assert emulator.task(pending).res_calls == 2
        assert emulator.summary()["totals"]["res_bulk_requests"] == 2
        assert await res(session, emulator, action="get", ids=f"{ids},1") == "ERROR_BAD_PARAMETERS"


async def test_balance_and_reports_with_duplicate_and_fifteen_minute_rules(
    session: aiohttp.ClientSession,
) -> None:
    clock = ManualClock()
    config = EmulatorConfig(solve_time_scale=0.0, retention_seconds=3600)
    async with run_emulator(config, clock=clock) as emulator:
        first = await submit(session, emulator)
        second = await submit(session, emulator)
        await until(lambda: emulator.task(first).finished and emulator.task(second).finished)
        assert await res(session, emulator, action="getbalance") == "99.99800"
        assert json.loads(await res(session, emulator, action="getbalance", json="1")) == {
            "status": 1,
            "request": "99.99800",
        }
        assert await res(session, emulator, action="reportbad", id=first) == "OK_REPORT_RECORDED"
        assert (
            await res(session, emulator, action="reportgood", id=first) == "ERROR_DUPLICATE_REPORT"
        )
        clock.advance(901)
        assert (
            await res(session, emulator, action="reportgood", id=second)
            == "ERROR_REPORT_NOT_RECORDED"
        )
        assert emulator.task(first).reported == "bad"


async def test_results_expire_after_retention_and_memory_is_released(
    session: aiohttp.ClientSession,
) -> None:
    clock = ManualClock()
    async with run_emulator(
        EmulatorConfig(solve_time_scale=0.0, retention_seconds=30), clock=clock
    ) as emulator:
        task_id = await submit(session, emulator)
        await until(lambda: emulator.task(task_id).finished)
        token = emulator.task(task_id).token
        clock.advance(29)
        assert await res(session, emulator, action="get", id=task_id) == f"OK|{token}"
        clock.advance(2)
        assert await res(session, emulator, action="get", id=task_id) == "ERROR_WRONG_CAPTCHA_ID"
        assert emulator.tasks() == []
        assert emulator.summary()["totals"]["tasks_expired"] == 1


async def test_max_tasks_evicts_the_oldest_finished(session: aiohttp.ClientSession) -> None:
    async with run_emulator(EmulatorConfig(solve_time_scale=0.0, max_tasks=2)) as emulator:
        first = await submit(session, emulator)
        await until(lambda: emulator.task(first).finished)
        second = await submit(session, emulator)
        await until(lambda: emulator.task(second).finished)
        await submit(session, emulator)
        assert first not in emulator.state.tasks
        assert second in emulator.state.tasks


async def test_a_502_outage_lasts_its_seconds_whatever_the_number_of_requests(
    session: aiohttp.ClientSession,
) -> None:
    """A provider's outage is a time: a slow client does not stretch it, a busy one not shorten it.

    With a burst counted in requests, a client that backs off during the outage meets the
    failures it did not spend long after the outage should have ended (the chaos run's
    restarted operator sat behind 40 of them for 90 s).
    """
    clock = ManualClock()
    admin = "/_emulator/faults/res-502-burst"
    async with run_emulator(FAST, clock=clock) as emulator:
        balance = {"key": KEY, "action": "getbalance"}
        async with session.post(f"{emulator.base_url}{admin}", json={"seconds": 5}) as r:
            assert r.status == 200
            assert (await r.json())["res_502_outage_seconds_left"] == 5
        for _ in range(30):  # more requests than any count-based burst of the chaos plan
            status, text, _ = await call(session, f"{emulator.base_url}/res.php", balance)
            assert status == 502
            assert "<html>" in text
        clock.advance(4.9)
        assert (await call(session, f"{emulator.base_url}/res.php", balance))[0] == 502
        clock.advance(0.2)
        assert (await call(session, f"{emulator.base_url}/res.php", balance))[0] == 200
        assert emulator.summary()["res_502_outage_seconds_left"] == 0
        # Nothing is left over for a client that comes back later.
        clock.advance(60)
        assert (await call(session, f"{emulator.base_url}/res.php", balance))[0] == 200
        assert emulator.summary()["totals"]["html_502_injected"] == 31
        # A second outage while one runs extends it to the later end, never shortens it.
        emulator.res_502_outage(10)
        emulator.res_502_outage(2)
        clock.advance(5)
        assert (await call(session, f"{emulator.base_url}/res.php", balance))[0] == 502
        clock.advance(5.1)
        assert (await call(session, f"{emulator.base_url}/res.php", balance))[0] == 200
        for bad in ({"seconds": -1}, {"seconds": "soon"}, {"seconds": float("inf")}, {}):
            async with session.post(
                f"{emulator.base_url}{admin}", data=json.dumps(bad, allow_nan=True)
            ) as r:
                assert r.status == 400, bad
        assert (await call(session, f"{emulator.base_url}/res.php", balance))[0] == 200


async def test_an_outage_no_request_met_is_met_by_the_next_one_when_asked(
    session: aiohttp.ClientSession,
) -> None:
    """``{"seconds": S, "until_met": true}``: an outage nobody met still meets the next request.

    An outage no request meets is indistinguishable from none: the chaos plan's timed outages,
    drawn at random moments, sometimes fell in quiet spells of polling (a loaded machine moves
    the polls) and a run exercised no 502 at all. The outage still begins at its time and lasts
    its seconds for whoever polls meanwhile; only an outage nobody met is owed to the next one.
    """
    clock = ManualClock()
    admin = "/_emulator/faults/res-502-burst"
    async with run_emulator(FAST, clock=clock) as emulator:
        balance = {"key": KEY, "action": "getbalance"}

        async def res_php() -> int:
            return (await call(session, f"{emulator.base_url}/res.php", balance))[0]

        body = {"seconds": 3, "until_met": True}
        async with session.post(f"{emulator.base_url}{admin}", json=body) as r:
            assert r.status == 200
            assert (await r.json())["res_502_outage_unmet"] is True
        clock.advance(60)  # nobody polled while it lasted
        assert await res_php() == 502
        assert await res_php() == 200  # owed once, not a new outage
        assert emulator.summary()["res_502_outage_unmet"] is False
        # Met while it lasts: exactly a timed outage, nothing owed afterwards.
        emulator.res_502_outage(3, until_met=True)
        clock.advance(1)
        assert await res_php() == 502
        clock.advance(2.1)
        assert await res_php() == 200
        assert emulator.summary()["totals"]["html_502_injected"] == 2
        for bad in ({"seconds": 3, "until_met": "yes"}, {"seconds": 3, "until_met": 1}):
            async with session.post(f"{emulator.base_url}{admin}", json=bad) as r:
                assert r.status == 400, bad
                assert "until_met" in await r.text()
        assert await res_php() == 200


async def test_same_seed_same_ids_tokens_and_timings(session: aiohttp.ClientSession) -> None:
    async def run_once() -> list[tuple[str, str | None, float]]:
        async with run_emulator(EmulatorConfig(seed=42, solve_time_scale=0.0001)) as emulator:
            ids = [await submit(session, emulator) for _ in range(5)]
            await until(lambda: all(emulator.task(task_id).finished for task_id in ids))
            return [(i, emulator.task(i).token, emulator.task(i).solve_seconds) for i in ids]

    assert await run_once() == await run_once()


async def test_html_502_faults_and_server_errors(session: aiohttp.ClientSession) -> None:
    async with run_emulator(FAST) as emulator:
        emulator.burst_res_502(2)
        for _ in range(2):
            status, text, headers = await call(
                session, f"{emulator.base_url}/res.php", {"key": KEY, "action": "getbalance"}
            )
            assert status == 502
            assert "<html>" in text
            assert headers["Content-Type"].startswith("text/html")
        assert (
            await call(
                session, f"{emulator.base_url}/res.php", {"key": KEY, "action": "getbalance"}
            )
        )[0] == 200
        emulator.set_faults(res_502_rate=1.0)
        assert (
            await call(
                session, f"{emulator.base_url}/res.php", {"key": KEY, "action": "getbalance"}
            )
        )[0] == 502
        emulator.set_faults(res_502_rate=0.0, in_502_rate=1.0)
        assert (await call(session, f"{emulator.base_url}/in.php", V2))[0] == 502
        emulator.set_faults(in_502_rate=0.0, server_error_rate=1.0)
        assert (await call(session, f"{emulator.base_url}/in.php", V2))[1] == "ERROR_SERVER_ERROR"
        assert emulator.summary()["totals"]["html_502_injected"] == 4


async def test_plain_text_errors_despite_json(session: aiohttp.ClientSession) -> None:
    async with run_emulator(EmulatorConfig(faults=Faults(plain_error_rate=1.0))) as emulator:
        _, text, _ = await call(
            session, f"{emulator.base_url}/in.php", {**V2, "pageurl": "", "json": "1"}
        )
        assert text == "ERROR_PAGEURL"
        _, ok, _ = await call(session, f"{emulator.base_url}/in.php", {**V2, "json": "1"})
        assert json.loads(ok)["status"] == 1


async def test_pingback_registration_actions(session: aiohttp.ClientSession) -> None:
    async with run_emulator(FAST) as emulator:
        assert await res(session, emulator, action="add_pingback", addr="127.0.0.1") == "OK"
        assert (
            json.loads(
                await res(session, emulator, action="add_pingback", addr="localhost", json="1")
            )["request"]
            == "OK_PINGBACK"
        )
        assert await res(session, emulator, action="get_pingback") == "OK|127.0.0.1|localhost"
        assert await res(session, emulator, action="del_pingback", addr="all") == "OK"
        assert await res(session, emulator, action="get_pingback") == "OK"


async def test_admin_api_accounting_faults_and_reset(session: aiohttp.ClientSession) -> None:
    async with run_emulator(FAST) as emulator:
        admin = f"{emulator.base_url}/_emulator"
        task_id = await submit(session, emulator)
        await until(lambda: emulator.task(task_id).finished)
        await res(session, emulator, action="get", id=task_id)

        async def get_json(path: str) -> Any:
            async with session.get(f"{admin}/{path}") as response:
                assert response.status == 200
                return await response.json()

        record = await get_json(f"tasks/{task_id}")
        assert record["token"] == emulator.task(task_id).token
        assert (record["in_calls"], record["res_calls"], record["state"]) == (1, 1, "solved")
        assert [task["id"] for task in (await get_json("tasks"))["tasks"]] == [task_id]
        summary = await get_json("summary")
        assert summary["totals"]["in_requests"] == 1
        assert summary["seed"] == 11
        async with session.post(
            f"{admin}/faults", json={"pingback_drop_rate": 0.5, "pingback_delay": [0.1, 0.2]}
        ) as r:
            assert (await r.json())["pingback_drop_rate"] == 0.5
        assert (await get_json("faults"))["pingback_delay"] == [0.1, 0.2]
        async with session.post(f"{admin}/faults", json={"no_such_knob": 1}) as r:
            assert r.status == 400
        async with session.post(f"{admin}/faults", json={"res_502_rate": 3}) as r:
            assert r.status == 400
        async with session.post(f"{admin}/faults/res-502-burst", json={"count": 1}) as r:
            assert (await r.json())["res_502_burst_remaining"] == 1
        async with session.get(f"{admin}/healthz") as r:
            assert await r.text() == "ok"
        async with session.post(f"{admin}/reset") as r:
            assert r.status == 200
        async with session.get(f"{admin}/tasks/{task_id}") as r:
            assert r.status == 404
        assert (await get_json("summary"))["totals"] == {}
        assert emulator.state.faults.pingback_drop_rate == 0.5  # reset keeps faults
