"""An ``in.php`` that may have reached the provider is never repeated by the client.

Against the emulator over real HTTP: a reply lost *after* the task was created (an HTML 502 or a
dropped connection) must come back as a :class:`SubmitAmbiguousError` after exactly one request,
so the caller can wait for the task's pingback instead of paying for a second task; a failure
that certainly sent nothing (connection refused) and a well-formed error code are still retried
inside the client. Waits are recorded, never slept.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from captchatask.emulator.config import DEFAULT_API_KEY, BusyBehaviour, EmulatorConfig
from captchatask.emulator.server import run_emulator
from captchatask.emulator.testing import RecordingSleep
from captchatask.provider import codes
from captchatask.provider.client import ProviderClient
from captchatask.provider.codes import Dialect
from captchatask.provider.errors import RetryLaterError, SubmitAmbiguousError
from captchatask.provider.tasks import build_submit_params

V2 = {
    "type": "RecaptchaV2",
    "siteKey": "6LeIxAcTAAAAAJcZVRqyHh71UMIEGNQ_MXjiZKhI",
    "pageURL": "https://example.com/",
}
FAST = EmulatorConfig(seed=7, solve_time_scale=0.0)


def client_for(
    session: aiohttp.ClientSession, base_url: str, sleep: RecordingSleep, **kwargs: Any
) -> ProviderClient:
    return ProviderClient(
        session=session,
        base_url=base_url,
        api_key=DEFAULT_API_KEY,
        dialect=Dialect.CAPTCHAAI,
        timeout=5.0,
        transport_retries=2,
        sleep=sleep,
        **kwargs,
    )


def params() -> dict[str, str]:
    return build_submit_params(V2, dialect=Dialect.CAPTCHAAI, pingback_url=None)


@pytest.mark.parametrize("mode", ["502", "drop"])
async def test_a_submit_whose_reply_was_lost_after_the_task_exists_is_not_repeated(
    session: aiohttp.ClientSession, mode: str
) -> None:
    async with run_emulator(FAST) as emulator:
        emulator.lose_in_replies(1, mode=mode)
        sleep = RecordingSleep()
        client = client_for(session, emulator.base_url, sleep)

        with pytest.raises(SubmitAmbiguousError) as caught:
            await client.submit(params())

        assert caught.value.classification.code in {codes.HTTP_5XX, codes.TRANSPORT_ERROR}
        assert emulator.summary()["totals"]["in_requests"] == 1
        assert [task.reply_lost for task in emulator.tasks()] == [mode]
        assert sleep.waits == []


async def test_a_submit_that_could_not_connect_is_retried_and_is_not_ambiguous(
    session: aiohttp.ClientSession,
) -> None:
    async with run_emulator(FAST) as emulator:
        dead_url = emulator.base_url
    sleep = RecordingSleep()
    client = client_for(session, dead_url, sleep)

    with pytest.raises(RetryLaterError) as caught:
        await client.submit(params())

    assert not isinstance(caught.value, SubmitAmbiguousError)
    assert caught.value.classification.code == codes.CONNECT_ERROR
    assert len(sleep.waits) == 2  # both inline retries were spent: nothing was ever sent


async def test_a_well_formed_error_code_on_submit_is_retried_and_is_not_ambiguous(
    session: aiohttp.ClientSession,
) -> None:
    config = EmulatorConfig(threads=1, busy=BusyBehaviour.NO_SLOT, solve_time_scale=1.0)
    async with run_emulator(config) as emulator:
        sleep = RecordingSleep()
        client = client_for(session, emulator.base_url, sleep)
        await client.submit(params())  # takes the only thread for 20-60 s

        with pytest.raises(RetryLaterError) as caught:
            await client.submit(params())

        assert not isinstance(caught.value, SubmitAmbiguousError)
        assert caught.value.classification.code == "ERROR_NO_SLOT_AVAILABLE"
        assert emulator.summary()["totals"]["in_requests"] == 1 + 3  # the 2nd: 2 inline retries
        assert len(emulator.tasks()) == 1


async def test_polls_still_retry_a_502_inline(session: aiohttp.ClientSession) -> None:
    """Only in.php creates anything: res.php keeps its inline retries after a 5xx."""
    async with run_emulator(FAST) as emulator:
        sleep = RecordingSleep()
        client = client_for(session, emulator.base_url, sleep)
        task_id = await client.submit(params())
        emulator.burst_res_502(1)

        await client.get_result(task_id)

        assert len(sleep.waits) == 1
