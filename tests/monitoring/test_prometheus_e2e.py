"""A real Prometheus scrapes a real operator and sidecar; the DLQ alert goes inactive -> firing.

Everything runs on 127.0.0.1: the test control plane, ``captchatask operator`` and
``captchatask sidecar`` as subprocesses (as in production, with a pingback key file), and the
Debian package's ``prometheus`` with a temporary config and data directory.

Real Prometheus cannot override ``for:`` the way promtool tests can, so it loads a *test copy*
of the canonical rules in which every ``for:`` is shortened to :data:`SHORT_FOR` and which it
evaluates every second (:data:`EVALUATION_INTERVAL`). Expressions, labels and annotations are
untouched: only the waiting is shorter.

Dead letters accumulate the way they do in production: signed pingbacks for tasks that do not
exist reach the sidecar, which writes a ``CaptchaDeadLetter`` for each, and the operator's
``captchatask_dead_letters`` gauge counts them.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.monitoring.conftest import binary

from captchatask import testbed
from captchatask.model import TaskRef
from captchatask.signing import PingbackSigner

pytestmark = pytest.mark.slow

#: Prometheus scrapes and evaluates every second, so each step below takes seconds, not minutes.
SCRAPE_INTERVAL = "1s"
EVALUATION_INTERVAL = "1s"
#: Every alert's `for:` in the test copy of the rules.
SHORT_FOR = "3s"
#: Upper bounds for things to happen (waits, not timing assertions: a slow machine passes too).
STARTUP_DEADLINE_SECONDS = 60.0
ALERT_DEADLINE_SECONDS = 60.0
#: Dead letters sent while waiting for the alert, one per round.
MAX_DEAD_LETTERS = 40
DLQ_ALERT = "CaptchataskDeadLettersGrowing"


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _wait_for(what: str, probe: Callable[[], bool], *, deadline: float, logs: list[Path]) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            if probe():
                return
        except (OSError, urllib.error.URLError, ValueError):
            pass
        if time.monotonic() > end:
            tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
            pytest.fail(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.2)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)


class Processes:
    """Child processes of this test, each in its own session, stopped by pid at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.children: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = self.directory / f"{name}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.children.append(
                subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            )

    def stop(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop()


def _test_rules(rules_file: Path, target: Path) -> None:
    """Write the canonical rules with every `for:` shortened (see the module docstring)."""
    document = yaml.safe_load(rules_file.read_text(encoding="utf-8"))
    for group in document["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = SHORT_FOR
    target.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")


def _start_prometheus(
    processes: Processes,
    prometheus_bin: Path,
    tmp_path: Path,
    rules_file: Path,
    op_admin: int,
    rx_admin: int,
    prom_port: int,
    *,
    target_labels: dict[str, str] | None = None,
) -> str:
    """Start Prometheus on the shortened rules, scraping both components; return its URL.

    It scrapes as the chart's ServiceMonitor does: ``honor_labels``, so the objects' own
    ``namespace`` survives, and ``target_labels`` (the pods' namespace) for every series that
    carries none of its own.
    """
    rules_copy = tmp_path / "rules.yaml"
    _test_rules(rules_file, rules_copy)
    labels = target_labels or {}
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": EVALUATION_INTERVAL},
        "rule_files": [str(rules_copy)],
        "scrape_configs": [
            {"job_name": "captchatask-operator", "honor_labels": True,
             "static_configs": [{"targets": [f"127.0.0.1:{op_admin}"], "labels": labels}]},
            {"job_name": "captchatask-receiver", "honor_labels": True,
             "static_configs": [{"targets": [f"127.0.0.1:{rx_admin}"], "labels": labels}]},
        ],
    }  # fmt: skip
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    processes.start(
        "prometheus",
        [
            str(prometheus_bin),
            f"--config.file={config_file}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        dict(os.environ),
    )
    return f"http://127.0.0.1:{prom_port}"


def _alert_state(prometheus: str, name: str) -> tuple[str, int]:
    """The alert's state (inactive|pending|firing) and how often its group was evaluated."""
    data = _get(f"{prometheus}/api/v1/rules?type=alert")
    for group in data["data"]["groups"]:
        for rule in group["rules"]:
            if rule["name"] == name:
                evaluated = 0 if group.get("lastEvaluation", "").startswith("0001") else 1
                return str(rule["state"]), evaluated
    raise AssertionError(f"{name} is not loaded")


def _alert_is(prometheus: str, name: str, state: str) -> bool:
    return _alert_state(prometheus, name)[0] == state


def test_the_dlq_alert_fires_as_dead_letters_accumulate(
    control_plane: testbed.ControlPlane,
    namespace: str,
    rules_file: Path,
    tmp_path: Path,
    processes: Processes,
) -> None:
    prometheus_bin = binary("prometheus")
    key = secrets.token_urlsafe(36)[:48]
    key_file = tmp_path / "hmacKey"
    key_file.write_text(key + "\n")
    op_admin, rx_pingback, rx_admin, prom_port = testbed.free_ports(4)
    base_env = control_plane.env()
    base_env["CAPTCHATASK_PINGBACK_KEY_FILE"] = str(key_file)

    operator_env = dict(base_env, CAPTCHATASK_ADMIN_HOST="127.0.0.1")
    operator_env["CAPTCHATASK_ADMIN_PORT"] = str(op_admin)
    processes.start(
        "operator",
        [sys.executable, "-m", "captchatask", "operator", "--namespace", namespace, "--standalone"],
        operator_env,
    )
    spool = tmp_path / "spool"
    spool.mkdir()
    sidecar_env = dict(
        base_env,
        CAPTCHATASK_PINGBACK_ADDR=f"127.0.0.1:{rx_pingback}",
        CAPTCHATASK_ADMIN_ADDR=f"127.0.0.1:{rx_admin}",
        CAPTCHATASK_LOCAL_ADDR="",
        CAPTCHATASK_NAMESPACE=namespace,
        CAPTCHATASK_PINGBACK_NAMESPACES=namespace,
        CAPTCHATASK_SPOOL_DIR=str(spool),
        CAPTCHATASK_POD_NAME="e2e-receiver",
    )
    processes.start("sidecar", [sys.executable, "-m", "captchatask", "sidecar"], sidecar_env)
    for port in (op_admin, rx_admin):
        _wait_for(
            f"/readyz on {port}",
            functools.partial(_http_ok, f"http://127.0.0.1:{port}/readyz"),
            deadline=STARTUP_DEADLINE_SECONDS,
            logs=processes.logs,
        )

    prometheus = _start_prometheus(
        processes, prometheus_bin, tmp_path, rules_file, op_admin, rx_admin, prom_port
    )

    def both_targets_up() -> bool:
        result = _get(f"{prometheus}/api/v1/query?query=up")["data"]["result"]
        return sorted((r["metric"]["job"], r["value"][1]) for r in result) == [
            ("captchatask-operator", "1"),
            ("captchatask-receiver", "1"),
        ]

    _wait_for("both targets up", both_targets_up, deadline=STARTUP_DEADLINE_SECONDS,
              logs=processes.logs)  # fmt: skip

    # Before any dead letter: the rules have been evaluated and the alert is inactive.
    _wait_for(
        "a rule evaluation",
        lambda: _alert_state(prometheus, DLQ_ALERT)[1] == 1,
        deadline=STARTUP_DEADLINE_SECONDS,
        logs=processes.logs,
    )
    # With `for:` shortened to seconds, Prometheus's first evaluations (before the first scrape)
    # can briefly see the targets as absent; once both are scraped the "down" alerts resolve.
    for down in ("CaptchataskOperatorDown", "CaptchataskReceiverDown"):
        _wait_for(
            f"{down} inactive",
            functools.partial(_alert_is, prometheus, down, "inactive"),
            deadline=STARTUP_DEADLINE_SECONDS,
            logs=processes.logs,
        )
    assert _alert_state(prometheus, DLQ_ALERT)[0] == "inactive"

    # Authentic pingbacks for tasks that do not exist: each becomes a dead letter.
    signer = PingbackSigner([key.encode()])
    states: list[str] = []
    sent = 0
    end = time.monotonic() + ALERT_DEADLINE_SECONDS
    while time.monotonic() < end:
        if sent < MAX_DEAD_LETTERS:
            ref = TaskRef(namespace=namespace, name=f"gone-{sent}", uid=str(uuid.uuid4()))
            query = urllib.parse.urlencode({"id": str(7000 + sent), "code": f"TOKEN-{sent}"})
            url = f"http://127.0.0.1:{rx_pingback}{signer.path(ref)}?{query}"
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200
            sent += 1
        state, _ = _alert_state(prometheus, DLQ_ALERT)
        if not states or states[-1] != state:
            states.append(state)
        if state == "firing":
            break
        time.sleep(0.5)

    letters = control_plane.kubectl(
        "get", "captchadeadletters", "-n", namespace, "-o", "name"
    ).stdout.split()
    assert letters, "the sidecar wrote dead letters"
    gauge = _get(f"{prometheus}/api/v1/query?query=captchatask_dead_letters")["data"]["result"]
    assert states[-1] == "firing", (
        f"states seen: {states}; {len(letters)} dead letters in the cluster; "
        f"captchatask_dead_letters as scraped from the operator: {gauge}; "
        f"logs in {processes.directory}"
    )
    assert states[0] == "inactive"
    alerts = _get(f"{prometheus}/api/v1/alerts")["data"]["alerts"]
    (firing,) = [a for a in alerts if a["labels"]["alertname"] == DLQ_ALERT]
    assert firing["labels"]["severity"] == "warning"
    assert firing["annotations"]["runbook_url"].endswith("/runbooks/captchataskdeadlettersgrowing/")


# -- two teams, one operator ------------------------------------------------------------------

PROVIDER_ALERT = "CaptchataskProviderNotReady"
#: Where the "pods" run: Prometheus gives their series this target namespace, as a
#: ServiceMonitor would, so the test proves the objects' namespace survives it.
POD_NAMESPACE = "captchatask-system"


def _provider(namespace: str, base_url: str) -> str:
    return f"""apiVersion: v1
kind: Secret
metadata: {{name: solver, namespace: {namespace}}}
stringData: {{apiKey: {EMULATOR_KEY}}}
---
apiVersion: captchatask.dev/v1alpha1
kind: CaptchaProvider
metadata: {{name: default, namespace: {namespace}}}
spec:
  dialect: captchaai
  baseURL: {base_url}
  apiKeySecretRef: {{name: solver}}
"""


EMULATOR_KEY = "emulatorkey0123456789abcdef01234"


def _query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    encoded = urllib.parse.urlencode({"query": expr})
    result: list[dict[str, Any]] = _get(f"{prometheus}/api/v1/query?{encoded}")["data"]["result"]
    return result


def test_two_teams_same_named_providers_alert_and_chart_by_their_own_namespace(
    control_plane: testbed.ControlPlane,
    namespace: str,
    rules_file: Path,
    repo_root: Path,
    tmp_path: Path,
    processes: Processes,
) -> None:
    """Team A's provider ``default`` is healthy, team B's ``default`` is unreachable.

    One operator serves both namespaces and runs "in" a third (the target's namespace label).
    The alert must name team B and ``default``, never team A nor the operator's namespace, and
    the dashboard's per-namespace queries must return one series per team.
    """
    prometheus_bin = binary("prometheus")
    team_a, team_b = namespace, f"{namespace}-b"
    control_plane.kubectl("create", "namespace", team_b)
    key_file = tmp_path / "hmacKey"
    key_file.write_text(secrets.token_urlsafe(36)[:48] + "\n")
    op_admin, rx_pingback, rx_admin, prom_port, emu_port, closed = testbed.free_ports(6)
    base_env = control_plane.env()
    base_env["CAPTCHATASK_PINGBACK_KEY_FILE"] = str(key_file)
    processes.start(
        "emulator",
        [sys.executable, "-m", "captchatask", "emulator", "--port", str(emu_port),
         "--key", EMULATOR_KEY],
        base_env,
    )  # fmt: skip
    operator_env = dict(
        base_env, CAPTCHATASK_ADMIN_HOST="127.0.0.1", CAPTCHATASK_ADMIN_PORT=str(op_admin)
    )
    processes.start(
        "operator",
        [sys.executable, "-m", "captchatask", "operator", "--namespace", team_a,
         "--namespace", team_b, "--standalone"],
        operator_env,
    )  # fmt: skip
    spool = tmp_path / "spool"
    spool.mkdir()
    processes.start(
        "sidecar",
        [sys.executable, "-m", "captchatask", "sidecar"],
        dict(
            base_env,
            CAPTCHATASK_PINGBACK_ADDR=f"127.0.0.1:{rx_pingback}",
            CAPTCHATASK_ADMIN_ADDR=f"127.0.0.1:{rx_admin}",
            CAPTCHATASK_LOCAL_ADDR="",
            CAPTCHATASK_NAMESPACE=team_a,
            CAPTCHATASK_PINGBACK_NAMESPACES=f"{team_a},{team_b}",
            CAPTCHATASK_SPOOL_DIR=str(spool),
            CAPTCHATASK_POD_NAME="e2e-receiver",
        ),
    )
    for port in (op_admin, rx_admin):
        _wait_for(
            f"/readyz on {port}",
            functools.partial(_http_ok, f"http://127.0.0.1:{port}/readyz"),
            deadline=STARTUP_DEADLINE_SECONDS,
            logs=processes.logs,
        )
    control_plane.kubectl(
        "apply", "-f", "-", input=_provider(team_a, f"http://127.0.0.1:{emu_port}")
    )
    control_plane.kubectl("apply", "-f", "-", input=_provider(team_b, f"http://127.0.0.1:{closed}"))

    prometheus = _start_prometheus(
        processes,
        prometheus_bin,
        tmp_path,
        rules_file,
        op_admin,
        rx_admin,
        prom_port,
        target_labels={"namespace": POD_NAMESPACE},
    )

    def readiness() -> dict[tuple[str, str], str]:
        result = _query(prometheus, "captchatask_provider_ready")
        return {(r["metric"]["namespace"], r["metric"]["provider"]): r["value"][1] for r in result}

    # Two series for two same-named providers, each under its team's namespace.
    _wait_for(
        "team A Ready and team B not",
        lambda: readiness() == {(team_a, "default"): "1", (team_b, "default"): "0"},
        deadline=ALERT_DEADLINE_SECONDS,
        logs=processes.logs,
    )

    def firing() -> list[dict[str, str]]:
        alerts = _get(f"{prometheus}/api/v1/alerts")["data"]["alerts"]
        return [
            a["labels"]
            for a in alerts
            if a["labels"]["alertname"] == PROVIDER_ALERT and a["state"] == "firing"
        ]

    _wait_for("the provider alert", lambda: bool(firing()), deadline=ALERT_DEADLINE_SECONDS,
              logs=processes.logs)  # fmt: skip
    (alert,) = firing()
    assert (alert["namespace"], alert["provider"]) == (team_b, "default")
    assert alert["severity"] == "critical"
    # A series about the process itself keeps the pod's namespace from the target.
    (active,) = _query(prometheus, "captchatask_operator_active")
    assert (active["metric"]["namespace"], active["value"][1]) == (POD_NAMESPACE, "1")
    (version,) = _query(prometheus, 'captchatask_build_info{job="captchatask-operator"}')
    assert version["metric"]["namespace"] == POD_NAMESPACE

    # The dashboard's queries, as Grafana sends them with "All" namespaces and providers: the
    # per-namespace panels return one series per team.
    dashboard = json.loads(
        (repo_root / "charts/captchatask/files/dashboards/captchatask.json").read_text()
    )
    queries = {
        panel["title"]: target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    }
    variables = {"$__rate_interval": "1m", "$namespace": ".*", "$provider": ".*"}

    def run(title: str) -> list[dict[str, Any]]:
        expr = queries[title]
        for variable, value in variables.items():
            expr = expr.replace(variable, value)
        return _query(prometheus, expr)

    by_namespace = {
        (r["metric"]["namespace"], r["metric"]["provider"]): r["value"][1]
        for r in run("Provider readiness by namespace")
    }
    assert by_namespace == {(team_a, "default"): "1", (team_b, "default"): "0"}
    in_flight = {r["metric"]["namespace"] for r in run("Tasks in flight by namespace")}
    assert in_flight == {team_a, team_b}
    (not_ready,) = run("Providers not ready")
    assert not_ready["value"][1] == "1"
    control_plane.kubectl("delete", "namespace", team_b, "--wait=false", check=False)
