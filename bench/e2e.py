"""``make e2e``: captchatask installed the way a user installs it, on a real node, loses nothing.

The steps, each a gate for the next:

1. a cluster: the test bed's node (``captchatask testbed up --node``) unless ``KUBECONFIG``
   names one (kind, or a user's own cluster; then the images must already be loadable there);
2. the images built by ``hack/build-images.sh`` and imported into the node's containerd;
3. ``helm install`` of ``charts/captchatask`` as users get it, plus the values selecting the local
   images and ``bench/e2e-values.yaml`` (two operators with peering, two receivers), and every
   pod Ready;
4. the emulator as a pod behind a Service, a CaptchaProvider pointing at it (``publicURL`` at
   the receiver Service), with a share of the pingbacks dropped and duplicated;
5. the tasks, by ``kubectl apply``; the verdict against the emulator's own accounting: lost 0,
   submitted twice 0, every token exact.

It prints a summary and writes ``bench/results/e2e.json``. Run ``python -m bench.e2e --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

REPO: Final = Path(__file__).resolve().parents[1]
RESULTS: Final = REPO / "bench" / "results" / "e2e.json"
VALUES: Final = REPO / "bench" / "e2e-values.yaml"
NAMESPACE: Final = "captchatask-e2e"
RELEASE: Final = "captchatask"
EMULATOR: Final = "emulator"
EMULATOR_PORT: Final = 8089
EMULATOR_IMAGE: Final = "ghcr.io/captchatask/captchatask-emulator"
#: The 32-character key the emulator accepts (a test value, not a secret).
EMULATOR_KEY: Final = "e2ekey0123456789abcdef0123456789"
PROVIDER: Final = "emulator"
#: Seconds for every pod of the release to become Ready.
READY_TIMEOUT: Final = 300
#: The default (small) profile: `make test` runs this one.
DEFAULT_TASKS: Final = 100


def say(message: str) -> None:
    """Progress on stderr, timestamped relative to the start."""
    print(f"[e2e {time.monotonic() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


STARTED = time.monotonic()


@dataclass
class Cluster:
    """Where the run happens: a kubeconfig, and how to make an image archive available."""

    kubeconfig: Path
    bin_dir: Path | None = None
    importer: Any = None
    #: Stops and starts kube-apiserver (only the test bed can; None elsewhere).
    restart_apiserver: Any = None
    facts: dict[str, Any] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        if self.bin_dir is not None:
            env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run(
        self, *argv: str, input: str | None = None, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(argv)}` failed ({result.returncode}):\n{result.stderr}{result.stdout}"
            )
        return result

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return self.run("kubectl", *args, input=input, check=check).stdout

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json"))


@contextlib.contextmanager
def testbed_cluster(state_dir: Path, *, keep: bool) -> Iterator[Cluster]:
    """The test bed's node for the run; torn down afterwards unless ``keep``."""
    from captchatask import testbed  # noqa: PLC0415 - only this mode needs the test bed
    from captchatask.testbed.node import Node  # noqa: PLC0415

    cli = [sys.executable, "-m", "captchatask.testbed"]
    say("starting the test bed node (captchatask testbed up --node)")
    started = time.monotonic()
    up = subprocess.run(
        [*cli, "up", "--node", "--state-dir", str(state_dir)],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    try:
        if up.returncode != 0:
            raise RuntimeError("captchatask testbed up --node failed (its errors are above)")
        took = time.monotonic() - started
        plane = testbed.ControlPlane.attach(state_dir)
        assert plane is not None
        node = Node.attach(plane)
        assert node is not None

        def restart_apiserver() -> None:
            plane.stop_apiserver()
            plane.start_apiserver()

        yield Cluster(
            kubeconfig=plane.kubeconfig,
            bin_dir=plane.toolchain.bin_dir,
            importer=node.import_image,
            restart_apiserver=restart_apiserver,
            facts={"cluster": "testbed node", "node_start_seconds": round(took, 1)},
        )
    finally:
        if keep:
            say(f"keeping the node: `captchatask testbed down --state-dir {state_dir}`")
        else:
            say("tearing the node down")
            subprocess.run([*cli, "down", "--state-dir", str(state_dir)], check=False)


def build_images() -> tuple[list[tuple[str, Path]], Path]:
    """Run ``hack/build-images.sh``: the image names, their archives and the values file."""
    say("building the images (hack/build-images.sh; cached when nothing changed)")
    out = subprocess.run(
        [str(REPO / "hack" / "build-images.sh")], stdout=subprocess.PIPE, text=True, check=True
    ).stdout
    images = [(name, Path(path)) for name, path in (line.split() for line in out.splitlines())]
    values = images[0][1].parent / "values-local-images.yaml"
    return images, values


def prebuilt_images(tag: str, workdir: Path) -> tuple[list[tuple[str, Path | None]], Path]:
    """Images someone else built and loaded into the cluster (``docker build`` + ``kind load``).

    The same names and chart values as :func:`build_images`, with ``tag``; nothing to import.
    """
    prefix = "ghcr.io/captchatask/captchatask"
    names = [f"{prefix}-{target}:{tag}" for target in ("operator", "sidecar", "emulator")]
    image = {"tag": tag, "pullPolicy": "Never"}
    document = {
        "operator": {"image": {"repository": f"{prefix}-operator", **image}},
        "receiver": {"image": {"repository": f"{prefix}-sidecar", **image}},
        "sidecar": {"image": {"repository": f"{prefix}-sidecar", **image}},
    }
    workdir.mkdir(parents=True, exist_ok=True)
    values = workdir / "values-prebuilt-images.yaml"
    values.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return [(name, None) for name in names], values


def pods_ready(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    """Wait until every pod in ``namespace`` is Ready; return one summary row per pod."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        pods = cluster.get_json("pods", "-n", namespace)["items"]
        rows = [
            {
                "name": p["metadata"]["name"],
                "ready": any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in p["status"].get("conditions", [])
                ),
                "ip": p["status"].get("podIP"),
                "restarts": sum(
                    c.get("restartCount", 0) for c in p["status"].get("containerStatuses", [])
                ),
            }
            for p in pods
        ]
        if rows and all(row["ready"] for row in rows):
            return rows
        if time.monotonic() > deadline:
            described = cluster.kubectl("describe", "pods", "-n", namespace, check=False)
            raise RuntimeError(
                f"pods not Ready after {READY_TIMEOUT}s: {rows}\n{described[-4000:]}"
            )
        time.sleep(2)


def emulator_manifests(namespace: str, tag: str, args: Sequence[str]) -> list[dict[str, Any]]:
    """The emulator as a Deployment behind a Service, run like the chart runs its pods."""
    labels = {"app.kubernetes.io/name": EMULATOR}
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": EMULATOR, "namespace": namespace},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "securityContext": {"runAsNonRoot": True, "runAsUser": 65532},
                        "containers": [
                            {
                                "name": EMULATOR,
                                "image": f"{EMULATOR_IMAGE}:{tag}",
                                "imagePullPolicy": "Never",
                                "args": [
                                    "emulator",
                                    "--host=0.0.0.0",
                                    f"--port={EMULATOR_PORT}",
                                    f"--key={EMULATOR_KEY}",
                                    *args,
                                ],
                                "ports": [{"name": "http", "containerPort": EMULATOR_PORT}],
                                "readinessProbe": {
                                    "httpGet": {"path": "/_emulator/healthz", "port": "http"}
                                },
                            }
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": EMULATOR, "namespace": namespace},
            "spec": {
                "selector": labels,
                "ports": [{"name": "http", "port": EMULATOR_PORT, "targetPort": "http"}],
            },
        },
    ]


def provider_manifests(namespace: str) -> list[dict[str, Any]]:
    """The API-key Secret and the CaptchaProvider: the emulator's and the receiver's Services."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "emulator-key", "namespace": namespace},
            "stringData": {"apiKey": EMULATOR_KEY},
        },
        {
            "apiVersion": "captchatask.dev/v1alpha1",
            "kind": "CaptchaProvider",
            "metadata": {"name": PROVIDER, "namespace": namespace},
            "spec": {
                "dialect": "captchaai",
                "baseURL": f"http://{EMULATOR}.{namespace}.svc:{EMULATOR_PORT}",
                "apiKeySecretRef": {"name": "emulator-key"},
                "pingback": {"publicURL": f"http://{RELEASE}-receiver.{namespace}.svc"},
                "polling": {"callbackTimeoutSeconds": 15, "intervalSeconds": 5, "maxPolls": 40},
                "maxInFlight": 100,
            },
        },
    ]


