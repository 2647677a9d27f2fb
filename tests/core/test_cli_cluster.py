"""The user commands against the real API server, typed the way kubectl users type them.

Each command runs as a real process (the installed console scripts, and through the real
kubectl's plugin mechanism), so what is asserted is what a person at a prompt sees. The exec
credential plugin is a real shell script that gets a ServiceAccount token from the TokenRequest
API, as EKS's and GKE's plugins get theirs from their clouds.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from tests.core.test_dlq_cli import make_letters

from captchatask import credentials, kube, testbed

BIN_DIR = Path(sys.executable).parent
#: RBAC grants reach the authorizer through an informer, shortly after the write.
RBAC_POLLS = 150

TASK = """apiVersion: captchatask.dev/v1alpha1
kind: CaptchaTask
metadata: {{name: {name}}}
spec:
  type: Turnstile
  siteKey: k
  pageURL: https://shop.example/
  providerRef: {{name: {provider}}}
"""
PROVIDER = """apiVersion: captchatask.dev/v1alpha1
kind: CaptchaProvider
metadata: {name: default}
spec:
  dialect: captchaai
  baseURL: http://127.0.0.1:9
  apiKeySecretRef: {name: key}
  pingback: {publicURL: 'http://127.0.0.1:8080'}
"""


def cli(
    env: dict[str, str], *argv: str, entry: str = "captchatask", stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run an installed console script with the venv's bin first on PATH (as pip leaves it)."""
    full_env = {**env, "PATH": f"{BIN_DIR}{os.pathsep}{env['PATH']}"}
    return subprocess.run(
        [str(BIN_DIR / entry), *argv],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        check=False,
        timeout=120,
    )


def kubectl_plugin(
    control_plane: testbed.ControlPlane, *argv: str
) -> subprocess.CompletedProcess[str]:
    """Run the real kubectl, which must find ``kubectl-captchatask`` on PATH."""
    env = control_plane.env()
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env['PATH']}"
    return subprocess.run(
        [str(control_plane.toolchain.kubectl), *argv],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )


def test_the_printed_instruction_dlq_list_dash_n_runs_as_printed(
    kubectl: testbed.Kubectl, kube_env: dict[str, str], namespace: str
) -> None:
    make_letters(kubectl, namespace)
    for argv in (
        ["dlq", "list", "-n", namespace],
        ["-n", namespace, "dlq", "list"],
        ["dlq", "-n", namespace, "list"],
        ["dlq", "list", f"--namespace={namespace}", "-o", "wide"],
    ):
        result = cli(kube_env, *argv)
        assert result.returncode == 0, (argv, result.stderr)
        assert "letter-0" in result.stdout, argv
    wide = cli(kube_env, "dlq", "list", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert wide[0].split()[-3:] == ["TASK-UID", "NEXT-ATTEMPT", "REDRIVEN"]
    names = cli(kube_env, "dlq", "list", "-n", namespace, "-o", "name").stdout.split()
    assert names[0] == "captchadeadletter.captchatask.dev/letter-0"
    assert len(names) == 5


def test_kubectl_finds_the_plugin_and_it_takes_flags_after_the_verb(
    control_plane: testbed.ControlPlane, kubectl: testbed.Kubectl, namespace: str
) -> None:
    make_letters(kubectl, namespace)
    result = kubectl_plugin(control_plane, "captchatask", "dlq", "list", "-n", namespace)
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == [
        f"letter-{i}" for i in range(5)
    ]
    plugins = kubectl_plugin(control_plane, "plugin", "list")
    assert str(BIN_DIR / "kubectl-captchatask") in plugins.stdout


def test_kubectl_completes_the_plugin_from_the_cluster(
    control_plane: testbed.ControlPlane, kubectl: testbed.Kubectl, namespace: str
) -> None:
    make_letters(kubectl, namespace)
    verbs = kubectl_plugin(control_plane, "__complete", "captchatask", "dlq", "")
    assert verbs.stdout.splitlines()[:4] == ["list", "show", "redrive", "purge"], verbs.stderr
    letters = kubectl_plugin(
        control_plane, "__complete", "captchatask", "dlq", "show", "-n", namespace, "letter-"
    )
    assert letters.stdout.splitlines()[:5] == [f"letter-{i}" for i in range(5)], letters.stderr
    assert letters.stdout.splitlines()[5] == ":4"
    spaces = kubectl_plugin(control_plane, "__complete", "captchatask", "-n", namespace[:5])
    assert namespace in spaces.stdout.splitlines()


def test_all_namespaces_lists_both_teams_with_a_namespace_column(
    kubectl: testbed.Kubectl, kube_env: dict[str, str], namespace: str
) -> None:
    other = f"{namespace}-b"
    kubectl("create", "namespace", other)
    try:
        make_letters(kubectl, namespace)
        make_letters(kubectl, other)
        result = cli(kube_env, "dlq", "list", "-A", "-l", "team=b")
        assert result.returncode == 0, result.stderr
        rows = [line.split() for line in result.stdout.splitlines()]
        assert rows[0][0] == "NAMESPACE"
        mine = {(row[0], row[1]) for row in rows[1:] if row[0] in (namespace, other)}
        assert mine == {(ns, f"letter-{i}") for ns in (namespace, other) for i in (3, 4)}
    finally:
        kubectl("delete", "namespace", other, "--wait=false", check=False)


def test_context_picks_the_contexts_namespace(
    control_plane: testbed.ControlPlane,
    kubectl: testbed.Kubectl,
    namespace: str,
    tmp_path: Path,
) -> None:
    make_letters(kubectl, namespace)
    config = yaml.safe_load(control_plane.kubeconfig.read_text(encoding="utf-8"))
    admin = config["contexts"][0]["context"]
    config["contexts"].append(
        {"name": "team", "context": {**admin, "namespace": namespace}},
    )
    path = tmp_path / "two-contexts.kubeconfig"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**control_plane.env(), "KUBECONFIG": str(path)}
    assert "letter-0" not in cli(env, "dlq", "list").stdout
    result = cli(env, "dlq", "list", "--context", "team")
    assert result.returncode == 0, result.stderr
    assert "letter-0" in result.stdout
    result = cli(env, "--context=team", "dlq", "list", "--kubeconfig", str(path), "-o", "name")
    assert len(result.stdout.split()) == 5
    missing = cli(env, "dlq", "list", "--context", "nope")
    assert missing.returncode == 1
    assert "context 'nope' does not exist" in missing.stderr


def _statuses(kubectl: testbed.Kubectl, namespace: str) -> dict[str, object]:
    items = json.loads(kubectl("get", "cdl", "-n", namespace, "-o", "json").stdout)["items"]
    return {item["metadata"]["name"]: item.get("status") for item in items}


def test_redrive_and_purge_dry_runs_change_nothing(
    kubectl: testbed.Kubectl, kube_env: dict[str, str], namespace: str
) -> None:
    make_letters(kubectl, namespace)
    before = _statuses(kubectl, namespace)
    client = cli(kube_env, "dlq", "redrive", "-l", "team=b", "-n", namespace, "--dry-run")
    assert client.returncode == 0, client.stderr
    assert client.stdout.splitlines() == [
        "captchadeadletter.captchatask.dev/letter-3 redriven (dry run)",
        "captchadeadletter.captchatask.dev/letter-4 redriven (dry run)",
        "2 dead letter(s) redriven (dry run)",
    ]
    server = cli(
        kube_env, "dlq", "redrive", "letter-4", "-n", namespace, "--dry-run=server", "-o", "json"
    )
    assert server.returncode == 0, server.stderr
    # The API server ran the patch and answered with the object as it would be.
    assert json.loads(server.stdout)["status"]["phase"] == "Pending"
    # No confirmation is asked for a dry run (stdin is not a terminal here, which means "no").
    purge = cli(kube_env, "dlq", "purge", "--all-expired", "-n", namespace, "--dry-run=server")
    assert purge.returncode == 0, purge.stderr
    assert "letter-4 deleted (server dry run)" in purge.stdout
    assert _statuses(kubectl, namespace) == before


