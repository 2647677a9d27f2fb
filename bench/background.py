"""What a one-node cluster's control plane writes at idle: Lease renewals, for real.

The fairness phase's quiescent baseline is an API server nothing writes to, which no cluster is.
Even idle, a kind or kubeadm cluster's kube-controller-manager and kube-scheduler each renew
their leader-election Lease in ``kube-system`` every ``RetryPeriod`` (2 s:
``RecommendedDefaultLeaderElectionConfiguration`` in ``k8s.io/component-base/config/v1alpha1``;
the leader renews from ``renew()`` in ``k8s.io/client-go/tools/leaderelection`` every
``RetryPeriod``, an Update of the Lease it holds), and each node's kubelet renews its node Lease
in ``kube-node-lease`` every 10 s (``NodeLeaseDurationSeconds`` 40, defaulted in
``pkg/kubelet/apis/config/v1beta1``, times ``nodeLeaseRenewIntervalFraction`` 0.25 in
``pkg/kubelet/kubelet.go``; ``k8s.io/component-helpers/apimachinery/lease`` does an Update too).

:class:`Background` does those renewals against the real API server: a ``PUT`` of the Lease it
got back last (with its ``resourceVersion``, like client-go), impersonating each component's
user so that API Priority and Fairness classifies the writes as a cluster would (the
``leader-election`` and ``system-nodes`` FlowSchemas) rather than as the exempt admin. Every
renewal moves etcd's revision, which is what a consistent ``list`` of another resource then has
to wait for the watch cache to see. :func:`schedule` is the pure part: which renewal is due when.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp

from captchatask import kube

#: The one node's name (its Lease in ``kube-node-lease`` carries it).
NODE: Final = "bench-node"


@dataclass(frozen=True, slots=True)
class Renewer:
    """One component that keeps a Lease: where, how often, and as whom."""

    component: str
    namespace: str
    lease: str
    period_seconds: float
    lease_duration_seconds: int
    user: str
    groups: tuple[str, ...] = ()


#: A one-node cluster at idle: the two leader elections and the node's heartbeat.
CLUSTER: Final = (
    Renewer(
        "kube-controller-manager", "kube-system", "kube-controller-manager", 2.0, 15,
        "system:kube-controller-manager",
    ),
    Renewer(
        "kube-scheduler", "kube-system", "kube-scheduler", 2.0, 15, "system:kube-scheduler"
    ),
    Renewer("kubelet", "kube-node-lease", NODE, 10.0, 40, f"system:node:{NODE}", ("system:nodes",)),
)  # fmt: skip


def schedule(renewers: Sequence[Renewer], seconds: float) -> list[tuple[float, int]]:
    """Every renewal due in the first ``seconds``: (offset from the start, renewer index), in order.

    Each renewer renews at its period, the first one at once and the others shifted by a share
    of the shortest period, as components started at different moments would: renewals that
    all land on the same instant would make one burst every period instead of a steady trickle.
    """
    if not renewers:
        return []
    shortest = min(renewer.period_seconds for renewer in renewers)
    out: list[tuple[float, int]] = []
    for index, renewer in enumerate(renewers):
        at = shortest * index / len(renewers)
        while at < seconds:
            out.append((round(at, 6), index))
            at += renewer.period_seconds
    return sorted(out)


def micro_time(moment: dt.datetime) -> str:
    """A Lease's ``MicroTime`` (``renewTime``, ``acquireTime``): UTC, microseconds, ``Z``."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def renewed(lease: dict[str, Any], renewer: Renewer, now: dt.datetime) -> dict[str, Any]:
    """The Lease as its holder writes it back: same object and version, a new ``renewTime``."""
    spec = dict(lease.get("spec") or {})
    spec.setdefault("acquireTime", micro_time(now))
    spec |= {
        "holderIdentity": renewer.user.removeprefix("system:"),
        "leaseDurationSeconds": renewer.lease_duration_seconds,
        "renewTime": micro_time(now),
    }
    return lease | {"spec": spec}