def task_manifests(namespace: str, count: int, *, start: int = 0) -> list[dict[str, Any]]:
    """``count`` reCAPTCHA v2 tasks for the emulator provider, numbered from ``start``."""
    return [
        {
            "apiVersion": "captchatask.dev/v1alpha1",
            "kind": "CaptchaTask",
            "metadata": {"name": f"e2e-{i:04d}", "namespace": namespace},
            "spec": {
                "providerRef": {"name": PROVIDER},
                "type": "RecaptchaV2",
                "siteKey": "6Le-wvkSAAAAAPBMRTvw0Q4Muexq9bi0DJwx_mJ-",
                "pageURL": f"https://example.test/page/{i}",
                "deadlineSeconds": 600,
            },
        }
        for i in range(start, start + count)
    ]


def emulator_tasks(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    """The emulator's accounting, through the API server's Service proxy (any cluster)."""
    path = (
        f"/api/v1/namespaces/{namespace}/services/http:{EMULATOR}:{EMULATOR_PORT}"
        "/proxy/_emulator/tasks"
    )
    return list(json.loads(cluster.kubectl("get", "--raw", path))["tasks"])


def wait_tasks(
    cluster: Cluster, namespace: str, count: int, timeout: float
) -> list[dict[str, Any]]:
    """Wait until every task has a terminal phase (or ``timeout``); return them."""
    deadline = time.monotonic() + timeout
    while True:
        tasks = cluster.get_json("captchatasks", "-n", namespace)["items"]
        phases: dict[str, int] = {}
        for task in tasks:
            phase = task.get("status", {}).get("phase", "-")
            phases[phase] = phases.get(phase, 0) + 1
        done = sum(n for p, n in phases.items() if p in {"Solved", "Failed"})
        if done >= count or time.monotonic() > deadline:
            say(f"tasks: {phases}")
            return list(tasks)
        say(f"tasks: {phases}")
        time.sleep(5)


def operator_states(cluster: Cluster, namespace: str) -> dict[str, bool | None]:
    """Each operator pod's ``active`` flag from its /readyz (None when it does not answer)."""
    pods = cluster.get_json("pods", "-n", namespace, "-l", "app.kubernetes.io/component=operator")[
        "items"
    ]
    states: dict[str, bool | None] = {}
    for pod in pods:
        name = pod["metadata"]["name"]
        if pod["metadata"].get("deletionTimestamp"):
            continue
        raw = cluster.run(
            "kubectl", "get", "--raw",
            f"/api/v1/namespaces/{namespace}/pods/{name}:9090/proxy/readyz",
            check=False,
        )  # fmt: skip
        try:
            states[name] = bool(json.loads(raw.stdout)["active"])
        except (ValueError, KeyError, TypeError):
            states[name] = None
    return states


def single_active(cluster: Cluster, namespace: str, timeout: float = 180) -> float:
    """Wait until exactly one operator is active; return how long more than one was.

    Two replicas started together both resume (kopf peering) and stay active until one of them
    sees the other's keep-alive, up to a peering lifetime later: a window the summary reports.
    """
    started = time.monotonic()
    dual = 0.0
    last = started
    while time.monotonic() - started < timeout:
        states = operator_states(cluster, namespace)
        now = time.monotonic()
        active = sum(1 for is_active in states.values() if is_active)
        if active > 1:
            dual += now - last
        elif active == 1:
            return round(dual, 1)
        last = now
        time.sleep(1)
    raise RuntimeError(f"not exactly one active operator after {timeout}s: {states}")


def disrupt(cluster: Cluster, namespace: str) -> dict[str, Any]:
    """Mid-run: force-delete the active operator, delete a receiver, restart kube-apiserver."""
    facts: dict[str, Any] = {"both_active_seconds": single_active(cluster, namespace)}
    if facts["both_active_seconds"]:
        say(f"both operators were active for {facts['both_active_seconds']}s after starting")
    states = operator_states(cluster, namespace)
    active = [name for name, is_active in states.items() if is_active]
    if len(active) != 1:
        raise RuntimeError(f"expected exactly one active operator, got {states}")
    standby = [name for name in states if name not in active]
    say(f"force-deleting the active operator {active[0]} (standby: {standby})")
    # Taken over when any other operator is active: the Deployment's replacement pod may win
    # (kopf peering prefers the higher priority, and the chart's are random).
    started = time.monotonic()
    cluster.kubectl(
        "delete", "pod", "-n", namespace, active[0], "--grace-period=0", "--force", "--wait=false"
    )
    deadline = started + 300
    while time.monotonic() < deadline:
        now = operator_states(cluster, namespace)
        winners = [name for name, is_active in now.items() if is_active and name != active[0]]
        if winners:
            facts["takeover_seconds"] = round(time.monotonic() - started, 1)
            facts["taken_over_by"] = "standby" if winners[0] in standby else "replacement pod"
            break
        time.sleep(0.5)
    else:
        raise RuntimeError(
            f"no standby took over within 300 s: {operator_states(cluster, namespace)}"
        )
    say(f"{facts['taken_over_by']} active after {facts['takeover_seconds']}s")
    receivers = cluster.get_json(
        "pods", "-n", namespace, "-l", "app.kubernetes.io/component=receiver"
    )["items"]
    victim = receivers[0]["metadata"]["name"]
    say(f"deleting receiver pod {victim}")
    cluster.kubectl("delete", "pod", "-n", namespace, victim, "--wait=false")
    facts["receiver_deleted"] = victim
    if cluster.restart_apiserver is not None:
        say("restarting kube-apiserver")
        started = time.monotonic()
        cluster.restart_apiserver()
        facts["apiserver_restart_seconds"] = round(time.monotonic() - started, 1)
    else:
        facts["apiserver_restart_seconds"] = None
    return facts


def upgrade_in_flight(cluster: Cluster, namespace: str, first: int, count: int) -> dict[str, Any]:
    """Apply ``count`` more tasks, then ``helm upgrade`` a changed value that rolls every pod."""
    say(f"applying {count} more tasks, then helm upgrade (rolls the operators and receivers)")
    batch = task_manifests(namespace, count, start=first)
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(batch))
    started = time.monotonic()
    cluster.run(
        "helm", "upgrade", RELEASE, str(REPO / "charts" / "captchatask"), "-n", namespace,
        "--reuse-values",
        "--set-string", "operator.podAnnotations.e2e-rollout=1",
        "--set-string", "receiver.podAnnotations.e2e-rollout=1",
        "--wait", f"--timeout={READY_TIMEOUT}s",
    )  # fmt: skip
    for deployment in ("operator", "receiver"):
        cluster.kubectl(
            "rollout", "status", "-n", namespace, f"deployment/{RELEASE}-{deployment}",
            f"--timeout={READY_TIMEOUT}s",
        )  # fmt: skip
    return {"upgrade_seconds": round(time.monotonic() - started, 1)}