def _wait_until_allowed(kubectl: testbed.Kubectl, user: str, namespace: str) -> None:
    for _ in range(RBAC_POLLS):
        allowed = kubectl(
            "auth",
            "can-i",
            "list",
            "captchadeadletters",
            "-n",
            namespace,
            "--as",
            user,
            check=False,
        )
        if allowed.stdout.strip() == "yes":
            return
        time.sleep(0.1)  # paced poll of the authorizer, nothing timed is asserted
    pytest.fail(f"{user} never got its grant")


READER_ROLE = """apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: dlq-reader}}
rules:
- apiGroups: [captchatask.dev]
  resources: [captchadeadletters]
  verbs: [get, list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: dlq-reader}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: dlq-reader}}
subjects:
- {{kind: {kind}, name: {name}, namespace: {namespace}, apiGroup: {group}}}
"""


def test_a_server_dry_run_is_refused_where_the_real_write_would_be(
    control_plane: testbed.ControlPlane,
    kubectl: testbed.Kubectl,
    namespace: str,
) -> None:
    make_letters(kubectl, namespace)
    viewer = control_plane.user_kubeconfig("dlq-viewer")
    binding = READER_ROLE.format(
        kind="User", name="dlq-viewer", namespace=namespace, group="rbac.authorization.k8s.io"
    )
    kubectl("apply", "-n", namespace, "-f", "-", input=binding)
    _wait_until_allowed(kubectl, "dlq-viewer", namespace)
    env = {**control_plane.env(), "KUBECONFIG": str(viewer)}
    client = cli(env, "dlq", "redrive", "letter-1", "-n", namespace, "--dry-run=client")
    assert client.returncode == 0
    server = cli(env, "dlq", "redrive", "letter-1", "-n", namespace, "--dry-run=server")
    assert server.returncode == 1
    assert "forbidden" in server.stderr


# -- exec credential plugins ---------------------------------------------------------------

PLUGIN = """#!/bin/sh
# An exec credential plugin like EKS's: print an ExecCredential with a short-lived token.
# The first run hands out a token the API server does not know (a revoked one), so the
# client has to come back for a fresh one.
set -eu
state="{state}"
runs=$(cat "$state/runs" 2>/dev/null || echo 0)
runs=$((runs + 1))
echo "$runs" > "$state/runs"
printf '%s' "$KUBERNETES_EXEC_INFO" > "$state/exec-info-$runs.json"
if [ "$runs" -eq 1 ]; then
    token=revoked-token
else
    token=$("{kubectl}" --kubeconfig "{admin}" create token "{sa}" -n "{namespace}" --duration=10m)
fi
expires=$(date -u -d '+10 minutes' +%Y-%m-%dT%H:%M:%SZ)
cat <<EOF
{{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
 "status": {{"token": "$token", "expirationTimestamp": "$expires"}}}}
EOF
"""


