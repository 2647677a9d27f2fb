"""pause/resume and stop/start of kube-apiserver, and a clean stop, on a control plane of their own.

These tests break the API server on purpose, so they use a private control plane instead of the
session one other tests share.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import pytest

from captchatask import testbed

pytestmark = pytest.mark.controlplane


def _alive(pid: int) -> bool:
    """A process is alive if /proc knows it and it is not a zombie awaiting its reaper."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in {"Z", "X"}


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[testbed.ControlPlane]:
    with testbed.ControlPlane(tmp_path_factory.mktemp("chaos")) as plane:
        yield plane


def test_a_paused_apiserver_does_not_answer_until_resumed(plane: testbed.ControlPlane) -> None:
    plane.pause()
    try:
        stalled = plane.kubectl("get", "--raw", "/readyz", "--request-timeout=1s", check=False)
    finally:
        plane.resume()

    assert stalled.returncode != 0
    assert plane.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"


def test_a_restarted_apiserver_answers_on_the_same_url_with_the_same_data(
    plane: testbed.ControlPlane,
) -> None:
    plane.kubectl("create", "configmap", "survivor", "--from-literal=k=v", "-n", "default")
    server = plane.server
    etcd_pid = plane.pids["etcd"]

    plane.stop_apiserver()
    refused = plane.kubectl("get", "--raw", "/readyz", check=False)
    assert refused.returncode != 0
    assert "refused" in refused.stderr
    assert _alive(etcd_pid)

    plane.start_apiserver()

    assert plane.server == server
    value = plane.kubectl(
        "get", "configmap", "survivor", "-n", "default", "--output=jsonpath={.data.k}"
    ).stdout
    assert value == "v"


def test_a_stop_with_a_short_grace_is_not_held_by_an_open_watch(
    plane: testbed.ControlPlane,
) -> None:
    # The chaos outages stop kube-apiserver while an operator's watches are open. An HTTP/1.1
    # watch (kopf's, aiohttp's) holds a graceful stop until the stop timeout (15 s) kills it, and
    # a planned 4 s outage lasted 19 s. With a short grace the requests in flight are still
    # answered (the graceful shutdown begins) and then the process is killed.
    log = plane.logs_dir / "kube-apiserver.log"
    before = log.stat().st_size
    pid = plane.pids["kube-apiserver"]
    watch = http.client.HTTPSConnection(
        plane.address,
        plane.apiserver_port,
        timeout=60,
        context=plane._tls_context(client_cert=True),  # the admin identity
    )
    try:
        watch.request("GET", "/api/v1/namespaces/default/configmaps?watch=true")
        assert watch.getresponse().status == 200
        plane.stop_apiserver(grace=1.0)
        refused = plane.kubectl("get", "--raw", "/readyz", check=False)
        shutdown = log.read_bytes()[before:].decode(errors="replace")
    finally:
        watch.close()
        plane.start_apiserver()

    assert refused.returncode != 0
    assert not _alive(pid)
    assert "Stopped listening" in shutdown
    assert plane.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"


def test_stop_leaves_no_process_behind_even_when_paused(tmp_path: Path) -> None:
    with testbed.ControlPlane(tmp_path) as plane:
        pids = plane.pids
        assert set(pids) == {"etcd", "kube-apiserver"}
        assert all(_alive(pid) for pid in pids.values())
        plane.pause()  # a stopped process must still be terminated

    assert not any(_alive(pid) for pid in pids.values())
