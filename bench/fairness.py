"""API Priority and Fairness: an unrelated client's ``list pods`` during a pingback storm.

The chart can put the operator's and the receivers' ServiceAccounts in a priority level of their
own (``apiPriority.enabled``: a FlowSchema and a PriorityLevelConfiguration). This phase shows
what that buys on the real kube-apiserver of the test bed, where APF is on by default:

1. the receiver (the production sidecar) runs as a ServiceAccount, as in a pod, so the API
   server classifies its requests like a cluster would (an admin certificate would be exempt);
   another ServiceAccount in another namespace plays the unrelated client, listing 20 pods;
2. the API server's capacity for ledger writes is probed straight from a client (records/s);
3. the unrelated client's ``list pods`` latency is measured idle, then during a pingback storm
   at twice that capacity (paced, every pingback a distinct ``Submitted`` task), first with
   Kubernetes' default FlowSchemas only, then with the chart's two objects applied — rendered
   from the chart itself (``helm template --show-only``), so what is measured is what ships —
   and then with those objects and the receiver paced to :data:`PACE_SHARE` of the capacity
   (``receiver.ledgerWritesPerSecond``): APF bounds seats, the pace bounds the CPU our writes take.
   The client alternates consistent lists (``kubectl get``'s) and lists served from the watch
   cache as it stands (``resourceVersion=0``, an informer's), from the storm's start until the
   receiver's spool is empty again;

4. in the full profile, the same storm again for a few other seat counts of the components'
   level (the chart rendered with other ``apiPriority`` values, borrowing off): what the chart's
   defaults were chosen from — the client's latency against the ledger rate our components keep;
5. then the same storms on cluster-like planes (:data:`CLUSTER_PLANES`): the quiescent idle
   figure is an API server nothing writes to, which no cluster is, so :mod:`bench.background`
   renews Leases as a one-node cluster's components do at idle, with the plane on its core or on
   both; each plane measures its own idle baseline first and its storms' ratios are against it
   (the quiescent rows and their baseline stay as they are). The small profile runs one storm
   of each kind: it only checks that the phase works.

Between two storms the receiver drains its spool (the results it acknowledged but could not
write in time) and the API server goes quiet again; the ledger rate of a storm counts the results
applied during it and during that drain. Each request's classification is read from the API
server's ``X-Kubernetes-PF-FlowSchema-UID`` / ``-PriorityLevel-UID`` response headers.

Layout, as in a cluster where the control plane has machines of its own: etcd and kube-apiserver
are pinned to :data:`bench.cores.PLANE_CORE`, the receiver, the load generator and the unrelated
client to the other core. The client stands for a workload on a worker node, so it runs with
the workers: on the plane's core its own CPU and scheduling would be charged to the API server.
Each storm records both cores' busy share (the workers' core must not be the one saturated) and
the API server's own ``LIST pods`` histogram next to the client's figure. APF shares out seats,
not CPU: a level whose seats keep the API server's core busy protects nobody, which is what the
sweep shows. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import yaml

from bench import background, cluster, cores, ingest, procstat, wrk
from bench.loadgen import percentile
from bench.profiles import PROFILES, Profile
from captchatask import kube, testbed
from captchatask.decision import Result
from captchatask.ledger import Ledger
from captchatask.model import DeliveredBy
from captchatask.signing import PingbackSigner, load_keys
from captchatask.stack import Stack, StackConfig

NAMESPACE: Final = "fair"
OTHER_NAMESPACE: Final = "other-team"
#: The chart's names for release "bench" (the FlowSchema names these ServiceAccounts).
RELEASE: Final = "bench"
RECEIVER_ACCOUNT: Final = f"{RELEASE}-captchatask-receiver"
READER_ACCOUNT: Final = "reader"
PODS: Final = 20
TOKEN: Final = "03AFcWeA" + "x7Kq2mZ" * 60
CHART_DIR: Final = Path(__file__).resolve().parent.parent / "charts" / "captchatask"
#: Storm rate as a multiple of the probed capacity (the issue's "2x capacity").
STORM_FACTOR: Final = 2.0
#: Seconds between two ``list pods`` of the unrelated client (it is a light, steady user).
READER_PERIOD_SECONDS: Final = 0.05
#: Longest wait for the spool to drain between the storms.
DRAIN_TIMEOUT_SECONDS: Final = 300.0
SIZES: Final = {"full": (1000, 6.0, 200), "small": (100, 1.0, 20)}
"""Per profile: capacity-probe records, storm seconds, idle ``list pods`` samples."""
#: ``apiPriority.nominalConcurrencyShares`` swept besides the chart's default (full profile), with
#: lending and borrowing off so that each point's seats are all the level ever gets. Not 0: a
#: queueing level with no seats never dispatches (a "jail"), so the spool would never drain.
SWEEP_SHARES: Final = {"full": (2, 4, 10), "small": ()}
#: The paced storm's ``--ledger-writes-per-second`` as a share of the probed capacity: at about
#: 50 writes/s the API server's core stays mostly idle, so requests served from its watch cache
#: (``resourceVersion=0``, as informers list) keep their idle latency.
PACE_SHARE: Final = 0.15
#: The core of the receiver, the load generator and the unrelated client: not the plane's.
WORKER_CORE: Final = cores.LOAD_CORE

Say = Callable[[str], None]


class _Stack(Stack):
    """The stack, with the sidecar authenticated by a ServiceAccount kubeconfig once it exists."""

    sidecar_kubeconfig: Path | None = None
    #: The receiver's ``--ledger-writes-per-second`` (0: none), applied on its next restart.
    ledger_writes_per_second: float = 0.0

    def argv(self, name: str) -> list[str]:
        argv = super().argv(name)
        if name == "sidecar" and self.sidecar_kubeconfig is not None:
            argv += ["--kubeconfig", str(self.sidecar_kubeconfig)]
        if name == "sidecar" and self.ledger_writes_per_second > 0:
            argv += ["--ledger-writes-per-second", f"{self.ledger_writes_per_second:.0f}"]
        return argv


def _bind_admin(stack: Stack, namespace: str, account: str) -> Path:
    """A ServiceAccount kubeconfig with cluster-admin (not exempt from APF, unlike masters)."""
    path = stack.plane.service_account_kubeconfig(namespace, account)
    stack.plane.kubectl(
        "create", "clusterrolebinding", f"bench-{namespace}-{account}",
        "--clusterrole=cluster-admin", f"--serviceaccount={namespace}:{account}",
    )  # fmt: skip
    return path


def _pods(stack: Stack) -> None:
    documents = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"app-{index:02d}", "namespace": OTHER_NAMESPACE},
            "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
        }
        for index in range(PODS)
    ]
    text = "\n---\n".join(json.dumps(document) for document in documents)
    stack.plane.kubectl("apply", "-n", OTHER_NAMESPACE, "-f", "-", input=text)


def _apf_manifest(kube_version: str, sets: Sequence[str] = ()) -> str:
    """The chart's FlowSchema and PriorityLevelConfiguration for release ``bench``.

    ``sets`` are more ``--set`` values (the sweep's other seat counts).
    """
    helm = testbed.find_tool("helm")
    if helm is None:
        raise RuntimeError(f"helm is missing: run `{testbed.TEST_TOOLS_HINT}`")
    argv = [
        str(helm), "template", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE,
        "--set", "apiPriority.enabled=true", "--kube-version", kube_version,
        "--show-only", "templates/apipriority-prioritylevel.yaml",
        "--show-only", "templates/apipriority-flowschema.yaml",
    ]  # fmt: skip
    for item in sets:
        argv += ["--set", item]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


@dataclass(frozen=True)
class Variant:
    """One storm: its label, the chart's ``--set`` values (``None``: no APF objects), and the
    receiver's pace as a share of the probed capacity (0: none)."""

    label: str
    sets: list[str] | None
    pace: float = 0.0


_STORMS: Final = (
    Variant("kubernetes_defaults", None),
    Variant("chart_apf", []),
    Variant("chart_apf_paced", [], pace=PACE_SHARE),
)
#: Per profile: which of :data:`_STORMS` run on the quiescent plane.
BASE_STORMS: Final = {
    "full": ("kubernetes_defaults", "chart_apf", "chart_apf_paced"),
    "small": ("chart_apf",),
}


def _variants(profile_name: str, only: Sequence[str] | None = None) -> list[Variant]:
    """Every storm on the quiescent plane, in order: defaults, the chart's objects, with a pace,
    then the sweep. The small profile only checks that the phase runs: one storm.

    ``only``: just these of them (labels), in the same order; an unknown label is a
    ``ValueError`` that names the known ones.
    """
    labels = BASE_STORMS.get(profile_name, BASE_STORMS["small"])
    out = [variant for variant in _STORMS if variant.label in labels]
    for shares in SWEEP_SHARES.get(profile_name, ()):
        sets = [
            f"apiPriority.nominalConcurrencyShares={shares}",
            "apiPriority.lendablePercent=0",
            "apiPriority.borrowingLimitPercent=0",
        ]
        out.append(Variant(f"shares_{shares}", sets))
    if only is None:
        return out
    known = [variant.label for variant in out]
    unknown = sorted(set(only) - set(known))
    if unknown:
        raise ValueError(f"unknown storm(s) {unknown} in profile {profile_name}: known {known}")
    return [variant for variant in out if variant.label in only]


@dataclass(frozen=True)
class ClusterPlane:
    """A cluster-like control plane: :mod:`bench.background`'s Lease renewals throughout, and
    etcd and kube-apiserver on both cores (``unpinned``) or on theirs; its own idle baseline and
    these storms (labels of :data:`_STORMS`), every ratio against that baseline."""

    key: str
    unpinned: bool
    storms: tuple[str, ...]


#: Per profile: the cluster-like planes measured after the quiescent storms. Unpinned, the plane
#: takes both cores, the nearest two cores get to a control plane with more than one.
CLUSTER_PLANES: Final = {
    "full": (
        ClusterPlane("cluster_one_core", unpinned=False, storms=("chart_apf_paced",)),
        ClusterPlane("cluster", unpinned=True, storms=("chart_apf", "chart_apf_paced")),
    ),
    # The smallest form: one storm without a pace (a paced one drains for many seconds).
    "small": (ClusterPlane("cluster", unpinned=True, storms=("chart_apf",)),),
}


def _cluster_planes(
    profile_name: str, storms: Sequence[str] | None, only: Sequence[str] | None
) -> list[ClusterPlane]:
    """The cluster-like planes a run measures: every one of the profile's in a whole phase,
    none when only quiescent storms were asked for (``storms``), or just ``only`` (keys).

    An unknown key is a ``ValueError`` that names the known ones.
    """
    planes = list(CLUSTER_PLANES.get(profile_name, CLUSTER_PLANES["small"]))
    if only is None:
        return planes if storms is None else []
    known = [plane.key for plane in planes]
    unknown = sorted(set(only) - set(known))
    if unknown:
        raise ValueError(
            f"unknown cluster-like plane(s) {unknown} in profile {profile_name}: known {known}"
        )
    return [plane for plane in planes if plane.key in only]


class _Reader:
    """The unrelated client: ``list pods`` in its namespace, steadily, in its own thread."""

    def __init__(self, kubeconfig: Path, core: int | None) -> None:
        self.config = kube.load_config(str(kubeconfig))
        self.core = core
        self.latencies: list[float] = []
        #: Latencies of the ``resourceVersion=0`` lists (served from the watch cache at once).
        self.cached: list[float] = []
        self.classified: set[tuple[str, str]] = set()
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    async def _loop(self, count: int | None) -> None:
        url = f"{self.config.server}/api/v1/namespaces/{OTHER_NAMESPACE}/pods"
        headers = {"Authorization": f"Bearer {self.config.token}"}
        async with aiohttp.ClientSession(connector=kube.connector(self.config)) as session:
            done = 0
            while not self._stop.is_set() and (count is None or done < count):
                # Every other request is served from the watch cache as it stands (what an
                # informer's list asks for); the others are consistent reads, like kubectl's.
                cached = done % 2 == 1
                started = time.perf_counter()
                try:
                    async with session.get(
                        url, headers=headers, params={"resourceVersion": "0"} if cached else None
                    ) as reply:
                        await reply.read()
                        if reply.status != 200:
                            self.errors += 1
                        self.classified.add(
                            (
                                reply.headers.get("X-Kubernetes-PF-FlowSchema-UID", ""),
                                reply.headers.get("X-Kubernetes-PF-PriorityLevel-UID", ""),
                            )
                        )
                except (aiohttp.ClientError, TimeoutError):
                    self.errors += 1
                (self.cached if cached else self.latencies).append(time.perf_counter() - started)
                done += 1
                await asyncio.sleep(READER_PERIOD_SECONDS)

    def _run(self, count: int | None) -> None:
        """The loop, in a thread of its own pinned to ``core`` (Linux pins the calling thread)."""
        if self.core is not None:
            os.sched_setaffinity(0, {self.core})
        asyncio.run(self._loop(count))

    def measure(self, count: int) -> dict[str, Any]:
        """Run ``count`` requests now (idle figure)."""
        self.start(count)
        self.join()
        return self.summary()

    def start(self, count: int | None = None) -> None:
        """Keep listing in the background until :meth:`stop` (or ``count`` requests)."""
        self.latencies = []
        self.cached = []
        self.errors = 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(count,), daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Wait for the background loop to end."""
        if self._thread is not None:
            self._thread.join(timeout=600)

    def stop(self) -> dict[str, Any]:
        """Stop the background loop; its figures."""
        self._stop.set()
        self.join()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """p50/p99/max in ms of the consistent lists since the last start, and of the cached."""
        ms = [value * 1e3 for value in self.latencies]
        cached = [value * 1e3 for value in self.cached]
        return {
            "requests": len(ms),
            "errors": self.errors,
            "p50_ms": round(percentile(ms, 0.50), 2),
            "p99_ms": round(percentile(ms, 0.99), 2),
            "max_ms": round(max(ms), 2) if ms else None,
            "cached": {
                "requests": len(cached),
                "p50_ms": round(percentile(cached, 0.50), 2),
                "p99_ms": round(percentile(cached, 0.99), 2),
            },
        }


async def _capacity(stack: Stack, tasks: Sequence[cluster.SubmittedTask]) -> float:
    """Ledger records/s the API server takes straight from a client (64 in flight)."""
    async with cluster.kube_session(stack) as client:
        ledger = Ledger(client)
        started = time.perf_counter()
        await cluster.bounded(
            (
                ledger.record(
                    task.ref,
                    Result.solved(
                        token=TOKEN,
                        delivered_by=DeliveredBy.PINGBACK,
                        provider_task_id=task.provider_task_id,
                    ),
                )
                for task in tasks
            ),
            limit=64,
        )
        return len(tasks) / (time.perf_counter() - started)


def _applied(stack: Stack) -> float:
    """Results the receiver put in the ledger: on the pingback path or replayed from its spool."""
    samples = cluster.scrape(stack.sidecar_metrics_url)
    return cluster.metric_sum(
        samples, "captchatask_pingbacks_total", outcome="recorded"
    ) + cluster.metric_sum(samples, "captchatask_spool_replays_total", outcome="recorded")


def _wait_drained(stack: Stack) -> float:
    """Wait until the receiver's spool is empty; seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < DRAIN_TIMEOUT_SECONDS:
        depth = cluster.metric_sum(
            cluster.scrape(stack.sidecar_metrics_url), "captchatask_pingback_spool_depth"
        )
        if depth == 0:
            break
        time.sleep(0.5)
    return round(time.monotonic() - started, 1)


def _place(stack: Stack, *, plane_pinned: bool) -> dict[str, bool]:
    """The receiver on the workers' core and the control plane on its own, or (``plane_pinned``
    false) on every core; again after any restart, as a new process starts unpinned."""
    return {
        "plane": cores.pin_plane(stack.plane) if plane_pinned else cores.release_plane(stack.plane),
        "receiver": cores.pin_process(stack.processes["sidecar"].pid, WORKER_CORE),
    }


def _flowcontrol(stack: Stack) -> dict[str, dict[str, float]]:
    """Per priority level: requests dispatched, seconds they waited in queues, nominal seats."""
    out: dict[str, dict[str, float]] = {}
    for (name, labels), value in cluster.apiserver_metrics(stack).items():
        level = dict(labels).get("priority_level")
        if level is None:
            continue
        entry = out.setdefault(level, {"waited": 0.0, "wait_seconds": 0.0, "seats": 0.0})
        if name == "apiserver_flowcontrol_request_wait_duration_seconds_count":
            entry["waited"] += value
        elif name == "apiserver_flowcontrol_request_wait_duration_seconds_sum":
            entry["wait_seconds"] += value
        elif name == "apiserver_flowcontrol_nominal_limit_seats":
            entry["seats"] = value
    return out


def _list_pods_buckets(stack: Stack) -> dict[float, float]:
    """The API server's own ``LIST pods`` duration histogram (only the unrelated client lists pods).

    Its latency as the API server saw it, without the client's side: if the client's core is
    busy, the two differ.
    """
    out: dict[float, float] = {}
    for (name, labels), value in cluster.apiserver_metrics(stack).items():
        label = dict(labels)
        if (
            name == "apiserver_request_duration_seconds_bucket"
            and label.get("verb") == "LIST"
            and label.get("resource") == "pods"
        ):
            bound = float(label["le"])
            out[bound] = out.get(bound, 0.0) + value
    return out


def _bucket_p99_ms(before: dict[float, float], after: dict[float, float]) -> float | None:
    """Upper bound (a bucket edge, in ms) of the p99 of the requests between two scrapes."""
    delta = sorted((bound, after[bound] - before.get(bound, 0.0)) for bound in after)
    total = delta[-1][1] if delta else 0.0
    for bound, count in delta:
        if total and count >= 0.99 * total:
            return None if bound == float("inf") else round(bound * 1e3, 1)
    return None


def _cpu_busy(before: dict[int, tuple[int, int]]) -> dict[str, float]:
    """Share of each core busy since ``before`` (either core saturated makes latency its own)."""
    shares = procstat.busy_shares(before, procstat.core_ticks())
    return {f"core_{core}": share for core, share in shares.items()}


def _flow_delta(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """Requests and mean queue wait per level during one storm (levels that saw traffic)."""
    out = {}
    for level, now in after.items():
        then = before.get(level, {"waited": 0.0, "wait_seconds": 0.0})
        count = now["waited"] - then["waited"]
        if count >= 1:
            out[level] = {
                "requests": count,
                "mean_wait_ms": round(
                    (now["wait_seconds"] - then["wait_seconds"]) / count * 1e3, 2
                ),
                "nominal_seats": now["seats"],
            }
    return out


def _storm_with_reader(
    stack: Stack, reader: _Reader, paths_file: Path, *, rate: float, seconds: float
) -> dict[str, Any]:
    before = ingest.pingback_outcomes(stack)
    flow_before = _flowcontrol(stack)
    applied_before = _applied(stack)
    buckets_before = _list_pods_buckets(stack)
    cpu_before, used_before = procstat.core_ticks(), ingest.cpu_now(stack)
    # The client lists from the storm's start until the receiver's spool is empty again: our
    # writes go on at the same pace while it drains (with a pace, that is most of them).
    reader.start()
    started = time.monotonic()
    try:
        storm = ingest.paced(
            stack.pingback_url, paths_file, rate=round(rate), seconds=seconds, timeout_margin=300
        )
        storm_wall = time.monotonic() - started
        after = ingest.pingback_outcomes(stack)
        applied_storm = _applied(stack) - applied_before
        drain = _wait_drained(stack)
    finally:
        listing = reader.stop()
    cpu = _cpu_busy(cpu_before)
    used = ingest.cpu_now(stack)
    listing["server_p99_ms_at_most"] = _bucket_p99_ms(buckets_before, _list_pods_buckets(stack))
    flows = _flow_delta(flow_before, _flowcontrol(stack))
    applied = _applied(stack) - applied_before
    return {
        "priority_levels": flows,
        "list_pods": listing,
        "pingbacks": {
            key: storm[key]
            for key in ("rate_target", "rate_achieved", "ok", "errors", "p50_ms", "p99_ms")
        },
        "outcomes": {key: after[key] - before[key] for key in after},
        "cpu_busy": cpu,
        # CPU seconds per party over the same span: the plane's per result applied is what a
        # write costs the API server at this rate (more per write at a pace than at saturation).
        "cpu_seconds": {name: round(used[name] - used_before[name], 2) for name in used},
        "ledger": {
            "applied_during_storm": applied_storm,
            "applied": applied,
            "drain_seconds": drain,
            "drained": drain < DRAIN_TIMEOUT_SECONDS,
            # Results reach the ledger from the storm's start until the spool is empty again.
            "per_second": round(applied / (storm_wall + drain), 1),
        },
    }


async def _prepare_tasks(stack: Stack, count: int, prefix: str) -> list[cluster.SubmittedTask]:
    async with cluster.kube_session(stack) as client:
        return await cluster.create_submitted_tasks(
            client, NAMESPACE, prefix=prefix, count=count, first_id=9_000_000_000
        )


def _prepare(stack: Stack, count: int, prefix: str) -> list[cluster.SubmittedTask]:
    """``count`` tasks in ``Submitted``, as the operator leaves them (it is not running)."""
    return asyncio.run(_prepare_tasks(stack, count, prefix))


@dataclass(frozen=True)
class _Setting:
    """What every storm of one run shares: sizes from the profile, rates from the probe."""

    workdir: Path
    capacity: float
    rate: float
    storm_tasks: int
    storm_seconds: float
    idle_samples: int
    version: str
    say: Say


def _storm(
    stack: _Stack,
    reader: _Reader,
    signer: PingbackSigner,
    variant: Variant,
    setting: _Setting,
    *,
    prefix: str,
    plane_pinned: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One storm of ``variant``: the client's figures just before it, and during it."""
    label, sets = variant.label, variant.sets
    rate, seconds, say = setting.rate, setting.storm_seconds, setting.say
    pace = round(variant.pace * setting.capacity)
    if pace != stack.ledger_writes_per_second:
        # Before the tasks are prepared: the restarted receiver's start-up requests are over by
        # the time the storm begins.
        stack.ledger_writes_per_second = pace
        stack.restart("sidecar")
    tasks = _prepare(stack, setting.storm_tasks, prefix)
    paths = [signer.path(task.ref) + f"?id={task.provider_task_id}&code={TOKEN}" for task in tasks]
    paths_file = wrk.write_paths(setting.workdir / f"{prefix}-{label}.paths", paths)
    if sets is not None:
        stack.plane.kubectl("apply", "-f", "-", input=_apf_manifest(setting.version, sets))
    _place(stack, plane_pinned=plane_pinned)  # again after the receiver's restart
    idle_before = reader.measure(setting.idle_samples)
    say(f"  storm ({prefix} {label}) at {rate:.0f}/s for {seconds:g}s")
    result = _storm_with_reader(stack, reader, paths_file, rate=rate, seconds=seconds)
    result["chart_sets"] = sets
    result["ledger_writes_per_second"] = pace or None
    result["classified_as"] = sorted(reader.classified)
    reader.classified = set()
    say(
        f"    list pods p50 {result['list_pods']['p50_ms']} ms, "
        f"p99 {result['list_pods']['p99_ms']} ms (cached p99 "
        f"{result['list_pods']['cached']['p99_ms']} ms); pingback p99 "
        f"{result['pingbacks']['p99_ms']:.1f} ms; ledger "
        f"{result['ledger']['per_second']}/s; {result['priority_levels']}"
    )
    return idle_before, result


def _task_prefix(key: str, index: int) -> str:
    """The names of a plane's storm's tasks: a DNS subdomain (no ``_``), one per storm."""
    return f"{key.replace('_', '-')}-{index}"


def _cluster_plane(
    stack: _Stack,
    reader: _Reader,
    signer: PingbackSigner,
    plane: ClusterPlane,
    setting: _Setting,
) -> dict[str, Any]:
    """A cluster-like plane's own idle baseline and storms, the background writing throughout.

    The idle baseline is measured with the same background and layout as the storms after it,
    so each storm's ratio is against a plane that already does what a cluster's does at idle.
    """
    variants = {variant.label: variant for variant in _STORMS}
    say = setting.say
    out: dict[str, Any] = {"key": plane.key, "unpinned_plane": plane.unpinned}
    out["layout"] = (
        f"etcd and kube-apiserver on every core; receiver, load generator and the unrelated "
        f"client on core {WORKER_CORE}"
        if plane.unpinned
        else f"etcd and kube-apiserver on core {cores.PLANE_CORE}; receiver, load generator and "
        f"the unrelated client on core {WORKER_CORE}"
    )
    writer = background.Background(stack.plane.kubeconfig, WORKER_CORE if cores.can_pin() else None)
    writer.start()
    try:
        out["pinned"] = _place(stack, plane_pinned=not plane.unpinned)
        writer.wait_first_round()  # every Lease exists before the baseline is measured
        say(f"fairness: cluster-like plane {plane.key}: {out['layout']}; Lease renewals")
        flows = _flowcontrol(stack)
        buckets = _list_pods_buckets(stack)
        out["idle"] = reader.measure(2 * setting.idle_samples)  # half consistent, half cached
        out["idle"]["server_p99_ms_at_most"] = _bucket_p99_ms(buckets, _list_pods_buckets(stack))
        out["idle"]["priority_levels"] = _flow_delta(flows, _flowcontrol(stack))
        say(
            f"  idle ({plane.key}) list pods p50 {out['idle']['p50_ms']} ms, "
            f"p99 {out['idle']['p99_ms']} ms, cached p99 {out['idle']['cached']['p99_ms']} ms"
        )
        out["idle_before"], out["storms"] = {}, {}
        for index, label in enumerate(plane.storms):
            out["idle_before"][label], out["storms"][label] = _storm(
                stack, reader, signer, variants[label], setting,
                prefix=_task_prefix(plane.key, index), plane_pinned=not plane.unpinned,
            )  # fmt: skip
    finally:
        out["background"] = writer.stop()
        _place(stack, plane_pinned=True)
    return out


def run(
    profile: Profile,
    workdir: Path,
    say: Say,
    *,
    storms: Sequence[str] | None = None,
    clusters: Sequence[str] | None = None,
    sidecar_args: Sequence[str] = (),
) -> dict[str, Any]:
    """The APF side-by-side rows (in the full profile, the seat-count sweep), then the
    cluster-like planes' rows.

    ``storms``: only these quiescent storms, and no cluster-like plane (``python -m
    bench.fairness --storm``: one comparison without the whole phase); ``clusters``: only these
    cluster-like planes (keys), and no quiescent storm unless ``storms`` names some;
    ``sidecar_args``: extra receiver arguments for every storm (e.g. another
    ``--drain-concurrency``).
    """
    variants = _variants(profile.name, storms if storms is not None or clusters is None else [])
    planes = _cluster_planes(profile.name, storms, clusters)
    probe_count, storm_seconds, idle_samples = SIZES.get(profile.name, SIZES["small"])
    workdir.mkdir(parents=True, exist_ok=True)
    stack = _Stack(
        StackConfig(workdir=workdir / "stack", namespace=NAMESPACE, sidecar_args=sidecar_args),
        progress=say,
    )
    out: dict[str, Any] = {"storm_seconds": storm_seconds, "storm_factor": STORM_FACTOR}
    try:
        stack.start()
        stack.kill("operator")  # the prepared tasks are the operator's work already done
        out["versions"] = cluster.versions(stack)
        version = str(out["versions"].get("kube_apiserver", "v1.36.0")).lstrip("v")
        stack.plane.kubectl("create", "namespace", OTHER_NAMESPACE)
        stack.sidecar_kubeconfig = _bind_admin(stack, NAMESPACE, RECEIVER_ACCOUNT)
        pinned = cores.can_pin()
        reader = _Reader(
            _bind_admin(stack, OTHER_NAMESPACE, READER_ACCOUNT), WORKER_CORE if pinned else None
        )
        _pods(stack)
        stack.restart("sidecar")
        out["pinned"] = _place(stack, plane_pinned=True)
        out["plane_core"] = cores.PLANE_CORE
        out["layout"] = (
            f"etcd and kube-apiserver on core {cores.PLANE_CORE}; receiver, load generator and "
            f"the unrelated client on core {WORKER_CORE}"
            if all(out["pinned"].values())
            else "not pinned: everything shares every core"
        )
        signer = PingbackSigner(load_keys(stack.key_file))

        say(f"fairness: {out['layout']}; probing ledger capacity with {probe_count} records")
        capacity = asyncio.run(_capacity(stack, _prepare(stack, probe_count, "cap")))
        # Seconds after the pin: a Go runtime follows the affinity mask, so a pinned plane runs
        # with one P, as on a machine of one core (a runtime with two would time-slice it).
        out["apiserver_gomaxprocs"] = cluster.metric_sum(
            cluster.apiserver_metrics(stack), "go_sched_gomaxprocs_threads"
        )
        out["capacity_records_per_second"] = round(capacity, 1)
        rate = STORM_FACTOR * capacity
        out["storm_rate"] = round(rate)
        storm_tasks = round(rate * storm_seconds) + 16
        setting = _Setting(
            workdir, capacity, rate, storm_tasks, storm_seconds, idle_samples, version, say
        )
        say(f"  {capacity:.0f} records/s; {len(variants)} storms of {storm_tasks} at {rate:.0f}/s")
        buckets = _list_pods_buckets(stack)
        out["idle"] = reader.measure(2 * idle_samples)  # half of them consistent, half cached
        out["idle"]["server_p99_ms_at_most"] = _bucket_p99_ms(buckets, _list_pods_buckets(stack))
        say(f"  idle list pods p50 {out['idle']['p50_ms']} ms, p99 {out['idle']['p99_ms']} ms")
        for index, variant in enumerate(variants):
            out[f"idle_before_{variant.label}"], out[variant.label] = _storm(
                stack, reader, signer, variant, setting, prefix=f"s{index}"
            )
            out[f"drain_seconds_after_{variant.label}"] = out[variant.label]["ledger"][
                "drain_seconds"
            ]
        # The node's Lease is written as the node (group system:nodes), which RBAC alone (no Node
        # authorizer in the test bed) lets do so only through the role kubeadm once bound.
        stack.plane.kubectl(
            "create", "clusterrolebinding", "bench-system-nodes",
            "--clusterrole=system:node", "--group=system:nodes",
        )  # fmt: skip
        out["cluster_like"] = [
            _cluster_plane(stack, reader, signer, plane, setting) for plane in planes
        ]
        out["sweep"] = [v.label for v in variants if v.label.startswith("shares_")]
        out["apf_objects"] = [
            item["kind"] for item in yaml.safe_load_all(_apf_manifest(version)) if item
        ]
    finally:
        with contextlib.suppress(Exception):
            stack.stop()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.fairness``: the fairness phase, or some of its quiescent storms, as JSON.

    ``--storm LABEL`` (repeatable) runs only those storms on the quiescent plane (each with the
    idle baseline measured first, and no cluster-like plane); ``--sidecar-arg`` passes the
    receiver an extra argument. For example, what a deeper drain costs an unrelated client with
    Kubernetes' default FlowSchemas: ``--storm kubernetes_defaults`` with and without
    ``--sidecar-arg=--drain-concurrency=32``. ``--cluster KEY`` (repeatable) runs only that
    cluster-like plane (``cluster``: on every core; ``cluster_one_core``): its idle baseline and
    its storms, and no quiescent storm unless ``--storm`` names some.
    """
    parser = argparse.ArgumentParser(prog="python -m bench.fairness", description=main.__doc__)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--workdir", type=Path, required=True, help="scratch directory")
    parser.add_argument(
        "--storm", action="append", default=None, help="a storm's label (repeatable)"
    )
    parser.add_argument(
        "--sidecar-arg",
        action="append",
        default=[],
        help="an extra receiver argument (repeatable; e.g. --sidecar-arg=--drain-concurrency=32)",
    )
    parser.add_argument(
        "--cluster", action="append", default=None, help="a cluster-like plane's key (repeatable)"
    )
    args = parser.parse_args(argv)
    try:
        _variants(args.profile, args.storm)
        _cluster_planes(args.profile, args.storm, args.cluster)
    except ValueError as exc:
        parser.error(str(exc))
    started = time.monotonic()

    def say(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    result = run(
        PROFILES[args.profile],
        args.workdir,
        say,
        storms=args.storm,
        clusters=args.cluster,
        sidecar_args=args.sidecar_arg,
    )
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