@pytest.fixture
def exec_kubeconfig(
    control_plane: testbed.ControlPlane, kubectl: testbed.Kubectl, namespace: str, tmp_path: Path
) -> Path:
    """A kubeconfig whose user is an exec plugin handing out a ServiceAccount's tokens."""
    kubectl("create", "serviceaccount", "oncall", "-n", namespace)
    binding = READER_ROLE.format(
        kind="ServiceAccount", name="oncall", namespace=namespace, group='""'
    )
    kubectl("apply", "-n", namespace, "-f", "-", input=binding)
    _wait_until_allowed(kubectl, f"system:serviceaccount:{namespace}:oncall", namespace)
    state = tmp_path / "plugin-state"
    state.mkdir()
    plugin = tmp_path / "bin" / "get-token"
    plugin.parent.mkdir()
    plugin.write_text(
        PLUGIN.format(
            state=state,
            kubectl=control_plane.toolchain.kubectl,
            admin=control_plane.kubeconfig,
            sa="oncall",
            namespace=namespace,
        ),
        encoding="utf-8",
    )
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    config = yaml.safe_load(control_plane.kubeconfig.read_text(encoding="utf-8"))
    user = config["contexts"][0]["context"]["user"]
    config["users"] = [
        {
            "name": user,
            "user": {
                "exec": {
                    "apiVersion": "client.authentication.k8s.io/v1",
                    # Relative to the kubeconfig's directory, as client-go resolves it.
                    "command": "./bin/get-token",
                    "interactiveMode": "Never",
                    "provideClusterInfo": True,
                }
            },
        }
    ]
    path = tmp_path / "exec.kubeconfig"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_an_exec_plugin_token_is_used_and_renewed_after_a_401(
    control_plane: testbed.ControlPlane,
    kubectl: testbed.Kubectl,
    namespace: str,
    exec_kubeconfig: Path,
) -> None:
    make_letters(kubectl, namespace)
    env = {**control_plane.env(), "KUBECONFIG": str(exec_kubeconfig)}
    result = cli(env, "dlq", "list", "-n", namespace, "-o", "name")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 5
    state = exec_kubeconfig.parent / "plugin-state"
    # Run 1 gave the revoked token (401), run 2 the ServiceAccount's: renewed once, no more.
    assert (state / "runs").read_text(encoding="utf-8").strip() == "2"
    info = json.loads((state / "exec-info-1.json").read_text(encoding="utf-8"))
    assert info["kind"] == "ExecCredential"
    assert info["spec"]["interactive"] is False
    assert info["spec"]["cluster"]["server"] == control_plane.server
    # The ServiceAccount may read but not write: the token really is the ServiceAccount's.
    denied = cli(env, "dlq", "redrive", "letter-0", "-n", namespace)
    assert denied.returncode == 1
    assert f"system:serviceaccount:{namespace}:oncall" in denied.stderr


async def test_an_exec_plugin_token_is_renewed_when_it_expires(
    namespace: str, exec_kubeconfig: Path
) -> None:
    config = kube.load_config(str(exec_kubeconfig))
    assert config.exec_plugin is not None
    assert config.token is None
    now = [dt.datetime.now(dt.UTC)]
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:
        client = kube.KubeClient(config, session)
        creds = client.exec_credentials = credentials.ExecCredentials(
            config.exec_plugin, clock=lambda: now[0]
        )
        await client.list(kube.DEAD_LETTERS, namespace)  # revoked token, 401, renewed: 2 runs
        await client.list(kube.DEAD_LETTERS, namespace)  # cached
        assert creds.runs == 2
        now[0] += dt.timedelta(minutes=11)  # past the plugin's expirationTimestamp
        await client.list(kube.DEAD_LETTERS, namespace)
        assert creds.runs == 3


def test_a_failing_exec_plugin_is_reported_with_its_install_hint(
    kube_env: dict[str, str], control_plane: testbed.ControlPlane, tmp_path: Path
) -> None:
    config = yaml.safe_load(control_plane.kubeconfig.read_text(encoding="utf-8"))
    config["users"][0]["user"] = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": "aws-iam-authenticator-not-installed",
            "installHint": "Install aws-iam-authenticator from your package manager.",
        }
    }
    path = tmp_path / "missing-plugin.kubeconfig"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = cli(kube_env, "dlq", "list", "--kubeconfig", str(path))
    assert result.returncode == 1
    assert "aws-iam-authenticator-not-installed could not be run" in result.stderr
    assert "Install aws-iam-authenticator" in result.stderr


# -- tasks and providers -------------------------------------------------------------------


