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
5. ``helm test`` (the chart's test hook) passes;
6. an app pod made from the chart's sidecar snippet (``helm get notes``) creates a task through its
   sidecar's local API and reads the emulator's token;
7. the tasks, by ``kubectl apply``; the verdict against the emulator's own accounting: lost 0,
   recorded twice 0, submitted twice 0, every token exact.

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
#: The ServiceAccount of the app pod built from the chart's sidecar snippet (listed under
#: ``sidecar.namespaces`` in ``bench/e2e-values.yaml``, so the chart gives it the sidecar Role).
APP_SERVICE_ACCOUNT: Final = "e2e-app"
#: The task the app creates through its sidecar's local API.
APP_TASK: Final = "sidecar-app-task"
#: The app container: create a task through the sidecar's local API, long-poll its result,
#: print it on one line, then idle like an app would (a restart must not create a second task:
#: the fixed name makes a repeated create a 409, and the app just reads the task then).
APP_SCRIPT: Final = """
import json, os, signal, sys, time, urllib.error, urllib.request
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
base = os.environ["CAPTCHATASK_URL"]
task = {
    "name": "%(name)s",
    "providerRef": {"name": "%(provider)s"},
    "type": "RecaptchaV2",
    "siteKey": "6Le-wvkSAAAAAPBMRTvw0Q4Muexq9bi0DJwx_mJ-",
    "pageURL": "https://example.test/app",
    "deadlineSeconds": 600,
}
def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        base + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=90) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as err:
        return err.code, {"problem": err.read(2048).decode(errors="replace")}
    except OSError as err:
        return 0, {"error": str(err)}
for attempt in range(150):  # the API server restarts mid-run: retry what is retryable
    status, body = call("POST", "/v1/tasks", task)
    print("POST /v1/tasks ->", status, flush=True)
    if status in (201, 409):
        break
    time.sleep(2)
for attempt in range(10):
    status, body = call("GET", "/v1/tasks/%(name)s?wait=60")
    print("GET /v1/tasks/%(name)s?wait=60 ->", status, body.get("phase"), flush=True)
    if status == 200 and body.get("done"):
        break
    time.sleep(1)
print("RESULT " + json.dumps(body), flush=True)
while True:
    time.sleep(3600)
"""


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
    cluster: Cluster,
    namespace: str,
    count: int,
    timeout: float,
    receivers: dict[str, dict[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """Wait until every task has a terminal phase (or ``timeout``); return them.

    With ``receivers``, each round also scrapes the receivers' pingback counters into it.
    """
    deadline = time.monotonic() + timeout
    while True:
        if receivers is not None:
            receiver_pingbacks(cluster, namespace, receivers)
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


def disrupt(
    cluster: Cluster, namespace: str, receivers: dict[str, dict[str, float]]
) -> dict[str, Any]:
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
    receiver_pods = cluster.get_json(
        "pods", "-n", namespace, "-l", "app.kubernetes.io/component=receiver"
    )["items"]
    victim = receiver_pods[0]["metadata"]["name"]
    receiver_pingbacks(cluster, namespace, receivers)  # its counters go with it
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


def upgrade_in_flight(
    cluster: Cluster,
    namespace: str,
    first: int,
    count: int,
    receivers: dict[str, dict[str, float]],
) -> dict[str, Any]:
    """Apply ``count`` more tasks, then ``helm upgrade`` a changed value that rolls every pod."""
    say(f"applying {count} more tasks, then helm upgrade (rolls the operators and receivers)")
    batch = task_manifests(namespace, count, start=first)
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(batch))
    receiver_pingbacks(cluster, namespace, receivers)
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


def helm_test(cluster: Cluster, namespace: str) -> dict[str, Any]:
    """``helm test``: the chart's own test hook checks the release's Services from a pod."""
    say("helm test")
    started = time.monotonic()
    result = cluster.run(
        "helm", "test", RELEASE, "-n", namespace, f"--timeout={READY_TIMEOUT}s", check=False
    )
    facts: dict[str, Any] = {
        "passed": result.returncode == 0,
        "seconds": round(time.monotonic() - started, 1),
    }
    if result.returncode != 0:
        # The hook pod is kept when it fails (its delete policy): its log names the check.
        log = cluster.kubectl("logs", "-n", namespace, f"{RELEASE}-test", check=False)
        facts["output"] = (result.stderr + result.stdout + log)[-3000:]
        say(f"helm test failed:\n{facts['output']}")
    return facts


def sidecar_app_pod(cluster: Cluster, namespace: str, tag: str) -> dict[str, Any]:
    """The chart's sidecar snippet as a user gets it (``helm get notes``), with our app in it.

    The snippet is used as printed: the sidecar init container, its volumes, the pod's security
    context, ServiceAccount and the app's ``CAPTCHATASK_URL``. Only the app container's image and
    command are ours (the placeholder ``registry.example.com/my-app`` is the user's app).
    """
    notes = cluster.run("helm", "get", "notes", RELEASE, "-n", namespace).stdout
    _, separator, snippet = notes.partition("\n---\n")
    if not separator:
        raise RuntimeError(f"helm get notes printed no sidecar snippet:\n{notes}")
    pod: dict[str, Any] = yaml.safe_load(snippet)
    app = pod["spec"]["containers"][0]
    app["image"] = f"{EMULATOR_IMAGE}:{tag}"
    app["imagePullPolicy"] = "Never"
    app["command"] = ["python", "-c", APP_SCRIPT % {"name": APP_TASK, "provider": PROVIDER}]
    return pod


def start_sidecar_app(cluster: Cluster, namespace: str, tag: str) -> str:
    """Create the app's ServiceAccount (the user's part) and the pod; return the pod's name."""
    pod = sidecar_app_pod(cluster, namespace, tag)
    account = pod["spec"]["serviceAccountName"]
    if pod["metadata"]["namespace"] != namespace or account != APP_SERVICE_ACCOUNT:
        raise RuntimeError(
            f"the snippet names {pod['metadata']['namespace']}/{account}: sidecar.namespaces in "
            f"{VALUES.name} must list {namespace}/{APP_SERVICE_ACCOUNT}"
        )
    say(f"starting the app pod {pod['metadata']['name']} from the chart's sidecar snippet")
    cluster.kubectl("create", "serviceaccount", "-n", namespace, account, check=False)
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(pod))
    return str(pod["metadata"]["name"])


def sidecar_app_result(
    cluster: Cluster, namespace: str, pod: str, timeout: float = 300
) -> dict[str, Any]:
    """Wait for the app's printed result; check it is the task's, and the pod's shape."""
    deadline = time.monotonic() + timeout
    result: dict[str, Any] | None = None
    log = ""
    while time.monotonic() < deadline:
        log = cluster.kubectl("logs", "-n", namespace, pod, "-c", "app", check=False)
        lines = [line for line in log.splitlines() if line.startswith("RESULT ")]
        if lines:
            result = json.loads(lines[-1].removeprefix("RESULT "))
            break
        time.sleep(2)
    body = cluster.get_json("pod", "-n", namespace, pod)
    init = {c["name"]: c for c in body["spec"].get("initContainers", [])}
    statuses = body["status"].get("initContainerStatuses", [])
    facts: dict[str, Any] = {
        "pod": pod,
        "native_sidecar": init.get("captchatask", {}).get("restartPolicy") == "Always",
        "sidecar_running": any(
            s["name"] == "captchatask" and "running" in s.get("state", {}) for s in statuses
        ),
        "sidecar_restarts": sum(s.get("restartCount", 0) for s in statuses),
        "phase": (result or {}).get("phase"),
        "token": ((result or {}).get("solution") or {}).get("token"),
        "provider_task_id": (result or {}).get("providerTaskId"),
    }
    if result is None:
        described = cluster.kubectl("describe", "pod", "-n", namespace, pod, check=False)
        sidecar_log = cluster.kubectl(
            "logs", "-n", namespace, pod, "-c", "captchatask", check=False
        )
        facts["output"] = (log + described + sidecar_log)[-4000:]
        say(f"the app printed no result:\n{facts['output']}")
    task = cluster.run(
        "kubectl", "get", "captchatask", "-n", namespace, APP_TASK, "-o", "json", check=False
    )  # fmt: skip
    annotations = json.loads(task.stdout)["metadata"].get("annotations", {}) if task.stdout else {}
    facts["created_by"] = annotations.get("captchatask.dev/created-by")
    return facts


def receiver_pingbacks(cluster: Cluster, namespace: str, seen: dict[str, dict[str, float]]) -> None:
    """Scrape each live receiver's ``captchatask_pingbacks_total`` into ``seen`` (per pod).

    Counters only grow while a pod lives; the run deletes and rolls receivers, so it scrapes
    often and keeps each pod's last numbers (a pod's final seconds may go unseen: the counts are
    a lower bound, the per-task checks in :func:`recorded_twice` are exact).
    """
    pods = cluster.get_json("pods", "-n", namespace, "-l", "app.kubernetes.io/component=receiver")
    for pod in pods["items"]:
        name = pod["metadata"]["name"]
        if not pod["status"].get("podIP"):
            continue
        # Bounded: a terminating pod's proxy may hang until the API server gives up on it.
        raw = cluster.run(
            "kubectl", "get", "--raw", "--request-timeout=5s",
            f"/api/v1/namespaces/{namespace}/pods/{name}:9090/proxy/metrics",
            check=False,
        )  # fmt: skip
        if raw.returncode != 0:
            continue
        counts = seen.setdefault(name, {})
        for line in raw.stdout.splitlines():
            if line.startswith("captchatask_pingbacks_total{") and f'"{namespace}"' in line:
                labels, _, value = line.rpartition(" ")
                outcome = labels.split('outcome="', 1)[1].split('"', 1)[0]
                counts[outcome] = max(counts.get(outcome, 0.0), float(value))


def recorded_twice(
    cluster: Cluster,
    namespace: str,
    tasks: list[dict[str, Any]],
    provider_tasks: list[dict[str, Any]],
    receivers: dict[str, dict[str, float]],
) -> dict[str, Any]:
    """Results announced more than once per task, against the emulator's pingback accounting.

    A task's result is announced by a receiver (a pingback it recorded) or by the operator (a
    fallback poll that recorded it: ``deliveredBy: poll`` in the ledger, and a ``Solved`` Event
    "recovered by fallback poll" when the operator posts routine Events). Each recording
    appends a ``Complete`` condition. A task counts as recorded twice when it has more
    than one ``Complete`` condition, more than one recovery, or a recovery although its result
    was delivered by a pingback; and in total the announcements may not exceed the tasks solved
    (the larger of the two counts is reported).
    """
    events = cluster.get_json(
        "events", "-n", namespace,
        "--field-selector", "involvedObject.kind=CaptchaTask,reason=Solved",
    )["items"]  # fmt: skip
    recoveries: dict[str, int] = {}
    for event in events:
        if "fallback poll" in event.get("message", ""):
            name = event["involvedObject"]["name"]
            recoveries[name] = recoveries.get(name, 0) + int(event.get("count") or 1)
    twice: list[str] = []
    for task in tasks:
        name = task["metadata"]["name"]
        status = task.get("status", {})
        complete = sum(
            1
            for c in status.get("conditions", [])
            if c.get("type") == "Complete" and c.get("status") == "True"
        )
        recovered = recoveries.get(name, 0)
        by_pingback = status.get("deliveredBy") == "pingback"
        if complete > 1 or recovered > 1 or (recovered and by_pingback):
            twice.append(name)
    solved = sum(1 for t in tasks if t.get("status", {}).get("phase") == "Solved")
    by_pingback = sum(1 for t in tasks if t.get("status", {}).get("deliveredBy") == "pingback")
    # From the ledger: the operator posts the routine Solved Event only with --routine-events.
    by_poll = sum(1 for t in tasks if t.get("status", {}).get("deliveredBy") == "poll")
    recorded = int(sum(c.get("recorded", 0.0) for c in receivers.values()))
    duplicates = int(sum(c.get("duplicate", 0.0) for c in receivers.values()))
    announced = recorded + sum(recoveries.values())
    delivered = sum(
        1
        for t in provider_tasks
        for a in t.get("pingback", {}).get("attempts", [])
        if a.get("status") is not None and 200 <= a["status"] < 300
    )
    return {
        "recorded_twice": max(len(twice), announced - solved),
        "recorded_twice_examples": sorted(twice)[:10],
        "delivered_by_pingback": by_pingback,
        "recovered_by_poll": by_poll,
        "receivers_recorded": recorded,
        "receivers_duplicate": duplicates,
        "emulator_pingbacks_delivered": delivered,
        "emulator_pingbacks_dropped": sum(
            1 for t in provider_tasks if t.get("pingback", {}).get("outcome") == "dropped"
        ),
        "emulator_duplicates_sent": sum(
            1 for t in provider_tasks if t.get("pingback", {}).get("copies", 0) > 1
        ),
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
        # The emulator sends pingbacks only to loopback and the hosts named here: without it
        # every pingback would be refused and the drop/duplicate faults would test nothing.
        f"--pingback-host={RELEASE}-receiver.{NAMESPACE}.svc",
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
    summary["helm_test"] = helm_test(cluster, NAMESPACE)
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(provider_manifests(NAMESPACE)))
    app_pod = start_sidecar_app(cluster, NAMESPACE, tag)
    say(f"applying {tasks} tasks")
    started = time.monotonic()
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(task_manifests(NAMESPACE, tasks)))
    receivers: dict[str, dict[str, float]] = {}
    time.sleep(3)
    summary["disruptions"] = disrupt(cluster, NAMESPACE, receivers)
    wait_tasks(cluster, NAMESPACE, tasks, timeout=600, receivers=receivers)
    summary["sidecar_app"] = sidecar_app_result(cluster, NAMESPACE, app_pod)
    more = tasks // 2
    summary["upgrade"] = upgrade_in_flight(cluster, NAMESPACE, tasks, more, receivers)
    total = tasks + more + 1  # and the app's task
    finished = wait_tasks(cluster, NAMESPACE, total, timeout=600, receivers=receivers)
    receiver_pingbacks(cluster, NAMESPACE, receivers)
    summary["tasks_seconds"] = round(time.monotonic() - started, 1)
    provider_tasks = emulator_tasks(cluster, NAMESPACE)
    summary["verdict"] = verdict(finished, provider_tasks)
    summary["verdict"].update(
        recorded_twice(cluster, NAMESPACE, finished, provider_tasks, receivers)
    )
    by_id = {str(t["id"]): t for t in provider_tasks}
    app = summary["sidecar_app"]
    expected = by_id.get(str(app["provider_task_id"]), {}).get("token")
    app["token_matches"] = app["token"] is not None and app["token"] == expected
    cluster.kubectl("delete", "pod", "-n", NAMESPACE, app_pod, "--wait=false", check=False)
    summary["uninstall"] = uninstall(cluster, NAMESPACE, total)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(summary, indent=2) + "\n")
    v = summary["verdict"]
    d = summary["disruptions"]
    print(
        f"pods Ready: {sum(p['ready'] for p in pods)}/{len(pods)} in {summary['ready_seconds']}s | "
        f"takeover {d['takeover_seconds']}s (both active at start: {d['both_active_seconds']}s) | "
        f"apiserver restart {d['apiserver_restart_seconds']}s | "
        f"tasks {v['tasks']}: solved {v['solved']}, lost {v['lost']}, "
        f"recorded twice {v['recorded_twice']}, "
        f"submitted twice {v['submitted_twice']}, wrong token {v['wrong_token']} "
        f"in {summary['tasks_seconds']}s | {results}"
    )
    a = summary["sidecar_app"]
    print(
        f"pingbacks: emulator delivered {v['emulator_pingbacks_delivered']} "
        f"(dropped {v['emulator_pingbacks_dropped']}, sent twice {v['emulator_duplicates_sent']}), "
        f"results by pingback {v['delivered_by_pingback']}, by poll {v['recovered_by_poll']} | "
        f"helm test {'passed' if summary['helm_test']['passed'] else 'FAILED'} | "
        f"sidecar app {a['pod']}: {a['phase']}, token "
        f"{'exact' if a['token_matches'] else 'WRONG'}"
    )
    u = summary["uninstall"]
    print(
        f"helm upgrade in flight {summary['upgrade']['upgrade_seconds']}s | helm uninstall: "
        f"left behind {u['left_behind'] or 'nothing'}, tasks kept {u['tasks_kept']}/"
        f"{u['tasks_expected']}, CRDs kept {len(u['crds_kept'])}/3"
    )
    passed = (
        v["lost"] == 0
        and v["recorded_twice"] == 0
        and v["submitted_twice"] == 0
        and summary["helm_test"]["passed"]
        and a["token_matches"]
        and a["native_sidecar"]
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