def uninstall(cluster: Cluster, namespace: str, tasks: int) -> dict[str, Any]:
    """``helm uninstall``: every object of the release goes; the CRDs and the tasks stay."""
    say("helm uninstall")
    cluster.run("helm", "uninstall", RELEASE, "-n", namespace, "--wait")
    selector = f"app.kubernetes.io/instance={RELEASE}"
    kinds = (
        "deployments,replicasets,pods,services,configmaps,secrets,serviceaccounts,roles,"
        "rolebindings,poddisruptionbudgets,networkpolicies"
    )
    # helm waits for the objects it created; their pods (terminating with the grace period the
    # chart gives them) and ReplicaSets go afterwards, through the garbage collector.
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        left = cluster.kubectl("get", kinds, "-n", namespace, "-l", selector, "-o", "name").split()
        if all(name == f"secret/{RELEASE}-pingback-key" for name in left):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(2)
    cluster_left = cluster.kubectl(
        "get", "clusterroles,clusterrolebindings,clusterkopfpeerings", "-l", selector,
        "-o", "name", check=False,
    ).split()  # fmt: skip
    # The pingback key Secret is kept on purpose (helm.sh/resource-policy: keep), so pingback
    # URLs already handed to the provider stay verifiable after a reinstall.
    kept_by_design = [name for name in left if name == f"secret/{RELEASE}-pingback-key"]
    remaining_tasks = len(cluster.get_json("captchatasks", "-n", namespace)["items"])
    crds = cluster.kubectl("get", "crd", "-o", "name").split()
    return {
        "left_behind": sorted(set(left + cluster_left) - set(kept_by_design)),
        "kept_by_design": kept_by_design,
        "tasks_kept": remaining_tasks,
        "tasks_expected": tasks,
        "crds_kept": sorted(c for c in crds if c.endswith(".captchatask.dev")),
    }


