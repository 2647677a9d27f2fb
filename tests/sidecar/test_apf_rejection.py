"""The real sidecar when API Priority and Fairness turns its writes away: spooled, then applied.

The chart's ``apiPriority`` objects put the receiver in a priority level of a few seats, so under
a storm the API server queues its writes there and, once that level's queues are full, answers
``429 Too Many Requests`` at once. That answer comes from the real kube-apiserver's APF filter,
so it is produced here the way a cluster would produce it: a FlowSchema sends the receiver's
ServiceAccount to a level without seats that rejects instead of queueing. Such a level still runs
one request while it runs none, so one write of the same account is made to hold it (etcd is
stopped, so the write waits) — every other request of the account is then refused. A pingback
arriving then must be acknowledged from the fsync'd spool as "unavailable, come back later" (not
a timeout, not an API error) and reach the ledger once the level admits the drainer's replay:
nothing lost, nothing dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from captchatask import kube, testbed
from captchatask.model import DeliveredBy, TaskRef
from captchatask_sidecar.pingback import OUTCOME_HEADER

if TYPE_CHECKING:
    from tests.sidecar.conftest import Cluster, SidecarFactory

UrlFor = Callable[[str, TaskRef], str]

RECEIVER = "receiver"
#: How long the test waits for the API server to take up a FlowSchema (a hang guard).
PATIENCE_SECONDS = 60.0
HTTP_TOO_MANY_REQUESTS = 429


@dataclass(frozen=True)
class Jail:
    """A FlowSchema and a zero-seat, rejecting PriorityLevelConfiguration for one account."""

    name: str
    kubeconfig: Path


def _jail_manifest(name: str, namespace: str) -> str:
    level = {
        "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
        "kind": "PriorityLevelConfiguration",
        "metadata": {"name": name},
        "spec": {
            "type": "Limited",
            "limited": {
                "nominalConcurrencyShares": 0,
                "lendablePercent": 0,
                "borrowingLimitPercent": 0,
                "limitResponse": {"type": "Reject"},
            },
        },
    }
    schema = {
        "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
        "kind": "FlowSchema",
        "metadata": {"name": name},
        "spec": {
            "priorityLevelConfiguration": {"name": name},
            "matchingPrecedence": 1000,
            "distinguisherMethod": {"type": "ByUser"},
            "rules": [
                {
                    "subjects": [
                        {
                            "kind": "ServiceAccount",
                            "serviceAccount": {"name": RECEIVER, "namespace": namespace},
                        }
                    ],
                    "resourceRules": [
                        {
                            "apiGroups": ["captchatask.dev"],
                            "resources": ["*"],
                            "verbs": ["*"],
                            "namespaces": ["*"],
                        }
                    ],
                }
            ],
        },
    }
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": [level, schema]})


@pytest.fixture
def jail(control_plane: testbed.ControlPlane, namespace: str) -> Iterator[Jail]:
    """The receiver's ServiceAccount (allowed everything by RBAC) and the objects to jail it."""
    kubeconfig = control_plane.service_account_kubeconfig(namespace, RECEIVER)
    name = f"jail-{namespace}"
    control_plane.kubectl(
        "create", "clusterrolebinding", name, "--clusterrole=cluster-admin",
        f"--serviceaccount={namespace}:{RECEIVER}",
    )  # fmt: skip
    yield Jail(name=name, kubeconfig=kubeconfig)
    for kind in ("flowschema", "prioritylevelconfiguration", "clusterrolebinding"):
        control_plane.kubectl("delete", kind, name, "--ignore-not-found", check=False)


async def _wait_classified(kubeconfig: Path, path: str, level_uid: str) -> None:
    """Poll until the API server sends the account's requests to the level (APF's headers)."""
    config = kube.load_config(str(kubeconfig))
    headers = {"Authorization": f"Bearer {config.token}"}
    deadline = time.monotonic() + PATIENCE_SECONDS
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:
        while True:
            async with session.get(config.server + path, headers=headers) as reply:
                await reply.read()
                if reply.headers.get("X-Kubernetes-PF-PriorityLevel-UID") == level_uid:
                    return
            assert time.monotonic() < deadline, "the API server never took the FlowSchema up"
            await asyncio.sleep(0.2)


async def _refused(kubeconfig: Path, path: str) -> bool:
    """One GET as the account, never retried: did APF turn it away at once (429)?"""
    config = kube.load_config(str(kubeconfig))
    headers = {"Authorization": f"Bearer {config.token}"}
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:
        try:
            async with session.get(
                config.server + path, headers=headers, timeout=aiohttp.ClientTimeout(total=2)
            ) as reply:
                return reply.status == HTTP_TOO_MANY_REQUESTS
        except TimeoutError:  # admitted, and waiting for etcd like the plug
            return False


