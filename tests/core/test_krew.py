"""The krew plugin manifest: current, well-formed, and its archive's shim runs the plugin."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import yaml

from captchatask.version import __version__


def _krew(repo_root: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("krew_tool", repo_root / "hack" / "krew.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_manifest_matches_the_shim_and_the_version(repo_root: Path) -> None:
    krew = _krew(repo_root)
    assert krew.main(["--check"]) == 0, "run: python hack/krew.py"
    manifest = yaml.safe_load((repo_root / "packaging/krew/captchatask.yaml").read_text())
    assert manifest["apiVersion"] == "krew.googlecontainertools.github.com/v1alpha2"
    assert manifest["kind"] == "Plugin"
    assert manifest["metadata"]["name"] == "captchatask"
    spec = manifest["spec"]
    assert spec["version"] == f"v{__version__}"
    for key in ("homepage", "shortDescription", "description"):
        assert spec[key]
    (platform,) = spec["platforms"]
    assert platform["bin"] == "kubectl-captchatask"
    assert platform["uri"].endswith(f"/v{__version__}/kubectl-captchatask-v{__version__}.tar.gz")
    assert platform["sha256"] == hashlib.sha256(krew.archive()).hexdigest()
    assert krew.archive() == krew.archive(), "the archive must be reproducible"


def _unpack(repo_root: Path, target: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(_krew(repo_root).archive())) as tar:
        tar.extractall(target, filter="data")
    shim = target / "kubectl-captchatask"
    assert os.access(shim, os.X_OK)
    return shim


def test_the_archived_shim_runs_the_plugin_with_the_given_python(
    repo_root: Path, tmp_path: Path
) -> None:
    shim = _unpack(repo_root, tmp_path)
    env = {"PATH": os.environ["PATH"], "CAPTCHATASK_PYTHON": sys.executable}
    result = subprocess.run(
        [str(shim), "dlq", "--help"], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: kubectl captchatask dlq ")


def test_the_archived_shim_says_how_to_install_the_package(repo_root: Path, tmp_path: Path) -> None:
    shim = _unpack(repo_root, tmp_path)
    env = {"PATH": os.environ["PATH"], "CAPTCHATASK_PYTHON": "false"}
    result = subprocess.run(
        [str(shim), "dlq", "list"], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 1
    assert "pipx install captchatask" in result.stderr
