"""Pingback delivery to a real aiohttp receiver on 127.0.0.1, with every fault knob."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from captchatask.emulator.config import DEFAULT_API_KEY, EmulatorConfig, Faults, PingbackStyle
from captchatask.emulator.pingback import is_allowed_url, is_loopback_url
from captchatask.emulator.server import RunningEmulator, run_emulator

SITEKEY = "6LeIxAcTAAAAAJcZVRqyHh71UMIEGNQ_MXjiZKhI"


@dataclass
class Receiver:
    url: str
    hits: list[dict[str, str]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # popped per request; then 200


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    box: list[Receiver] = []

    async def handle(request: web.Request) -> web.Response:
        form = await request.post()
        hit = {"method": request.method, **request.query, **{k: str(v) for k, v in form.items()}}
        box[0].hits.append(hit)
        status = box[0].statuses.pop(0) if box[0].statuses else 200
        return web.Response(status=status, text="ok")

    app = web.Application()
    app.router.add_route("*", "/cb", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    box.append(Receiver(url=str(server.make_url("/cb"))))
    try:
        yield box[0]
    finally:
        await server.close()


async def submit(session: aiohttp.ClientSession, emulator: RunningEmulator, pingback: str) -> str:
    fields = {
        "key": DEFAULT_API_KEY,
        "method": "userrecaptcha",
        "googlekey": SITEKEY,
        "pageurl": "https://example.com/",
        "pingback": pingback,
    }
    async with session.post(f"{emulator.base_url}/in.php", data=fields) as response:
        text = await response.text()
    assert text.startswith("OK|"), text
    return text[3:]


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - polls emulator state, which has no event
            await asyncio.sleep(0.002)


def config(**faults: object) -> EmulatorConfig:
    return EmulatorConfig(seed=5, solve_time_scale=0.0, faults=Faults().updated(faults))


async def settle(emulator: RunningEmulator, ids: list[str]) -> None:
    await until(lambda: all(emulator.task(task_id).finished for task_id in ids))
    await emulator.drain_pingbacks()


async def test_captchaai_style_get_keeps_existing_query(session: aiohttp.ClientSession) -> None:
    async with receiver() as rx, run_emulator(config()) as emulator:
        task_id = await submit(session, emulator, f"{rx.url}?task=ns%2Fname&sig=abc")
        await settle(emulator, [task_id])
        assert rx.hits == [
            {
                "method": "GET",
                "task": "ns/name",
                "sig": "abc",
                "id": task_id,
                "code": emulator.task(task_id).token or "",
            }
        ]
        record = emulator.task(task_id).as_json()["pingback"]
        assert record["outcome"] == "delivered"
        assert record["attempts"][0]["status"] == 200
        assert len(record["sent_at"]) == 1


async def test_2captcha_style_post_form(session: aiohttp.ClientSession) -> None:
    async with receiver() as rx, run_emulator(config(pingback_style="2c-post")) as emulator:
        task_id = await submit(session, emulator, rx.url)
        await settle(emulator, [task_id])
        assert rx.hits == [
            {"method": "POST", "id": task_id, "code": emulator.task(task_id).token or ""}
        ]


async def test_unsolvable_tasks_send_the_error_code_unless_disabled(
    session: aiohttp.ClientSession,
) -> None:
    for errors, expected in ((True, ["ERROR_CAPTCHA_UNSOLVABLE"]), (False, [])):
        cfg = EmulatorConfig(
            solve_time_scale=0.0, unsolvable_rate=1.0, faults=Faults(pingback_errors=errors)
        )
        async with receiver() as rx, run_emulator(cfg) as emulator:
            task_id = await submit(session, emulator, rx.url)
            await settle(emulator, [task_id])
            assert [hit["code"] for hit in rx.hits] == expected
            assert emulator.task(task_id).pingback_outcome == (
                "delivered" if errors else "not_sent"
            )


async def test_drop_rate_sends_nothing_but_the_result_stays_pollable(
    session: aiohttp.ClientSession,
) -> None:
    async with receiver() as rx, run_emulator(config(pingback_drop_rate=1.0)) as emulator:
        task_id = await submit(session, emulator, rx.url)
        await settle(emulator, [task_id])
        assert rx.hits == []
        assert emulator.task(task_id).pingback_outcome == "dropped"
        assert emulator.summary()["totals"]["pingbacks_dropped"] == 1
        assert emulator.task(task_id).state == "solved"


async def test_duplicate_rate_sends_twice(session: aiohttp.ClientSession) -> None:
    async with receiver() as rx, run_emulator(config(pingback_duplicate_rate=1.0)) as emulator:
        task_id = await submit(session, emulator, rx.url)
        await settle(emulator, [task_id])
        assert [hit["id"] for hit in rx.hits] == [task_id, task_id]
        assert emulator.task(task_id).pingback_copies == 2
        assert emulator.summary()["totals"]["pingback_duplicates_sent"] == 1


async def test_delay_and_late_fraction_are_recorded(session: aiohttp.ClientSession) -> None:
    cfg = config(pingback_delay=[0.01, 0.02], pingback_late_rate=1.0, pingback_late_delay=0.05)
    async with receiver() as rx, run_emulator(cfg) as emulator:
        task_id = await submit(session, emulator, rx.url)
        await until(lambda: emulator.task(task_id).finished)
        assert rx.hits == []  # not yet: it is delayed
        await emulator.drain_pingbacks()
        assert len(rx.hits) == 1
        assert emulator.summary()["totals"]["pingbacks_late"] == 1


async def test_reorder_window_releases_in_shuffled_order(session: aiohttp.ClientSession) -> None:
    async with receiver() as rx, run_emulator(config(pingback_reorder_window=0.05)) as emulator:
        ids = [await submit(session, emulator, rx.url) for _ in range(8)]
        await settle(emulator, ids)
        received = [hit["id"] for hit in rx.hits]
        assert sorted(received) == sorted(ids)
        assert received != ids  # seed 5 shuffles 8 items into another order


async def test_receiver_down_is_not_retried_by_default(session: aiohttp.ClientSession) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/cb"
    async with run_emulator(config()) as emulator:
        task_id = await submit(session, emulator, dead)
        await settle(emulator, [task_id])
        attempts = emulator.task(task_id).pingback_attempts
        assert len(attempts) == 1
        assert attempts[0].error is not None
        assert emulator.task(task_id).pingback_outcome == "failed"


async def test_retries_until_the_receiver_recovers(session: aiohttp.ClientSession) -> None:
    async with (
        receiver() as rx,
        run_emulator(config(pingback_retries=3, pingback_retry_delay=0.0)) as emulator,
    ):
        rx.statuses = [503, 502]
        task_id = await submit(session, emulator, rx.url)
        await settle(emulator, [task_id])
        assert [attempt.status for attempt in emulator.task(task_id).pingback_attempts] == [
            503,
            502,
            200,
        ]
        assert emulator.task(task_id).pingback_outcome == "delivered"
        assert emulator.summary()["totals"]["pingback_retries"] == 2


async def test_a_4xx_receiver_reply_is_rejected_not_retried(session: aiohttp.ClientSession) -> None:
    async with receiver() as rx, run_emulator(config(pingback_retries=3)) as emulator:
        rx.statuses = [403]
        task_id = await submit(session, emulator, rx.url)
        await settle(emulator, [task_id])
        assert len(rx.hits) == 1
        assert emulator.task(task_id).pingback_outcome == "rejected"


async def test_faults_change_at_runtime(session: aiohttp.ClientSession) -> None:
    async with receiver() as rx, run_emulator(config()) as emulator:
        emulator.set_faults(pingback_style=PingbackStyle.TWOC_POST.value, pingback_drop_rate=0.0)
        task_id = await submit(session, emulator, rx.url)
        await settle(emulator, [task_id])
        assert rx.hits[0]["method"] == "POST"


async def test_non_loopback_targets_are_refused_and_never_contacted(
    session: aiohttp.ClientSession,
) -> None:
    async with run_emulator(config()) as emulator:
        task_id = await submit(session, emulator, "http://192.0.2.1/cb")
        await settle(emulator, [task_id])
        assert emulator.task(task_id).pingback_outcome == "refused"
        assert emulator.task(task_id).pingback_attempts == []


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1:8080/cb", True),
        ("http://127.5.6.7/cb", True),
        ("https://localhost/cb", True),
        ("http://[::1]:80/cb", True),
        ("http://192.0.2.1/cb", False),
        ("http://example.com/cb", False),
        ("http://localhost.example.com/cb", False),
        ("ftp://127.0.0.1/cb", False),
        ("not a url", False),
        ("http://[::1/cb", False),
    ],
)
def test_loopback_check(url: str, loopback: bool) -> None:
    assert is_loopback_url(url) is loopback


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://127.0.0.1:8080/cb", True),
        ("http://receiver.ns.svc/v1/pingback/x", True),
        ("https://receiver.ns.svc:8443/cb", True),
        ("http://receiver.ns.svc.evil.example/cb", False),
        ("http://other.ns.svc/cb", False),
        ("ftp://receiver.ns.svc/cb", False),
        ("http://[::1/cb", False),
    ],
)
def test_named_pingback_hosts_are_allowed_and_nothing_else(url: str, allowed: bool) -> None:
    """An e2e in a cluster sends pingbacks to a receiver Service by name; only that name opens."""
    assert is_allowed_url(url, frozenset({"receiver.ns.svc"})) is allowed


async def test_a_host_not_listed_is_still_refused(session: aiohttp.ClientSession) -> None:
    cfg = EmulatorConfig(seed=5, solve_time_scale=0.0, pingback_hosts=frozenset({"rx.test"}))
    async with run_emulator(cfg) as emulator:
        task_id = await submit(session, emulator, "http://192.0.2.1/cb")
        await settle(emulator, [task_id])
        assert emulator.task(task_id).pingback_outcome == "refused"
