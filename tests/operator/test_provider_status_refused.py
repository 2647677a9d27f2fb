"""A provider's tasks go out once its check passes, even while its status cannot be written.

Each account check ends in a write of the verdict to the CaptchaProvider's status, and the first
verdict (or a change of readiness) re-decides the provider's tasks: a task seen before the first
verdict waits for it. The operator noted the verdict in memory before that write and re-decided
the tasks only after it, so a refused write (an admission policy, etcd's "leader changed"
answered as a 500) left the verdict noted and the tasks undecided. The next check saw no change
and did not decide them either; they waited for a re-list of the watch, or for their deadline.

Real kube-apiserver, emulator and operator process. A ValidatingAdmissionPolicy bound to the
test's namespace refuses every write of CaptchaProvider status, as a cluster's own policy could,
and a real HTTP proxy between the operator and the emulator holds the first account check until
the operator has seen the tasks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from tests.operator.conftest import CHECK_ACTIONS, forward, serving

from captchatask import kube, model, testbed
from captchatask.emulator.server import RunningEmulator

POLICY = "captchatask-test-refuse-provider-status"
REFUSAL = "provider status writes are refused in this test"


def policy_manifest(namespace: str) -> str:
    return f"""
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: {POLICY}}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - apiGroups: ["{model.GROUP}"]
      apiVersions: ["*"]
      operations: ["UPDATE"]
      resources: ["{model.PROVIDER_PLURAL}/status"]
  validations:
  - expression: "false"
    message: "{REFUSAL}"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: {POLICY}}}
spec:
  policyName: {POLICY}
  validationActions: [Deny]
  matchResources:
    namespaceSelector:
      matchLabels: {{kubernetes.io/metadata.name: {namespace}}}
"""


def delete_policy(control_plane: testbed.ControlPlane) -> None:
    control_plane.kubectl(
        "delete", "--ignore-not-found",
        f"validatingadmissionpolicybinding/{POLICY}", f"validatingadmissionpolicy/{POLICY}",
    )  # fmt: skip


@pytest.fixture
def refused_status(control_plane: testbed.ControlPlane, namespace: str) -> Iterator[None]:
    """The policy, in place for the test (cluster-scoped objects: always removed after)."""
    control_plane.kubectl("apply", "-f", "-", input=policy_manifest(namespace))
    try:
        yield
    finally:
        delete_policy(control_plane)


class HeldChecks:
    """A real HTTP proxy to the emulator that holds account checks until ``released``."""

    def __init__(self, upstream: str, session: aiohttp.ClientSession) -> None:
        self.upstream = upstream
        self.session = session
        self.released = asyncio.Event()
        self.held = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        form = await request.post() if request.method == "POST" else request.query
        if form.get("action") in CHECK_ACTIONS and not self.released.is_set():
            self.held += 1
            await self.released.wait()
        return await forward(self.session, self.upstream, request, body)


@pytest.fixture
async def held_checks(emulator: RunningEmulator) -> AsyncIterator[tuple[HeldChecks, str]]:
    async with aiohttp.ClientSession() as session:
        proxy = HeldChecks(emulator.base_url, session)
        async with serving(proxy.handle) as url:
            yield proxy, url


async def test_tasks_are_submitted_while_the_providers_status_write_is_refused(
    harness: Any,
    control_plane: testbed.ControlPlane,
    held_checks: tuple[HeldChecks, str],
    refused_status: None,
) -> None:
    proxy, proxy_url = held_checks
    await harness.secret()
    await harness.provider(SimpleNamespace(base_url=proxy_url))

    async def refusing() -> bool:  # in effect once the API server has loaded the policy
        try:
            await harness.client.patch(
                kube.PROVIDERS, harness.namespace, "default",
                {"status": {"inFlight": 0}}, subresource="status",
            )  # fmt: skip
        except kube.ApiError as exc:
            return REFUSAL in str(exc)
        return False

    await harness.wait_until(refusing, what="the admission policy to refuse status writes")
    operator = harness.start_operator()
    await harness.started(operator)

    async def check_held() -> bool:
        return proxy.held > 0

    await harness.wait_until(check_held, what="the operator's first account check")
    await harness.tasks(3)

    async def tasks_seen() -> bool:
        return bool(operator.metric("captchatask_tasks", phase="Pending") == 3)

    await harness.wait_until(tasks_seen, what="the operator to see the three tasks")
    proxy.released.set()

    async def all_submitted() -> bool:
        tasks = await harness.all_tasks()
        return len(tasks) == 3 and all((t.get("status") or {}).get("providerTaskId") for t in tasks)

    await harness.wait_until(all_submitted, what="the tasks to be submitted")
    provider = await harness.client.get(kube.PROVIDERS, harness.namespace, "default")
    assert "conditions" not in (provider.get("status") or {}), "a status write got through"
    assert "provider check of" in operator.output()  # "... postponed: 422 ... forbidden"

    # Once writes are allowed again, a check writes the status the refused one could not.
    delete_policy(control_plane)

    async def ready_written() -> bool:
        body = await harness.client.get(kube.PROVIDERS, harness.namespace, "default")
        conditions = (body.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    await harness.wait_until(ready_written, what="the provider's status to be written")
