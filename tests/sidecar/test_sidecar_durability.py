"""The failure table of the seed, as tests: API server stopped, receiver killed, disk torn or full.

Every test runs the real sidecar process; the kube-apiserver is frozen with SIGSTOP (the
``control_plane`` fixture's ``pause()``), the sidecar killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import resource
import secrets
import signal
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest

from captchatask import kube
from captchatask.decision import Result
from captchatask.model import DeliveredBy, Phase, TaskRef
from captchatask_sidecar.pingback import OUTCOME_HEADER
from captchatask_sidecar.spool import Spool
from captchatask_sidecar.spoolformat import SpoolRecord, frame

if TYPE_CHECKING:
    from tests.sidecar.conftest import Cluster, SidecarFactory

UrlFor = Callable[[str, TaskRef], str]
Pause = Callable[[], AbstractContextManager[None]]


async def test_pingbacks_during_an_api_server_outage_are_spooled_then_drained(
    sidecar: SidecarFactory,
    cluster: Cluster,
    namespace: str,
    http: aiohttp.ClientSession,
    url_for: UrlFor,
    pause_apiserver: Pause,
) -> None:
    tasks = await cluster.many_submitted(namespace, 500, prefix="outage")
    process = sidecar(kubeconfig=cluster.kubeconfig, namespace=namespace)
    gate = asyncio.Semaphore(64)

    async def send(index: int) -> tuple[int, str]:
        task = tasks[index]
        async with (
            gate,
            http.get(
                url_for(process.pingback_url, task.ref),
                params={"id": str(10_000 + index), "code": f"tok-{index}"},
            ) as response,
        ):
            return response.status, response.headers.get(OUTCOME_HEADER, "")

    with pause_apiserver():
        answers = await asyncio.gather(*(send(i) for i in range(500)))
        assert Counter(answers) == {(200, "spooled"): 500}
        metrics = await process.metrics(http)
        assert metrics[("captchatask_pingback_spool_depth", ())] == 500
    # SIGCONT: the drainer notices within its backoff and replays everything.

    async def all_solved() -> bool:
        listing = await cluster.client.list(kube.TASKS, namespace)
        phases = Counter(item.get("status", {}).get("phase") for item in listing["items"])
        return phases.get("Solved", 0) == 500

    await cluster.wait_for(all_solved, what="500 spooled results in the ledger")
    for index in (0, 250, 499):
        view = await cluster.task(namespace, f"outage-{index}")
        assert view is not None
        assert (view.solution_token, view.delivered_by) == (f"tok-{index}", DeliveredBy.PINGBACK)

    async def drained() -> bool:
        metrics = await process.metrics(http)
        return metrics[("captchatask_pingback_spool_depth", ())] == 0

    await cluster.wait_for(drained, what="the spool to drain")
    metrics = await process.metrics(http)
    replayed = sum(
        metrics[("captchatask_spool_replays_total", (outcome,))]
        for outcome in ("recorded", "duplicate")
    )
    assert replayed == 500
    assert [p for p in process.spool_dir.iterdir() if p.stat().st_size] == []  # compacted


async def test_a_result_acknowledged_just_before_a_sigkill_reaches_the_ledger_after_restart(
    sidecar: SidecarFactory,
    cluster: Cluster,
    namespace: str,
    http: aiohttp.ClientSession,
    url_for: UrlFor,
    pause_apiserver: Pause,
) -> None:
    task = await cluster.submitted(namespace, "killed", "31337")
    first = sidecar(kubeconfig=cluster.kubeconfig, namespace=namespace)
    with pause_apiserver():
        async with http.post(
            url_for(first.pingback_url, task.ref), data={"id": "31337", "code": "tok-kill"}
        ) as response:
            assert response.status == 200
            assert response.headers[OUTCOME_HEADER] == "spooled"
        first.kill()  # the only copy of the result is now the spool on the volume
        second = sidecar(
            kubeconfig=cluster.kubeconfig, namespace=namespace, spool_dir=first.spool_dir
        )

    async def solved() -> bool:
        view = await cluster.task(namespace, "killed")
        return view is not None and view.phase is Phase.SOLVED

    await cluster.wait_for(solved, what="the spooled result after a restart")
    view = await cluster.task(namespace, "killed")
    assert view is not None
    assert view.solution_token == "tok-kill"
    assert "replayed from disk" in second.log_text()


async def test_sigterm_drains_an_in_flight_pingback_before_exiting(
    sidecar: SidecarFactory,
    cluster: Cluster,
    namespace: str,
    http: aiohttp.ClientSession,
    url_for: UrlFor,
    pause_apiserver: Pause,
) -> None:
    task = await cluster.submitted(namespace, "terminated", "4040")
    process = sidecar(kubeconfig=cluster.kubeconfig, namespace=namespace)
    with pause_apiserver():
        request = asyncio.create_task(
            http.get(
                url_for(process.pingback_url, task.ref), params={"id": "4040", "code": "tok-t"}
            )
        )
        await asyncio.sleep(0.1)  # the request is now waiting for the frozen API server
        assert process.process is not None
        process.process.send_signal(signal.SIGTERM)
        response = await request
        assert response.status == 200
        assert response.headers[OUTCOME_HEADER] == "spooled"
        response.release()
        assert await asyncio.to_thread(process.stop) == 0
    reopened = Spool(process.spool_dir)
    assert reopened.open() == 1
    await reopened.close()


async def test_a_torn_spool_tail_is_skipped_and_the_rest_is_replayed(
    sidecar: SidecarFactory, cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    task = await cluster.submitted(namespace, "torn", "777")
    spool_dir = tmp_path / "torn-spool"
    spool_dir.mkdir()
    good = SpoolRecord(
        ref=task.ref,
        result=Result.solved(
            token="tok-torn", delivered_by=DeliveredBy.PINGBACK, provider_task_id="777"
        ),
        received_at=1_800_000_000.0,
        received_by="previous-pod",
        source="get",
    )
    torn = frame(good.encode())[:17]
    (spool_dir / "spool-000000000001.log").write_bytes(frame(good.encode()) + torn)
    process = sidecar(kubeconfig=cluster.kubeconfig, namespace=namespace, spool_dir=spool_dir)

    async def solved() -> bool:
        view = await cluster.task(namespace, "torn")
        return view is not None and view.phase is Phase.SOLVED

    await cluster.wait_for(solved, what="the intact record to be replayed")
    assert "discarded a torn tail of 17 bytes" in process.log_text()


async def test_a_spooled_result_received_before_the_operator_failed_its_task_becomes_its_outcome(
    sidecar: SidecarFactory, cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    # The API server was away: the receiver acknowledged the pingback into its spool, and the
    # operator failed the task (deadline) before the drainer could replay it.
    failed = await cluster.failed_by_operator(namespace, "spooled-in-time", "778")
    assert failed.finished_at is not None
    spool_dir = tmp_path / "late-spool"
    spool_dir.mkdir()
    record = SpoolRecord(
        ref=failed.ref,
        result=Result.solved(
            token="tok-in-time", delivered_by=DeliveredBy.PINGBACK, provider_task_id="778"
        ),
        received_at=failed.finished_at.timestamp() - 1.0,
        received_by="previous-pod",
        source="get",
    )
    (spool_dir / "spool-000000000001.log").write_bytes(frame(record.encode()))
    sidecar(kubeconfig=cluster.kubeconfig, namespace=namespace, spool_dir=spool_dir)

    async def solved() -> bool:
        view = await cluster.task(namespace, "spooled-in-time")
        return view is not None and view.phase is Phase.SOLVED

    await cluster.wait_for(solved, what="the spooled result to replace the failure")
    view = await cluster.task(namespace, "spooled-in-time")
    assert view is not None
    assert (view.solution_token, view.delivered_by) == ("tok-in-time", DeliveredBy.PINGBACK)
    assert "failure" not in view.status
    assert await cluster.dead_letters(namespace) == []


async def test_refused_requests_make_no_api_call_and_write_nothing(
    sidecar: SidecarFactory,
    unreachable: Path,
    key_file: Path,
    http: aiohttp.ClientSession,
    url_for: UrlFor,
) -> None:
    key = key_file.read_text().strip()  # noqa: ASYNC240 - a tiny file, before any I/O
    process = sidecar(kubeconfig=unreachable, namespace="apps")
    ref = TaskRef("apps", "victim", str(uuid.uuid4()))
    url = url_for(process.pingback_url, ref)
    forged = url[:-6] + "AAAAAA"
    attempts = [
        http.get(forged, params={"id": "1", "code": "x"}),
        http.get(url, params={"id": "1"}),
        http.get(url, params={"id": "../1", "code": "x"}),
        http.post(url, data=b"x" * 200_000, headers={"Content-Type": "text/plain"}),
        http.post(url, data=b"{", headers={"Content-Type": "application/json"}),
        http.get(url.replace("/apps/", "/other/"), params={"id": "1", "code": "x"}),
    ]
    for attempt in attempts:
        async with attempt as response:
            assert 400 <= response.status < 500
    metrics = await process.metrics(http)
    assert metrics[("captchatask_pingbacks_total", ("rejected",))] == len(attempts)
    for reason in ("timeout", "unavailable", "api_error", "dead_letter_failed"):
        assert metrics[("captchatask_ledger_write_errors_total", (reason,))] == 0
    assert metrics[("captchatask_pingback_spool_depth", ())] == 0
    assert all(p.stat().st_size == 0 for p in process.spool_dir.glob("spool-*.log"))
    assert key not in process.log_text()


async def test_a_spool_that_cannot_be_written_answers_503_and_turns_unready(
    sidecar: SidecarFactory,
    unreachable: Path,
    http: aiohttp.ClientSession,
    url_for: UrlFor,
) -> None:
    limit = 4096  # bytes any file of the process may reach: the volume is "full"

    def full_volume() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    process = sidecar(kubeconfig=unreachable, namespace="apps", preexec=full_volume)
    statuses: list[int] = []
    for index in range(40):
        ref = TaskRef("apps", f"full-{index}", str(uuid.uuid4()))
        async with http.get(
            url_for(process.pingback_url, ref),
            params={"id": str(index), "code": secrets.token_urlsafe(64)},
        ) as response:
            statuses.append(response.status)
            if response.status == 503:
                assert (await response.json())["detail"] == "not stored, retry later"
                break
    assert statuses[-1] == 503
    assert set(statuses[:-1]) <= {200}
    async with http.get(process.admin_url + "/readyz") as response:
        assert response.status == 503
        assert "spool cannot be written" in (await response.json())["detail"]
    metrics = await process.metrics(http)
    assert metrics[("captchatask_pingback_spool_depth", ())] == statuses.count(200)
    assert metrics[("captchatask_spool_write_errors_total", ())] >= 1


@pytest.mark.parametrize("flag", ["--ledger-budget-seconds=-1", "--dialect=anticaptcha"])
async def test_bad_configuration_exits_2_with_the_setting_named(
    sidecar: SidecarFactory, unreachable: Path, flag: str
) -> None:
    process = sidecar(kubeconfig=unreachable, namespace="apps", run=False)
    process.argv.append(flag)
    proc = await asyncio.create_subprocess_exec(
        *process.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _out, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"CAPTCHATASK_" in err
