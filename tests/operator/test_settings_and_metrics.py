"""Settings (env then flags), metrics pre-creation, Events bodies, and the package layout."""

from __future__ import annotations

import datetime as dt
import pwd
import socket
from pathlib import Path
from typing import Any

import kopf
import pytest
from prometheus_client import CollectorRegistry

from captchatask import testbed
from captchatask.events import EventType, ObjectRef, build_event
from captchatask.model import TaskRef
from captchatask_operator import cli
from captchatask_operator import settings as settings_module
from captchatask_operator.engine import Engine
from captchatask_operator.handlers import (
    WORKER_IDLE_TIMEOUT,
    WORKER_LIMIT,
    Runtime,
    build_registry,
    configure_kopf,
)
from captchatask_operator.metrics import Metrics


def test_flags_override_the_environment() -> None:
    env = {"CAPTCHATASK_NAMESPACES": "a,b", "CAPTCHATASK_ADMIN_PORT": "9999"}

    from_env = settings_module.parse([], env)
    from_flags = settings_module.parse(["--namespace", "c", "--admin-port", "1234"], env)

    assert (from_env.namespaces, from_env.admin_port) == (("a", "b"), 9999)
    assert (from_flags.namespaces, from_flags.admin_port) == (("c",), 1234)


def test_every_setting_has_a_flag_and_an_environment_variable() -> None:
    fields = set(settings_module.Settings.__dataclass_fields__)
    assert {name for name in fields if settings_module.env_name(name)} == fields


def test_a_scope_is_required_and_scopes_exclude_each_other() -> None:
    with pytest.raises(SystemExit):
        settings_module.parse([], {})
    with pytest.raises(SystemExit):
        settings_module.parse(["--namespace", "a", "--all-namespaces"], {})
    with pytest.raises(SystemExit):
        settings_module.parse(["-A", "--peering", "p", "--standalone"], {})


def test_peering_is_opt_in_and_priorities_default_to_distinct_random_values() -> None:
    plain = settings_module.parse(["-A"], {})
    peered = settings_module.parse(["-A", "--peering", "captchatask"], {})

    assert not plain.peering_enabled
    assert peered.peering_enabled
    priorities = {settings_module.parse(["-A"], {}).peering_priority for _ in range(20)}
    assert len(priorities) > 1


def test_settings_are_frozen() -> None:
    settings = settings_module.parse(["-A"], {"CAPTCHATASK_EVENTS": "false"})
    assert settings.events is False
    with pytest.raises(AttributeError):
        settings.events = True  # type: ignore[misc]


def test_provider_series_are_pre_created_at_zero() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)

    metrics.ensure_provider("shop", "default")

    sample = registry.get_sample_value
    of = {"namespace": "shop", "provider": "default"}
    assert sample("captchatask_tasks", {**of, "phase": "Queued"}) == 0
    assert sample("captchatask_submissions_total", {**of, "outcome": "submitted"}) == 0
    assert sample("captchatask_fallback_recoveries_total", of) == 0
    assert sample("captchatask_permanent_failures_total", {**of, "code": "DeadlineExceeded"}) == 0
    assert (
        sample("captchatask_provider_requests_total", {**of, "endpoint": "get", "outcome": "ok"})
        == 0
    )
    assert sample("captchatask_provider_ready", of) == 0
    assert sample("captchatask_dead_letters", {"namespace": "shop", "reason": "Redriven",
                                               "phase": "Pending"}) == 0  # fmt: skip


def test_same_named_providers_of_two_namespaces_are_two_series() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.ensure_provider("team-a", "default")
    metrics.ensure_provider("team-b", "default")
    metrics.provider_ready.labels("team-a", "default").set(1)
    metrics.set_task_counts({("team-b", "default", "Submitted"): 4})

    sample = registry.get_sample_value
    ready = "captchatask_provider_ready"
    assert sample(ready, {"namespace": "team-a", "provider": "default"}) == 1
    assert sample(ready, {"namespace": "team-b", "provider": "default"}) == 0
    tasks = {"provider": "default", "phase": "Submitted"}
    assert sample("captchatask_tasks", {**tasks, "namespace": "team-a"}) == 0
    assert sample("captchatask_tasks", {**tasks, "namespace": "team-b"}) == 4


def test_build_info_and_the_active_gauge_describe_the_replica() -> None:
    from captchatask.version import __version__  # noqa: PLC0415

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    assert registry.get_sample_value("captchatask_build_info", {"version": __version__}) == 1
    assert registry.get_sample_value("captchatask_operator_active") == 0
    metrics.active.set(1)
    assert registry.get_sample_value("captchatask_operator_active") == 1


