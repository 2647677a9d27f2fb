"""Come back later" answers, against a real HTTP server: retried like client-go, then a clear error.

The server below answers what kube-apiserver answers while a new CRD's watch cache fills (``429``,
``Retry-After: 1``, Status reason ``TooManyRequests``, message "storage is (re)initializing") a
set number of times, then a normal list. The client, the ``captchatask dlq`` command and the
operator's kopf settings all follow the one policy in :mod:`captchatask.kube`.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import kopf
import pytest
from aiohttp import web

from captchatask import kube
from captchatask_operator.handlers import configure_kopf
from captchatask_operator.settings import parse

INITIALIZING = "storage is (re)initializing"


@dataclass
class FakeApiServer:
    """Answers ``busy`` requests with 429 (or ``status``), then 200 with an empty list."""

    busy: int = 0
    status: int = 429
    retry_after: str | None = "1"
    #: Put the wait in the Status body's details instead (the older way of saying it).
    in_details: bool = False
    seen: list[str] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(f"{request.method} {request.path}")
        if len(self.seen) <= self.busy:
            body: dict[str, object] = {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": INITIALIZING,
                "reason": "TooManyRequests",
                "code": self.status,
            }
            headers = {}
            if self.in_details:
                body["details"] = {"retryAfterSeconds": int(self.retry_after or 0)}
            elif self.retry_after is not None:
                headers["Retry-After"] = self.retry_after
            return web.json_response(body, status=self.status, headers=headers)
        return web.json_response(
            {"kind": "CaptchaDeadLetterList", "metadata": {"resourceVersion": "7"}, "items": []}
        )


@pytest.fixture
async def fake() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()


async def list_letters(fake: FakeApiServer, retry: kube.RetryPolicy) -> dict[str, object]:
    config = kube.KubeConfig(server=fake.url)
    async with aiohttp.ClientSession() as session:
        client = kube.KubeClient(config, session, retry=retry)
        return await client.list(kube.DEAD_LETTERS, "demo")


async def test_a_429_with_retry_after_is_retried_until_the_list_answers(
    fake: FakeApiServer,
) -> None:
    fake.busy = 2
    body = await list_letters(fake, kube.DEFAULT_RETRY)
    assert body["items"] == []
    assert len(fake.seen) == 3


async def test_the_retries_are_bounded_then_the_error_says_what_happened(
    fake: FakeApiServer,
) -> None:
    fake.busy, fake.retry_after = 1000, "0"
    with pytest.raises(kube.TooManyRequests) as caught:
        await list_letters(fake, kube.RetryPolicy(max_retries=3))
    assert len(fake.seen) == 4
    error = caught.value
    assert (error.status, error.attempts) == (429, 4)
    assert str(error) == (
        "GET /apis/captchatask.dev/v1alpha1/namespaces/demo/captchadeadletters: the API server "
        f"answered HTTP 429 (TooManyRequests: {INITIALIZING}) to 4 attempt(s) and asked to "
        "retry later; giving up"
    )
    # Callers that spool or postpone while the API server is away treat it the same way.
    assert isinstance(error, kube.KubeUnavailable)


async def test_the_wait_may_come_in_the_status_details(fake: FakeApiServer) -> None:
    fake.busy, fake.in_details = 1, True
    assert (await list_letters(fake, kube.DEFAULT_RETRY))["items"] == []
    assert len(fake.seen) == 2


async def test_a_429_without_a_wait_backs_off_and_retries(fake: FakeApiServer) -> None:
    fake.busy, fake.retry_after = 2, None
    policy = kube.RetryPolicy(backoff_base=0.05)
    assert (await list_letters(fake, policy))["items"] == []
    assert len(fake.seen) == 3


async def test_a_503_is_retried_only_when_the_server_says_when(fake: FakeApiServer) -> None:
    fake.busy, fake.status, fake.retry_after = 1, 503, "0"
    assert (await list_letters(fake, kube.DEFAULT_RETRY))["items"] == []
    assert len(fake.seen) == 2

    fake.seen.clear()
    fake.retry_after = None
    with pytest.raises(kube.KubeUnavailable) as caught:
        await list_letters(fake, kube.DEFAULT_RETRY)
    assert not isinstance(caught.value, kube.TooManyRequests)
    assert len(fake.seen) == 1


async def test_a_budget_gives_up_before_a_wait_it_cannot_afford(fake: FakeApiServer) -> None:
    # The sidecar's hot path has half a second: it spools rather than wait out Retry-After: 1.
    fake.busy = 1000
    with pytest.raises(kube.TooManyRequests):
        await list_letters(fake, kube.RetryPolicy(budget=0.5))
    assert len(fake.seen) == 1


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: fake, cluster: {{server: '{server}'}}}}]\n"
        "users: [{name: me, user: {token: not-a-secret}}]\n"
        "contexts: [{name: fake, context: {cluster: fake, user: me, namespace: demo}}]\n"
        "current-context: fake\n",
        encoding="utf-8",
    )
    return path


async def dlq_list(kubeconfig: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "captchatask",
        "dlq",
        "--kubeconfig",
        str(kubeconfig),
        "list",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_cli_waits_out_an_initializing_api_server(
    fake: FakeApiServer, tmp_path: Path
) -> None:
    fake.busy = 2
    code, out, err = await dlq_list(write_kubeconfig(tmp_path / "kubeconfig", fake.url))
    assert (code, out, err) == (0, "No dead letters in namespace demo.\n", "")
    assert len(fake.seen) == 3


async def test_the_cli_gives_up_after_the_bound_with_a_clear_error(
    fake: FakeApiServer, tmp_path: Path
) -> None:
    fake.busy, fake.retry_after = 1000, "0"
    code, out, err = await dlq_list(write_kubeconfig(tmp_path / "kubeconfig", fake.url))
    assert (code, out) == (1, "")
    attempts = kube.DEFAULT_RETRY.max_retries + 1
    assert len(fake.seen) == attempts
    assert err == (
        "error: GET /apis/captchatask.dev/v1alpha1/namespaces/demo/captchadeadletters: the API "
        f"server answered HTTP 429 (TooManyRequests: {INITIALIZING}) to {attempts} attempt(s) "
        "and asked to retry later; giving up\n"
    )


# configure_kopf still sets kopf's batch window, which kopf 1.45 ignores with this warning.
@pytest.mark.filterwarnings("ignore:Time-based event batching was removed:DeprecationWarning")
def test_the_operators_kopf_client_follows_the_same_policy() -> None:
    kopf_settings = kopf.OperatorSettings()
    configure_kopf(kopf_settings, parse(["--all-namespaces"], {}))
    assert kopf_settings.networking.error_backoffs == kube.DEFAULT_RETRY.kopf_backoffs()
    assert len(kube.DEFAULT_RETRY.kopf_backoffs()) == kube.DEFAULT_RETRY.max_retries
    # A server-named Retry-After wins over the schedule, as in client-go and our client.
    assert kopf_settings.networking.enforce_retry_after is True