def test_tasks_and_providers_status_show_what_a_person_asks_next(
    kubectl: testbed.Kubectl, kube_env: dict[str, str], namespace: str
) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=PROVIDER)
    kubectl("apply", "-n", namespace, "-f", "-", input=TASK.format(name="t1", provider="default"))
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    ready = {
        "status": {
            "inFlight": 1,
            "threads": 5,
            "checkedAt": now,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "Unreachable",
                    "message": "connection refused",
                    "lastTransitionTime": now,
                }
            ],
        }
    }
    kubectl(
        "patch",
        "cprov",
        "default",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(ready),
    )
    status = {"status": {"phase": "Submitted", "providerTaskId": "777", "polls": 2}}
    kubectl(
        "patch",
        "ctask",
        "t1",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )
    providers = cli(kube_env, "providers", "status", "-n", namespace)
    assert providers.returncode == 0, providers.stderr
    header, row = (line.split() for line in providers.stdout.splitlines())
    assert header[:5] == ["NAME", "READY", "REASON", "IN-FLIGHT", "THREADS"]
    assert row[:5] == ["default", "False", "Unreachable", "1", "5"]
    tasks = cli(kube_env, "tasks", "list", "-o", "wide", "-n", namespace)
    assert tasks.returncode == 0, tasks.stderr
    header, row = (line.split() for line in tasks.stdout.splitlines())
    assert header == [
        "NAME",
        "PHASE",
        "TYPE",
        "PROVIDER",
        "PROVIDER-TASK",
        "DELIVERED-BY",
        "AGE",
        "FAILURE",
        "POLLS",
        "DEADLINE",
    ]
    assert row[:6] == ["t1", "Submitted", "Turnstile", "default", "777", "-"]
    assert row[8] == "2"
    shown = cli(kube_env, "tasks", "show", "t1", "-n", namespace, "-o", "json")
    assert json.loads(shown.stdout)["kind"] == "CaptchaTask"
    none = cli(kube_env, "tasks", "list", "-n", namespace, "--phase", "Solved")
    assert none.stdout == f"No tasks in namespace {namespace}.\n"


def test_the_commands_make_demo_prints_run_as_printed(
    kubectl: testbed.Kubectl, kube_env: dict[str, str], tmp_path: Path
) -> None:
    """``captchatask demo`` ends with commands to try: pasted into a new shell, they work.

    A newcomer ran ``make demo``, never activated the virtualenv: the shell has the system's
    PATH only, and the printed ``export`` lines must bring both the pinned kubectl and the
    ``captchatask`` command. (The metrics URLs are the demo's own; only the cluster lines run.)
    """
    import io  # noqa: PLC0415
    from types import SimpleNamespace  # noqa: PLC0415

    from captchatask import demo  # noqa: PLC0415

    stack = SimpleNamespace(
        env=lambda: dict(kube_env),  # what demo's Stack.env() returns: the control plane's
        sidecar_metrics_url="http://127.0.0.1:1/metrics",
        operator_metrics_url="http://127.0.0.1:2/metrics",
        emulator_url="http://127.0.0.1:3",
    )
    out = io.StringIO()
    demo.Demo(stack, out=out, live=False).look_around()  # type: ignore[arg-type]
    printed = [line.strip() for line in out.getvalue().splitlines() if line.startswith("  ")]
    lines = [line for line in printed if not line.startswith("curl ")]
    assert f"captchatask dlq list -n {demo.NAMESPACE}" in lines
    kubectl("create", "namespace", demo.NAMESPACE, check=False)
    make_letters(kubectl, demo.NAMESPACE)
    script = "set -e\n" + "\n".join(lines) + "\n"
    try:
        shell = subprocess.run(
            ["bash", "-c", script],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)},
            check=False,
            timeout=120,
        )
        assert shell.returncode == 0, (script, shell.stderr)
        assert "letter-0" in shell.stdout
    finally:
        kubectl("delete", "cdl", "--all", "-n", demo.NAMESPACE, check=False)