def test_task_counts_reset_phases_that_emptied() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.set_task_counts({("ns", "p", "Submitted"): 3})
    metrics.set_task_counts({("ns", "p", "Solved"): 3})

    sample = registry.get_sample_value
    assert (
        sample("captchatask_tasks", {"namespace": "ns", "provider": "p", "phase": "Submitted"}) == 0
    )
    assert sample("captchatask_tasks", {"namespace": "ns", "provider": "p", "phase": "Solved"}) == 3


def test_unknown_failure_codes_share_one_label() -> None:
    from captchatask_operator.metrics import failure_label  # noqa: PLC0415

    assert failure_label("ERROR_CAPTCHA_UNSOLVABLE") == "ERROR_CAPTCHA_UNSOLVABLE"
    assert failure_label("something new 123") == "other"


def test_event_bodies_point_at_the_task_instance() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    ref = TaskRef("ns", "t", "0f0e0d0c-0b0a-4909-8807-060504030201")

    body = build_event(
        involved=ObjectRef.task(ref),
        type_=EventType.WARNING,
        reason="Failed",
        message="x" * 5000,
        component="captchatask-operator",
        instance="pod-1",
        now=now,
    )

    assert body["involvedObject"]["uid"] == ref.uid
    assert body["involvedObject"]["kind"] == "CaptchaTask"
    assert body["metadata"]["name"].startswith("t.")
    assert (body["type"], body["reason"]) == ("Warning", "Failed")
    assert len(body["message"]) == 1024


def test_the_operator_source_root_is_not_a_package(repo_root: Path) -> None:
    assert not (repo_root / "operator" / "__init__.py").exists()
    assert (repo_root / "operator" / "captchatask_operator" / "peering-crd.yaml").exists()


def test_the_peering_identity_never_needs_a_passwd_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    # The chart runs the operator as uid 65532, which the image need not know: kopf's default
    # identity (getpass.getuser) raised KeyError there and the operator crashed in every pod.
    def no_entry(uid: int) -> Any:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    for variable in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(variable, raising=False)

    assert cli.peering_identity({"CAPTCHATASK_POD_NAME": "op-1"}) == "op-1"
    first, second = cli.peering_identity({}), cli.peering_identity({})
    assert first != second
    assert first.startswith(socket.gethostname())


def test_the_leader_daemon_puts_no_finalizer_on_the_peering_object() -> None:
    # kopf finalizes every daemon's object by default. On the chart's peering object that made
    # `helm uninstall` hang for ever: the operator pods went with it, so nobody removed it.
    settings = settings_module.parse(["--all-namespaces", "--peering", "captchatask"], {})
    runtime = Runtime(settings, registry=CollectorRegistry(), signer=None)

    registry = build_registry(runtime)

    daemons = {str(h.id): h for h in registry._spawning.get_all_handlers()}
    assert daemons["leader"].requires_finalizer is False


def test_kopf_is_configured_without_deprecated_settings() -> None:
    """kopf warns about settings it ignores (time-based event batching was removed in 1.4x).

    A deprecated setting does nothing but pretend to tune the operator; the suite turns warnings
    into errors, so configuring kopf here fails on any setting kopf has deprecated.
    """
    kopf_settings = kopf.OperatorSettings()
    configure_kopf(kopf_settings, settings_module.parse(["--namespace", "ns"], {}))
    assert kopf_settings.queueing.worker_limit == WORKER_LIMIT
    assert kopf_settings.queueing.idle_timeout == WORKER_IDLE_TIMEOUT


async def test_a_startup_that_failed_releases_what_it_took_so_a_retry_can_start(
    control_plane: testbed.ControlPlane, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kopf retries a failed startup handler; the retry must find the admin port free.

    ``Runtime.start`` connects, binds the admin port and (without peering) activates the engine.
    An unexpected error in the activation left the port bound and the sessions open, so every
    retry failed to bind ("address already in use") and the operator never started.
    """
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    [port] = testbed.free_ports(1)
    settings = settings_module.parse(
        ["--namespace", namespace, "--admin-host", "127.0.0.1", "--admin-port", str(port)], {}
    )
    rebuild = Engine._rebuild
    failures = 0

    async def rebuild_once_failing(engine: Engine) -> None:
        nonlocal failures
        if not failures:
            failures += 1
            raise RuntimeError("a bug in the initial listing")
        await rebuild(engine)

    monkeypatch.setattr(Engine, "_rebuild", rebuild_once_failing)
    runtime = Runtime(settings, registry=CollectorRegistry(), signer=None)
    with pytest.raises(RuntimeError, match="initial listing"):
        await runtime.start()
    try:
        await runtime.start()  # as kopf retries it
        assert runtime.started
        assert runtime.admin_port == port
        assert runtime.require_engine().active
    finally:
        await runtime.stop()
