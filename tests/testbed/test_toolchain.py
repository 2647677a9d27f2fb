"""Binary lookup and port selection, which need no running control plane."""

from __future__ import annotations

from pathlib import Path

import pytest

from captchatask import testbed


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
