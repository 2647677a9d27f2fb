"""Binary lookup and port selection, which need no running control plane."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from captchatask import testbed
from captchatask.testbed.node import MAX_SOCKET_PATH, SHORT_SOCKET_ROOT, Node, locate_node_toolchain
from captchatask.testbed.oci import ImageFile, write_oci_archive


def test_a_missing_binary_fails_loudly_and_names_make_testbin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(testbed.TESTBIN_ENV, str(tmp_path))

    with pytest.raises(testbed.MissingBinaryError) as raised:
        testbed.locate_toolchain()

    message = str(raised.value)
    assert "make testbin" in message
    assert "etcd" in message
    assert "kube-apiserver" in message
    assert str(tmp_path / "bin") in message


def test_starting_without_binaries_raises_instead_of_skipping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(testbed.TESTBIN_ENV, str(tmp_path / "empty"))

    with pytest.raises(testbed.MissingBinaryError, match="make testbin"):
        testbed.ControlPlane(tmp_path / "state").start()


def test_testbin_dir_points_at_its_bin_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in testbed.BINARIES:
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv(testbed.TESTBIN_ENV, str(tmp_path))

    toolchain = testbed.locate_toolchain()

    assert toolchain.bin_dir == bin_dir.resolve()
    assert toolchain.kube_apiserver == bin_dir / "kube-apiserver"


def test_free_ports_are_distinct_loopback_ports() -> None:
    ports = testbed.free_ports(5)

    assert len(set(ports)) == 5
    assert all(0 < port < 65536 for port in ports)


def test_pinned_versions_come_from_hack_versions_env(repo_root: Path) -> None:
    versions = testbed.pinned_versions(repo_root)

    assert versions["KUBERNETES_VERSION"].count(".") == 2
    assert versions["ETCD_VERSION"].startswith("3.6.")


def test_a_missing_node_binary_fails_loudly_and_names_the_build_command(tmp_path: Path) -> None:
    with pytest.raises(testbed.MissingBinaryError) as raised:
        locate_node_toolchain(tmp_path)

    message = str(raised.value)
    assert "hack/build-binaries.sh --node" in message
    for name in ("kubelet", "kube-controller-manager", "kube-scheduler", "kube-proxy", "pause"):
        assert name in message


def test_the_oci_archive_names_its_image_and_holds_the_file(tmp_path: Path) -> None:
    archive = write_oci_archive(
        tmp_path / "x.tar",
        name="localhost/x/y:1",
        files=[ImageFile("bin/hello", b"#!/bin/sh\n", 0o755)],
        entrypoint=["/bin/hello"],
    )
    with tarfile.open(archive) as tar:
        index = json.loads(_member(tar, "index.json"))
        (manifest_desc,) = index["manifests"]
        assert manifest_desc["annotations"]["io.containerd.image.name"] == "localhost/x/y:1"
        manifest = json.loads(_member(tar, "blobs/" + manifest_desc["digest"].replace(":", "/")))
        (layer_desc,) = manifest["layers"]
        layer = _member(tar, "blobs/" + layer_desc["digest"].replace(":", "/"))
    with tarfile.open(fileobj=io.BytesIO(layer)) as inner:
        member = inner.getmember("bin/hello")
        assert member.mode == 0o755
        assert _member(inner, "bin/hello") == b"#!/bin/sh\n"


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    extracted = tar.extractfile(name)
    assert extracted is not None
    return extracted.read()


def test_containerd_sockets_fit_its_limit_whatever_the_state_directory(tmp_path: Path) -> None:
    # A pytest temporary directory is deep enough to pass containerd's 104-byte socket limit
    # ("unix socket path too long"): the node then keeps its sockets in a short directory.
    shallow = Node(testbed.ControlPlane(tmp_path / "s"))
    deep = Node(testbed.ControlPlane(tmp_path / ("d" * 80)))
    other = Node(testbed.ControlPlane(tmp_path / ("e" * 80)))

    assert shallow.containerd_socket == shallow.root / "containerd" / "containerd.sock"
    for node in (deep, other):
        assert len(f"{node.containerd_socket}.ttrpc".encode()) <= MAX_SOCKET_PATH
        assert node.containerd_socket.parent.parent == SHORT_SOCKET_ROOT
    assert deep.containerd_socket != other.containerd_socket
