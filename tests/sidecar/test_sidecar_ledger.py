"""The sidecar process against the real API server: pingbacks reach the ledger exactly once.

Each test starts ``python -m captchatask_sidecar`` and talks to it over real HTTP; tasks are put
into ``Submitted`` with ``Ledger.update_status`` as the operator would.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from captchatask import kube
from captchatask.model import DeliveredBy, Phase, TaskRef
from captchatask_sidecar.pingback import OUTCOME_HEADER

if TYPE_CHECKING:
    from tests.sidecar.conftest import Cluster, SidecarFactory, SidecarProcess

UrlFor = Callable[[str, TaskRef], str]


@pytest.fixture
async def running(sidecar: SidecarFactory, cluster: Cluster, namespace: str) -> SidecarProcess:
    return sidecar(kubeconfig=cluster.kubeconfig, namespace=namespace)


async def test_get_and_post_pingbacks_in_every_shape_are_recorded(
    running: SidecarProcess,
    cluster: Cluster,
    namespace: str,
    http: aiohttp.ClientSession,
    url_for: UrlFor,
) -> None:
    tasks = [await cluster.submitted(namespace, f"shape-{i}", str(500 + i)) for i in range(4)]
    urls = [url_for(running.pingback_url, task.ref) for task in tasks]
    form = aiohttp.FormData({"id": "502", "code": "tok-multipart"})
    form.add_field("pad", "x", content_type="text/plain")  # forces multipart/form-data
    answers = [
        http.get(urls[0], params={"id": "500", "code": "tok-get"}),
        http.post(urls[1], data={"id": "501", "code": "tok-form"}),
        http.post(urls[2], data=form),
        http.post(
            urls[3],
            json={
                "taskId": 503,
                "errorId": 0,
                "status": "ready",
                "solution": {"token": "tok-json", "userAgent": "UA/2"},
            },
        ),
    ]
    for request in answers:
        async with request as response:
            assert response.status == 200, await response.text()
            assert response.headers[OUTCOME_HEADER] == "recorded"
    expected = ["tok-get", "tok-form", "tok-multipart", "tok-json"]
    for task, token in zip(tasks, expected, strict=True):
        view = await cluster.task(namespace, task.ref.name)
        assert view is not None
        assert (view.phase, view.solution_token, view.delivered_by) == (
            Phase.SOLVED,
            token,
            DeliveredBy.PINGBACK,
        )
    last = await cluster.task(namespace, tasks[3].ref.name)
    assert last is not None
    assert last.status["solution"]["userAgent"] == "UA/2"


async def test_an_error_pingback_fails_the_task_with_its_code(
    running: SidecarProcess,
    cluster: Cluster,
    namespace: str,
    http: aiohttp.ClientSession,
    url_for: UrlFor,
) -> None:
    task = await cluster.submitted(namespace, "unsolvable", "600")
    async with http.post(
        url_for(running.pingback_url, task.ref),
        data={"id": "600", "code": "ERROR_CAPTCHA_UNSOLVABLE"},
    ) as response:
        assert response.status == 200
    view = await cluster.task(namespace, "unsolvable")
    assert view is not None
    assert view.phase is Phase.FAILED
    assert view.status["failure"]["code"] == "ERROR_CAPTCHA_UNSOLVABLE"


async def test_the_same_pingback_fifty_times_at_once_is_recorded_once(
    sidecar: SidecarFactory,
    cluster: Cluster,
    namespace: str,
    http: aiohttp.ClientSession,
    url_for: UrlFor,
) -> None:
    # This is about fifty compare-and-set writes racing, not about the ledger budget: on a busy
    # machine some writes outlast the 0.5 s default and are (correctly) spooled instead, which
    # the spool tests cover. A generous budget and a limit of writes in flight fixed above fifty
    # keep every write on the ledger path (the adaptive limit would spool most of them at once).
    running = sidecar(
        kubeconfig=cluster.kubeconfig,
        namespace=namespace,
        flags={
            "ledger-budget-seconds": "30",
            "ledger-min-in-flight": "64",
            "ledger-max-in-flight": "64",
        },
    )
    task = await cluster.submitted(namespace, "fifty", "700")
    url = url_for(running.pingback_url, task.ref)

    async def send() -> str:
        async with http.get(url, params={"id": "700", "code": "tok-700"}) as response:
            assert response.status == 200
            return response.headers[OUTCOME_HEADER]

    outcomes = Counter(await asyncio.gather(*(send() for _ in range(50))))
    assert outcomes == {"recorded": 1, "duplicate": 49}
    metrics = await running.metrics(http)
    assert metrics[("captchatask_pingbacks_total", ("recorded",))] == 1
    assert metrics[("captchatask_pingbacks_total", ("duplicate",))] == 49
    view = await cluster.task(namespace, "fifty")
    assert view is not None
    assert view.solution_token == "tok-700"


async def test_a_pingback_for_a_task_solved_by_polling_is_late(
    running: SidecarProcess,
    cluster: Cluster,
    namespace: str,
    http: aiohttp.ClientSession,
    url_for: UrlFor,
) -> None:
    from captchatask.decision import Result  # noqa: PLC0415

    task = await cluster.submitted(namespace, "polled", "800")
    polled = Result.solved(token="tok-poll", delivered_by=DeliveredBy.POLL, provider_task_id="800")
    await cluster.ledger.record(task.ref, polled)
    async with http.get(
        url_for(running.pingback_url, task.ref), params={"id": "800", "code": "tok-poll"}
    ) as response:
        assert response.status == 200
        assert response.headers[OUTCOME_HEADER] == "late"
    view = await cluster.task(namespace, "polled")
    assert view is not None
    assert view.delivered_by is DeliveredBy.POLL
    assert "pingbackAt" in view.status


async def test_a_pingback_after_the_operator_failed_its_task_is_kept_as_a_dead_letter(
    running: SidecarProcess,
    cluster: Cluster,
    namespace: str,
    http: aiohttp.ClientSession,
    url_for: UrlFor,
) -> None:
    failed = await cluster.failed_by_operator(namespace, "failed-first", "810")
    async with http.get(
        url_for(running.pingback_url, failed.ref), params={"id": "810", "code": "tok-after"}
    ) as response:
        assert response.status == 200
        assert response.headers[OUTCOME_HEADER] == "dead_lettered"
    (letter,) = await cluster.dead_letters(namespace)
    assert letter["spec"]["reason"] == "TaskFailed"
    assert letter["spec"]["payload"]["code"] == "tok-after"
    assert letter["spec"]["taskRef"] == {"name": "failed-first", "uid": failed.ref.uid}
    view = await cluster.task(namespace, "failed-first")
    assert view is not None
    assert view.phase is Phase.FAILED


async def test_unapplicable_pingbacks_become_dead_letters_with_their_reason(
    running: SidecarProcess,
    cluster: Cluster,
    namespace: str,
    http: aiohttp.ClientSession,
    url_for: UrlFor,
) -> None:
    gone = TaskRef(namespace, "never-existed", "0b7c6f1e-6a5e-4d2b-9c1a-2f3e4d5c6b7a")
    old = await cluster.submitted(namespace, "recreated", "901")
    await cluster.client.delete(kube.TASKS, namespace, "recreated")
    await cluster.submitted(namespace, "recreated", "902")
    other = await cluster.submitted(namespace, "other-id", "903")
    cases = [(gone, "900"), (old.ref, "901"), (other.ref, "999")]
    for ref, provider_id in cases:
        async with http.get(
            url_for(running.pingback_url, ref), params={"id": provider_id, "code": "tok-dl"}
        ) as response:
            assert response.status == 200
            assert response.headers[OUTCOME_HEADER] == "dead_lettered"
    letters = {
        letter["spec"]["taskRef"]["name"]: letter["spec"]
        for letter in await cluster.dead_letters(namespace)
    }
    assert letters["never-existed"]["reason"] == "TaskNotFound"
    assert letters["recreated"]["reason"] == "TaskRecreated"
    assert letters["recreated"]["taskRef"]["uid"] == old.ref.uid
    assert letters["other-id"]["reason"] == "ProviderTaskMismatch"
    assert letters["other-id"]["payload"] == {"code": "tok-dl", "source": "get"}
    assert letters["other-id"]["receivedBy"].startswith("sidecar-test-")
    untouched = await cluster.task(namespace, "other-id")
    assert untouched is not None
    assert untouched.phase is Phase.SUBMITTED


async def test_a_long_poll_returns_the_solution_after_a_pingback(
    running: SidecarProcess,
    cluster: Cluster,
    namespace: str,
    http: aiohttp.ClientSession,
    url_for: UrlFor,
) -> None:
    task = await cluster.submitted(namespace, "waited", "1000")

    async def long_poll() -> dict[str, Any]:
        async with http.get(
            f"{running.local_url}/v1/tasks/waited", params={"wait": "60"}
        ) as response:
            assert response.status == 200
            return dict(await response.json())

    waiting = asyncio.create_task(long_poll())
    await asyncio.sleep(0.3)  # let the long-poll register (not required for correctness)
    async with http.get(
        url_for(running.pingback_url, task.ref), params={"id": "1000", "code": "tok-waited"}
    ) as response:
        assert response.status == 200
    body = await waiting
    assert body["done"] is True
    assert body["phase"] == "Solved"
    assert body["solution"] == {"token": "tok-waited"}


async def test_a_long_poll_sees_results_written_by_someone_else(
    running: SidecarProcess, cluster: Cluster, namespace: str, http: aiohttp.ClientSession
) -> None:
    from captchatask.decision import Result  # noqa: PLC0415

    task = await cluster.submitted(namespace, "by-operator", "1100")

    async def long_poll() -> dict[str, Any]:
        url = f"{running.local_url}/v1/tasks/by-operator"
        async with http.get(url, params={"wait": "60"}) as response:
            return dict(await response.json())

    waiting = asyncio.create_task(long_poll())
    await asyncio.sleep(0.3)
    failed = Result.failed(
        code="ERROR_CAPTCHA_UNSOLVABLE",
        message="unsolvable",
        delivered_by=DeliveredBy.POLL,
        provider_task_id="1100",
    )
    await cluster.ledger.record(task.ref, failed)
    body = await waiting
    assert body["phase"] == "Failed"
    assert body["failure"]["code"] == "ERROR_CAPTCHA_UNSOLVABLE"


async def test_adopted_task_pingback_before_track_ends_up_on_the_task(
    sidecar: SidecarFactory,
    cluster: Cluster,
    namespace: str,
    http: aiohttp.ClientSession,
) -> None:
    process = sidecar(kubeconfig=cluster.kubeconfig, namespace=namespace, run=False)
    process.argv.append(f"--public-url=http://127.0.0.1:{process.pingback_port}")
    process.start()
    spec = {"type": "RecaptchaV2", "siteKey": "key", "pageURL": "https://site.example/"}
    async with http.post(f"{process.local_url}/v1/tasks:reserve", json=spec) as response:
        assert response.status == 201, await response.text()
        reserved = await response.json()
    assert reserved["external"] is True
    # The app submits to the provider itself; the provider answers before the app tracks it.
    async with http.get(
        reserved["pingbackURL"], params={"id": "4242", "code": "tok-adopt"}
    ) as response:
        assert response.status == 200
        assert response.headers[OUTCOME_HEADER] == "recorded"
    track = {"name": reserved["name"], "providerTaskId": "4242"}
    async with http.post(f"{process.local_url}/v1/tasks:track", json=track) as response:
        assert response.status == 200, await response.text()
        tracked = await response.json()
    assert tracked["phase"] == "Solved"
    assert tracked["solution"] == {"token": "tok-adopt"}
    assert tracked["providerTaskId"] == "4242"
    view = await cluster.task(namespace, reserved["name"])
    assert view is not None
    assert view.spec_provider_task_id == "4242"
    wrong = {"name": reserved["name"], "providerTaskId": "4243"}
    async with http.post(f"{process.local_url}/v1/tasks:track", json=wrong) as response:
        assert response.status == 409
        assert response.content_type == "application/problem+json"


async def test_track_can_adopt_a_task_directly_and_idempotently(
    running: SidecarProcess, cluster: Cluster, namespace: str, http: aiohttp.ClientSession
) -> None:
    body = {
        "providerTaskId": "5151",
        "type": "Turnstile",
        "siteKey": "k",
        "pageURL": "https://a.example/",
    }
    async with http.post(f"{running.local_url}/v1/tasks:track", json=body) as response:
        assert response.status == 201, await response.text()
        first = await response.json()
    async with http.post(f"{running.local_url}/v1/tasks:track", json=body) as response:
        assert response.status == 200
        again = await response.json()
    assert again["name"] == first["name"]
    view = await cluster.task(namespace, first["name"])
    assert view is not None
    assert (view.external, view.spec_provider_task_id) == (True, "5151")


async def test_the_local_api_creates_reads_and_rejects_with_the_api_servers_reason(
    running: SidecarProcess, cluster: Cluster, namespace: str, http: aiohttp.ClientSession
) -> None:
    spec = {"type": "HCaptcha", "siteKey": "k", "pageURL": "https://h.example/"}
    async with http.post(f"{running.local_url}/v1/tasks", json=spec) as response:
        assert response.status == 201
        created = await response.json()
    assert created["name"].startswith("task-")
    assert created["namespace"] == namespace
    async with http.get(f"{running.local_url}/v1/tasks/{created['name']}") as response:
        assert (await response.json())["uid"] == created["uid"]
    invalid = {"type": "HCaptcha", "pageURL": "https://h.example/"}  # siteKey is required
    async with http.post(f"{running.local_url}/v1/tasks", json=invalid) as response:
        assert response.status == 400
        problem = await response.json()
    assert response.content_type == "application/problem+json"
    assert "siteKey" in problem["detail"]
    async with http.post(f"{running.local_url}/v1/tasks", data=b"[1]") as response:
        assert response.status == 400
    async with http.get(f"{running.local_url}/v1/tasks/missing") as response:
        assert response.status == 404
        assert "Traceback" not in json.dumps(await response.json())