def _new_lease(renewer: Renewer, now: dt.datetime) -> dict[str, Any]:
    body = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": renewer.lease, "namespace": renewer.namespace},
    }
    return renewed(body, renewer, now)


def _headers(config: kube.KubeConfig, renewer: Renewer) -> list[tuple[str, str]]:
    """Impersonation headers (the admin may impersonate), so APF sees the component's user."""
    headers = [("Impersonate-User", renewer.user), ("Content-Type", "application/json")]
    headers += [("Impersonate-Group", group) for group in renewer.groups]
    if config.token:
        headers.append(("Authorization", f"Bearer {config.token}"))
    return headers


class Background:
    """The renewals of :data:`CLUSTER`, in a thread of their own, until :meth:`stop`."""

    def __init__(
        self, kubeconfig: Path, core: int | None, renewers: Sequence[Renewer] = CLUSTER
    ) -> None:
        self.config = kube.load_config(str(kubeconfig))
        self.core = core
        self.renewers = tuple(renewers)
        self.renewals = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def _url(self, renewer: Renewer, *, named: bool) -> str:
        base = f"{self.config.server}/apis/coordination.k8s.io/v1/namespaces/{renewer.namespace}"
        return f"{base}/leases/{renewer.lease}" if named else f"{base}/leases"

    async def _write(
        self, session: aiohttp.ClientSession, index: int, leases: dict[int, dict[str, Any]]
    ) -> None:
        """One renewal: PUT the Lease last written (create it first); a conflict re-reads it."""
        renewer = self.renewers[index]
        headers = _headers(self.config, renewer)
        now = dt.datetime.now(dt.UTC)
        try:
            if index not in leases:
                async with session.post(
                    self._url(renewer, named=False),
                    json=_new_lease(renewer, now),
                    headers=headers,
                ) as reply:
                    if reply.status == 201:
                        leases[index] = await reply.json()
                        self.renewals += 1
                        return
                async with session.get(self._url(renewer, named=True), headers=headers) as reply:
                    reply.raise_for_status()
                    leases[index] = await reply.json()
            async with session.put(
                self._url(renewer, named=True),
                json=renewed(leases[index], renewer, now),
                headers=headers,
            ) as reply:
                if reply.status == 200:
                    leases[index] = await reply.json()
                    self.renewals += 1
                    return
                leases.pop(index, None)  # a conflict: read it again next time, as client-go does
                self.errors += 1
        except (aiohttp.ClientError, TimeoutError):
            leases.pop(index, None)
            self.errors += 1

    async def _loop(self) -> None:
        leases: dict[int, dict[str, Any]] = {}
        horizon = 3600.0
        async with aiohttp.ClientSession(connector=kube.connector(self.config)) as session:
            for offset, index in schedule(self.renewers, horizon):
                delay = max(0.0, self._started + offset - time.monotonic())
                # The stop event is a thread's: wait for it (or the renewal's time) off the loop.
                if await asyncio.to_thread(self._stop.wait, delay):
                    return
                await self._write(session, index, leases)

    def _run(self) -> None:
        if self.core is not None:
            os.sched_setaffinity(0, {self.core})  # Linux pins the calling thread
        asyncio.run(self._loop())

    def start(self) -> None:
        """Begin renewing (the first renewals create the Leases)."""
        self._stop.clear()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def wait_first_round(self, timeout: float = 30.0) -> bool:
        """Wait until each renewer has written once (created its Lease); ``False`` on timeout.

        Every first renewal is due within the shortest period (:func:`schedule`).
        """
        deadline = time.monotonic() + timeout
        while self.renewals + self.errors < len(self.renewers):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def stop(self) -> dict[str, Any]:
        """Stop renewing; what was written."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        return {
            "renewals": self.renewals,
            "errors": self.errors,
            "writes_per_second": round(
                sum(1 / renewer.period_seconds for renewer in self.renewers), 2
            ),
            "leases": [
                f"{r.namespace}/{r.lease} every {r.period_seconds:g} s" for r in self.renewers
            ],
        }