async def _plug(
    kubeconfig: Path, path: str, request: Callable[[], Coroutine[Any, Any, object]]
) -> asyncio.Task[object]:
    """Start ``request`` and wait until it holds the zero-seat level (etcd must be stopped).

    Such a level runs one request while it runs none, and rejects the others: once a probe of
    the same account is rejected while ``request`` is still unanswered, ``request`` holds it.
    """
    plug = asyncio.create_task(request())
    deadline = time.monotonic() + PATIENCE_SECONDS
    while not await _refused(kubeconfig, path) or plug.done():
        assert time.monotonic() < deadline, "the plug never took the level's seat"
        if plug.done():  # refused: another request of the level held the seat just then
            assert isinstance(plug.exception(), kube.TooManyRequests), plug.exception()
            plug = asyncio.create_task(request())
    return plug


@contextlib.contextmanager
def _etcd_stopped(control_plane: testbed.ControlPlane) -> Iterator[None]:
    """SIGSTOP etcd for the block (every write then waits in the API server); always SIGCONT."""
    pid = control_plane.pids["etcd"]
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_a_pingback_refused_by_api_priority_is_spooled_then_applied(
    control_plane: testbed.ControlPlane,
    sidecar: SidecarFactory,
    cluster: Cluster,
    namespace: str,
    jail: Jail,
    http: aiohttp.ClientSession,
    url_for: UrlFor,
) -> None:
    task = await cluster.submitted(namespace, "apf", "4242")
    process = sidecar(kubeconfig=jail.kubeconfig, namespace=namespace)
    control_plane.kubectl("apply", "-f", "-", input=_jail_manifest(jail.name, namespace))
    level_uid = control_plane.kubectl(
        "get", "prioritylevelconfiguration", jail.name, "-o", "jsonpath={.metadata.uid}"
    ).stdout.strip()
    await _wait_classified(jail.kubeconfig, kube.TASKS.path(namespace), level_uid)
    config = kube.load_config(str(jail.kubeconfig))
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:
        # Without a retry policy: the plug must hold the seat, not come back later.
        receiver = kube.KubeClient(config, session, retry=kube.RetryPolicy(max_retries=0))
        plug_body = {
            "apiVersion": "captchatask.dev/v1alpha1",
            "kind": "CaptchaTask",
            "metadata": {"name": "plug", "namespace": namespace},
            "spec": {"type": "Turnstile", "siteKey": "k", "pageURL": "https://a.example/"},
        }
        with _etcd_stopped(control_plane):
            # The receiver's own write holds the level's one seat while etcd does not answer.
            plug = await _plug(
                jail.kubeconfig,
                kube.TASKS.path(namespace),
                lambda: receiver.create(
                    kube.TASKS, namespace, plug_body, timeout=2 * PATIENCE_SECONDS
                ),
            )
            async with http.get(
                url_for(process.pingback_url, task.ref), params={"id": "4242", "code": "tok-apf"}
            ) as response:
                assert response.status == 200
                assert response.headers.get(OUTCOME_HEADER) == "spooled"
            metrics = await process.metrics(http)
        with contextlib.suppress(kube.KubeError):  # the plug's own fate is not the point
            await plug

    assert metrics[("captchatask_pingback_spool_depth", ())] == 1
    # Refused as "unavailable, come back later" (APF's 429), not timed out, not an API error.
    errors = {
        reason: metrics.get(("captchatask_ledger_write_errors_total", (reason,)), 0.0)
        for reason in ("unavailable", "timeout", "api_error")
    }
    assert errors == {"unavailable": 1, "timeout": 0, "api_error": 0}
    # The drainer retries what was refused; the level dispatches one request at a time again.

    async def solved() -> bool:
        view = await cluster.task(namespace, "apf")
        return view is not None and view.solution_token is not None

    await cluster.wait_for(solved, what="the spooled result in the ledger")
    view = await cluster.task(namespace, "apf")
    assert view is not None
    assert (view.solution_token, view.delivered_by) == ("tok-apf", DeliveredBy.PINGBACK)
    metrics = await process.metrics(http)
    assert metrics[("captchatask_pingback_spool_depth", ())] == 0
    assert await cluster.dead_letters(namespace) == []
    assert "tok-apf" not in process.log_text()
