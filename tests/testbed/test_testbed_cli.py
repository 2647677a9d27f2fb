"""``captchatask testbed up|env|down`` as a user runs it: detached processes, idempotent up."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from captchatask import testbed

#: Seconds init may take to reap a stopped process (a zombie already counts as gone).
REAP_SECONDS = 10.0


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in {"Z", "X"}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "captchatask.testbed", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _printed_command(stderr: str) -> list[str]:
    """The `captchatask testbed ...` command a hint tells the user to run, as argv."""
    match = re.search(r"`(captchatask testbed [^`]+)`", stderr)
    assert match, stderr
    argv = shlex.split(match.group(1))
    return [str(Path(sys.executable).with_name("captchatask")), *argv[1:]]


def _run_as_printed(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a printed command from another directory, as a user in a new shell would."""
    cwd.mkdir(exist_ok=True)
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, cwd=cwd)


def _recorded_pids(state_dir: Path) -> dict[str, int]:
    state = json.loads((state_dir / testbed.STATE_FILE).read_text())
    return {"etcd": state["etcd"]["pid"], "kube-apiserver": state["apiserver"]["pid"]}


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    state_dir = tmp_path / "testbed"
    yield state_dir
    _cli("down", "--state-dir", str(state_dir))  # never leave a detached control plane behind


@pytest.mark.controlplane
def test_up_up_env_kubectl_down_leaves_no_process_behind(state_dir: Path, tmp_path: Path) -> None:
    where = ("--state-dir", str(state_dir))

    first = _cli("up", *where)
    assert first.returncode == 0, first.stderr
    assert f"export KUBECONFIG={state_dir / 'kubeconfig'}" in first.stdout
    pids = _recorded_pids(state_dir)
    assert all(_alive(pid) for pid in pids.values())

    second = _cli("up", *where)
    assert second.returncode == 0, second.stderr
    assert "already running" in second.stderr
    assert second.stdout == first.stdout
    assert _recorded_pids(state_dir) == pids

    env = _cli("env", *where)
    assert env.returncode == 0, env.stderr
    assert env.stdout == first.stdout

    # What a newcomer types right after `up` (or `eval "$(make -s cluster)"`, from a shell
    # whose PATH has neither kubectl nor the virtualenv): the pinned kubectl, the exported
    # kubeconfig, a fresh kubectl cache (HOME), the `captcha` category served by discovery, and
    # the `captchatask` command the hints name.
    script = (
        'set -e; eval "$1"; kubectl get namespaces --output=name; kubectl get captcha -A; '
        'captchatask testbed env --state-dir "$2" >/dev/null'
    )
    shell = subprocess.run(
        ["bash", "-c", script, "bash", env.stdout, str(state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert shell.returncode == 0, shell.stderr
    assert "namespace/default" in shell.stdout.splitlines()
    assert "No resources found" in shell.stderr

    # The hint `up` printed stops this test bed as printed, from any directory.
    down = _run_as_printed(_printed_command(first.stderr), tmp_path / "elsewhere")
    assert down.returncode == 0, down.stderr
    deadline = time.monotonic() + REAP_SECONDS
    while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids.values())
    assert not state_dir.exists()

    after = _cli("env", *where)
    assert after.returncode == 1
    assert "no running test bed" in after.stderr
    hint = _printed_command(after.stderr)
    assert hint[1:3] == ["testbed", "up"]
    assert Path(hint[hint.index("--state-dir") + 1]) == state_dir


def test_down_without_a_test_bed_is_a_no_op(tmp_path: Path) -> None:
    assert testbed.cli_main(["down", "--state-dir", str(tmp_path / "none")]) == 0


def test_up_refuses_to_take_over_a_directory_it_did_not_create(tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")

    assert testbed.cli_main(["up", "--state-dir", str(tmp_path)]) == 1
    assert precious.read_text() == "keep me"