def verdict(tasks: list[dict[str, Any]], provider_tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """Compare the tasks with the emulator's accounting."""
    by_id = {str(t["id"]): t for t in provider_tasks}
    claimed: dict[str, int] = {}
    lost, wrong_token = [], []
    for task in tasks:
        status = task.get("status", {})
        name = task["metadata"]["name"]
        provider_id = str(status.get("providerTaskId", ""))
        claimed[provider_id] = claimed.get(provider_id, 0) + 1
        if status.get("phase") != "Solved":
            lost.append(name)
            continue
        expected = by_id.get(provider_id, {}).get("token")
        if status.get("solution", {}).get("token") != expected:
            wrong_token.append(name)
    orphans = [i for i in by_id if i not in claimed]
    return {
        "tasks": len(tasks),
        "solved": len(tasks) - len(lost),
        "lost": len(lost),
        "lost_examples": sorted(lost)[:10],
        "submitted_twice": len(orphans),
        "wrong_token": len(wrong_token),
        "provider_tasks": len(provider_tasks),
    }


def run(
    cluster: Cluster,
    *,
    tasks: int,
    images: Sequence[tuple[str, Path | None]],
    values: Path,
    results: Path = RESULTS,
) -> int:
    """Steps 2-5 on ``cluster``; write the summary to ``results``; return the exit status."""
    summary: dict[str, Any] = {"cluster": cluster.facts}
    if cluster.importer is not None:
        for name, archive in images:
            if archive is None:
                raise RuntimeError(f"{name}: no archive to import into the test bed node")
            say(f"importing {name}")
            cluster.importer(archive)
    tag = images[0][0].rpartition(":")[2]
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    say("helm install charts/captchatask")
    started = time.monotonic()
    cluster.run(
        "helm", "install", RELEASE, str(REPO / "charts" / "captchatask"),
        "-n", NAMESPACE, "-f", str(values), "-f", str(VALUES),
        "--wait", f"--timeout={READY_TIMEOUT}s",
    )  # fmt: skip
    say("deploying the emulator")
    emulator_args = [
        "--pingback-drop-rate=0.3",
        "--pingback-duplicate-rate=0.2",
        "--solve-time-scale=0.1",
        "--threads=200",
    ]
    cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=yaml.safe_dump_all(emulator_manifests(NAMESPACE, tag, emulator_args)),
    )
    pods = pods_ready(cluster, NAMESPACE)
    summary["pods"] = pods
    summary["ready_seconds"] = round(time.monotonic() - started, 1)
    say(f"every pod Ready ({len(pods)}) in {summary['ready_seconds']}s")
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(provider_manifests(NAMESPACE)))
    say(f"applying {tasks} tasks")
    started = time.monotonic()
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(task_manifests(NAMESPACE, tasks)))
    time.sleep(3)
    summary["disruptions"] = disrupt(cluster, NAMESPACE)
    wait_tasks(cluster, NAMESPACE, tasks, timeout=600)
    more = tasks // 2
    summary["upgrade"] = upgrade_in_flight(cluster, NAMESPACE, tasks, more)
    finished = wait_tasks(cluster, NAMESPACE, tasks + more, timeout=600)
    summary["tasks_seconds"] = round(time.monotonic() - started, 1)
    summary["verdict"] = verdict(finished, emulator_tasks(cluster, NAMESPACE))
    summary["uninstall"] = uninstall(cluster, NAMESPACE, tasks + more)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(summary, indent=2) + "\n")
    v = summary["verdict"]
    d = summary["disruptions"]
    print(
        f"pods Ready: {sum(p['ready'] for p in pods)}/{len(pods)} in {summary['ready_seconds']}s | "
        f"takeover {d['takeover_seconds']}s (both active at start: {d['both_active_seconds']}s) | "
        f"apiserver restart {d['apiserver_restart_seconds']}s | "
        f"tasks {v['tasks']}: solved {v['solved']}, lost {v['lost']}, "
        f"submitted twice {v['submitted_twice']}, wrong token {v['wrong_token']} "
        f"in {summary['tasks_seconds']}s | {results}"
    )
    u = summary["uninstall"]
    print(
        f"helm upgrade in flight {summary['upgrade']['upgrade_seconds']}s | helm uninstall: "
        f"left behind {u['left_behind'] or 'nothing'}, tasks kept {u['tasks_kept']}/"
        f"{u['tasks_expected']}, CRDs kept {len(u['crds_kept'])}/3"
    )
    passed = (
        v["lost"] == 0
        and v["submitted_twice"] == 0
        and v["wrong_token"] == 0
        and not u["left_behind"]
        and u["tasks_kept"] == u["tasks_expected"]
        and len(u["crds_kept"]) == 3
    )
    print("PASSED" if passed else "FAILED")
    return 0 if passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the e2e suite; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=DEFAULT_TASKS, help="tasks to create")
    parser.add_argument(
        "--state-dir", type=Path, default=REPO / ".testbed-e2e", help="the test bed node's state"
    )
    parser.add_argument("--keep", action="store_true", help="leave the test bed node running")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where the summary is written (JSON)"
    )
    parser.add_argument(
        "--prebuilt-tag",
        metavar="TAG",
        help="with KUBECONFIG: the images are already loaded in that cluster under this tag "
        "(e.g. `docker build --target operator|sidecar|emulator` and `kind load docker-image`); "
        "nothing is built",
    )
    args = parser.parse_args(argv)
    kubeconfig = os.environ.get("KUBECONFIG")
    images: Sequence[tuple[str, Path | None]]
    if args.prebuilt_tag:
        if not kubeconfig:
            parser.error("--prebuilt-tag needs KUBECONFIG (the test bed node imports its own)")
        images, values = prebuilt_images(args.prebuilt_tag, args.state_dir.resolve())
    else:
        images, values = build_images()
    if kubeconfig:
        say(f"using the cluster of KUBECONFIG={kubeconfig} (images must be loaded there)")
        cluster = Cluster(kubeconfig=Path(kubeconfig), facts={"cluster": "KUBECONFIG"})
        return run(cluster, tasks=args.tasks, images=images, values=values, results=args.results)
    with testbed_cluster(args.state_dir.resolve(), keep=args.keep) as cluster:
        return run(cluster, tasks=args.tasks, images=images, values=values, results=args.results)


if __name__ == "__main__":
    raise SystemExit(main())
