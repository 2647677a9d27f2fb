"""RBAC is enforced: client-certificate users and ServiceAccount tokens get only what is bound."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from captchatask import testbed

#: RBAC changes reach the authorizer through an informer, a few milliseconds after the write.
RBAC_PROPAGATION_SECONDS = 10.0

# Bind a Role of our own, never the built-in `view`/`edit`/`admin`: those are aggregated
# ClusterRoles whose rules are filled in by kube-controller-manager, which does not run here,
# so on this control plane they grant nothing.


def _eventually(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + RBAC_PROPAGATION_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _can_list_pods(plane: testbed.ControlPlane, kubeconfig: Path, namespace: str) -> bool:
    result = plane.kubectl("get", "pods", "-n", namespace, kubeconfig=kubeconfig, check=False)
    return result.returncode == 0


def test_a_user_without_bindings_is_forbidden_and_allowed_after_a_rolebinding(
    control_plane: testbed.ControlPlane, kubectl: testbed.Kubectl, namespace: str
) -> None:
    alice = control_plane.user_kubeconfig("alice", ["team-a"])

    denied = control_plane.kubectl("get", "pods", "-n", namespace, kubeconfig=alice, check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr
    assert 'User "alice"' in denied.stderr

    kubectl("create", "role", "pod-reader", "--verb=get,list", "--resource=pods", "-n", namespace)
    kubectl(
        "create", "rolebinding", "alice-reads", "--role=pod-reader", "--user=alice", "-n", namespace
    )

    assert _eventually(lambda: _can_list_pods(control_plane, alice, namespace))


def test_client_certificate_groups_are_honoured_by_group_bindings(
    control_plane: testbed.ControlPlane, kubectl: testbed.Kubectl, namespace: str
) -> None:
    bob = control_plane.user_kubeconfig("bob", ["auditors"])
    whoami = json.loads(
        control_plane.kubectl("auth", "whoami", "--output=json", kubeconfig=bob).stdout
    )
    assert whoami["status"]["userInfo"]["username"] == "bob"
    assert "auditors" in whoami["status"]["userInfo"]["groups"]

    kubectl("create", "role", "pod-reader", "--verb=get,list", "--resource=pods", "-n", namespace)
    kubectl(
        "create",
        "rolebinding",
        "auditors-read",
        "--role=pod-reader",
        "--group=auditors",
        "-n",
        namespace,
    )

    assert _eventually(lambda: _can_list_pods(control_plane, bob, namespace))


def test_a_service_account_token_from_tokenrequest_authenticates(
    control_plane: testbed.ControlPlane, kubectl: testbed.Kubectl, namespace: str
) -> None:
    robot = control_plane.service_account_kubeconfig(namespace, "robot")

    whoami = json.loads(
        control_plane.kubectl("auth", "whoami", "--output=json", kubeconfig=robot).stdout
    )
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:robot"
    assert not _can_list_pods(control_plane, robot, namespace)

    kubectl("create", "role", "pod-reader", "--verb=get,list", "--resource=pods", "-n", namespace)
    kubectl(
        "create",
        "rolebinding",
        "robot-reads",
        "--role=pod-reader",
        f"--serviceaccount={namespace}:robot",
        "-n",
        namespace,
    )

    assert _eventually(lambda: _can_list_pods(control_plane, robot, namespace))


def test_kubectl_create_token_works_on_this_apiserver(
    kubectl: testbed.Kubectl, namespace: str
) -> None:
    kubectl("create", "serviceaccount", "helper", "-n", namespace)

    token = kubectl("create", "token", "helper", "-n", namespace).stdout.strip()

    assert token.count(".") == 2  # a JWT: header.payload.signature
