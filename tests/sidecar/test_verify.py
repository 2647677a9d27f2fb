"""Verify-by-poll: the provider's own ``res.php`` answer decides what a pingback records.

Real parts: the CaptchaProvider and its key Secret on the real API server, the emulator over real
HTTP, and tasks the emulator really solved (or failed).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiohttp
import pytest

from captchatask import kube, model
from captchatask.decision import Result, ResultKind
from captchatask.emulator.config import DEFAULT_API_KEY, EmulatorConfig
from captchatask.emulator.server import RunningEmulator, run_emulator
from captchatask.model import DeliveredBy, TaskRef
from captchatask.provider.client import ProviderClient
from captchatask.provider.codes import Dialect
from captchatask.provider.replies import Solution
from captchatask_sidecar.verify import NotConfirmedError, Verifier, VerifyUnavailableError

if TYPE_CHECKING:
    from tests.sidecar.conftest import Cluster

SITE_KEY = "0x4AAAAAAABkMYinukE8nzYS"
REF_UID = "00000000-0000-4000-8000-0000000000aa"


@pytest.fixture
async def emulator() -> AsyncIterator[RunningEmulator]:
    async with run_emulator(EmulatorConfig(seed=5, solve_time_scale=0.001)) as running:
        yield running


async def provider_in(
    client: kube.KubeClient, namespace: str, base_url: str, *, key: str = DEFAULT_API_KEY
) -> None:
    await client.create(
        kube.SECRETS,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "solver-key"},
            "data": {"apiKey": base64.b64encode(key.encode()).decode()},
        },
    )
    await client.create(
        kube.PROVIDERS,
        namespace,
        {
            "apiVersion": model.API_VERSION,
            "kind": model.PROVIDER_KIND,
            "metadata": {"name": "default"},
            "spec": {"baseURL": base_url, "apiKeySecretRef": {"name": "solver-key"}},
        },
    )


async def finished_task(
    session: aiohttp.ClientSession, emulator: RunningEmulator
) -> tuple[str, Solution | None]:
    """Submit straight to the emulator (as an app would) and wait until it is done."""
    solver = ProviderClient(
        session=session,
        base_url=emulator.base_url,
        api_key=DEFAULT_API_KEY,
        dialect=Dialect.CAPTCHAAI,
    )
    task_id = await solver.submit(
        {"method": "turnstile", "sitekey": SITE_KEY, "pageurl": "https://a.example/"}
    )
    for _ in range(200):
        if emulator.task(task_id).finished:
            polled = await solver.get_result(task_id)
            return task_id, polled if isinstance(polled, Solution) else None
        await asyncio.sleep(0.02)
    raise AssertionError("the emulator never finished the task")


def pingback(task_id: str, token: str) -> Result:
    return Result.solved(token=token, delivered_by=DeliveredBy.PINGBACK, provider_task_id=task_id)


async def test_the_providers_answer_replaces_a_forged_one_and_confirms_a_genuine_one(
    cluster: Cluster, http: aiohttp.ClientSession, namespace: str, emulator: RunningEmulator
) -> None:
    client = cluster.ledger.client
    await provider_in(client, namespace, emulator.base_url)
    task_id, solution = await finished_task(http, emulator)
    assert solution is not None
    verifier = Verifier(kube_client=client, session=http, provider="default")
    ref = TaskRef(namespace, "t", REF_UID)
    forged = await verifier.confirm(ref, pingback(task_id, "forged-answer"))
    assert forged.kind is ResultKind.SOLVED
    assert forged.token == solution.token
    genuine = await verifier.confirm(ref, pingback(task_id, solution.token))
    assert genuine.token == solution.token
    with pytest.raises(NotConfirmedError):
        await verifier.confirm(ref, pingback("", solution.token))


async def test_a_task_the_provider_failed_is_recorded_as_failed(
    cluster: Cluster, http: aiohttp.ClientSession, namespace: str
) -> None:
    config = EmulatorConfig(seed=6, solve_time_scale=0.001, unsolvable_rate=1.0)
    async with run_emulator(config) as failing:
        await provider_in(cluster.ledger.client, namespace, failing.base_url)
        task_id, solution = await finished_task(http, failing)
        assert solution is None
        verifier = Verifier(kube_client=cluster.ledger.client, session=http, provider="default")
        result = await verifier.confirm(
            TaskRef(namespace, "t", REF_UID), pingback(task_id, "a-token-nobody-issued")
        )
    assert result.kind is ResultKind.FAILED
    assert result.code == "ERROR_CAPTCHA_UNSOLVABLE"


async def test_a_provider_that_cannot_confirm_makes_the_verifier_unavailable(
    cluster: Cluster, http: aiohttp.ClientSession, namespace: str, emulator: RunningEmulator
) -> None:
    task_id, _ = await finished_task(http, emulator)
    wrong_key = "0" * 32  # a well-formed key the emulator does not know
    await provider_in(cluster.ledger.client, namespace, emulator.base_url, key=wrong_key)
    verifier = Verifier(kube_client=cluster.ledger.client, session=http, provider="default")
    with pytest.raises(VerifyUnavailableError) as caught:
        await verifier.confirm(TaskRef(namespace, "t", REF_UID), pingback(task_id, "x"))
    assert wrong_key not in repr(caught.value)
    assert wrong_key not in str(caught.value.__cause__)
