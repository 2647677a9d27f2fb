"""The images hack/build-images.sh builds really run: operator, sidecar (no kopf) and emulator.

The images are built through the script itself (its cache keyed by the inputs makes a repeat run
take a second) and each OCI archive is loaded into a podman store of this module's own, the way a
node imports it. Every container runs with no network (the emulator's HTTP check uses the host's
loopback only), a read-only root filesystem and the image's own user, as the chart runs them. A
missing builder or runtime fails with the script's message naming the Debian packages; never a
skip: an image nobody ran is exactly what this test exists to catch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from captchatask.version import __version__

# A cold build (Debian base, wheels, three images) takes a few minutes on two cores.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO: Final = Path(__file__).resolve().parents[2]
SCRIPT: Final = REPO / "hack" / "build-images.sh"
TARGETS: Final = ("operator", "sidecar", "emulator")
NONROOT: Final = "65532"
#: How long one short command in a container may take (the first run of an image mounts it).
RUN_TIMEOUT: Final = 120.0
#: The root user on these machines lacks CAP_SYS_RESOURCE, so podman's default of raising the
#: open-file and process limits is refused by the kernel; ask for limits below the current ones.
ULIMITS: Final = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096")
LISTENING: Final = re.compile(r"listening on http://([0-9.]+):(\d+)")


@dataclass(frozen=True)
class BuiltImage:
    """One line of the script's output: the image's name and its OCI archive."""

    name: str
    archive: Path


class Podman:
    """podman on a store of its own (under a temporary directory), with this machine's settings.

    runc rather than crun (crun refuses the hybrid cgroup v1 hierarchy here), the cgroupfs
    manager (no systemd) and no event log.
    """

    def __init__(self, state: Path) -> None:
        self.state = state
        self.base = [
            "podman",
            "--root",
            str(state / "root"),
            "--runroot",
            str(state / "runroot"),
            "--tmpdir",
            str(state / "tmp"),
            "--storage-driver",
            "overlay",
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "none",
        ]

    def __call__(
        self, *args: str, check: bool = True, timeout: float = RUN_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run one podman command and return its result (stdout and stderr captured)."""
        result = subprocess.run(
            [*self.base, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr}",
                pytrace=False,
            )
        return result

    def run(
        self, image: BuiltImage, *args: str, entrypoint: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a container of ``image`` to completion: no network, read-only root filesystem."""
        options = ["run", "--rm", "--network", "none", "--read-only", *ULIMITS]
        if entrypoint is not None:
            options += ["--entrypoint", entrypoint]
        return self(*options, image.name, *args, check=check)

    def inspect(self, image: BuiltImage) -> dict[str, Any]:
        """The image's configuration as podman reports it."""
        config: dict[str, Any] = json.loads(self("image", "inspect", image.name).stdout)[0]
        return config


@pytest.fixture(scope="module")
def built() -> dict[str, BuiltImage]:
    """Build (or take from the cache) the three images; fail with the script's own message."""
    try:
        result = subprocess.run(
            [str(SCRIPT)], capture_output=True, text=True, timeout=1500, check=False, env=os.environ
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hack/build-images.sh did not finish in {exc.timeout}s", pytrace=False)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        pytest.fail(
            f"hack/build-images.sh exited {result.returncode}; the images were not built:\n{tail}",
            pytrace=False,
        )
    images: dict[str, BuiltImage] = {}
    for line in result.stdout.splitlines():
        name, archive = line.split(" ", 1)
        target = name.rsplit("/", 1)[-1].split(":", 1)[0].removeprefix("captchatask-")
        images[target] = BuiltImage(name, Path(archive))
    assert sorted(images) == sorted(TARGETS), result.stdout
    return images


@pytest.fixture(scope="module")
def podman(
    built: dict[str, BuiltImage], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Podman]:
    """A podman store holding exactly the three archives, loaded as a node would import them."""
    if shutil.which("podman") is None:
        pytest.fail(
            "podman is not installed: install the Debian package podman "
            "(hack/build-images.sh does so when run as root)",
            pytrace=False,
        )
    engine = Podman(tmp_path_factory.mktemp("podman"))
    try:
        for image in built.values():
            engine("load", "--quiet", "--input", str(image.archive), timeout=600)
        yield engine
    finally:
        # Removing the containers and images lets the store unmount its overlay layers.
        engine("rm", "--all", "--force", check=False)
        engine("rmi", "--all", "--force", check=False)
        shutil.rmtree(engine.state, ignore_errors=True)


def test_the_names_are_fully_qualified_and_the_charts_repositories(
    built: dict[str, BuiltImage],
) -> None:
    values = yaml.safe_load((REPO / "charts" / "captchatask" / "values.yaml").read_text())
    repository = {
        "operator": values["operator"]["image"]["repository"],
        "sidecar": values["receiver"]["image"]["repository"],
    }
    assert values["sidecar"]["image"]["repository"] == repository["sidecar"]
    for target, image in built.items():
        repo, _, tag = image.name.rpartition(":")
        assert repo.split("/", 1)[0] == "ghcr.io", "containerd would prefix a short name"
        assert tag
        if target in repository:
            assert repo == repository[target]
        assert image.archive.is_file()
        index = _archive_index(image.archive)
        refs = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
        assert refs == [image.name], "ctr images import names the image from this annotation"


@pytest.mark.parametrize("target", TARGETS)
def test_each_image_runs_as_nonroot_with_its_labels_and_entrypoint(
    podman: Podman, built: dict[str, BuiltImage], target: str
) -> None:
    image = built[target]
    config = podman.inspect(image)

    assert config["Config"]["User"] == f"{NONROOT}:{NONROOT}"
    assert config["Config"]["Entrypoint"] == ["captchatask"]
    labels = config["Config"]["Labels"]
    assert labels["org.opencontainers.image.title"] == f"captchatask-{target}"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.source"] == "https://github.com/captchatask/captchatask"
    assert podman.run(image, "-u", entrypoint="id").stdout.strip() == NONROOT
    assert podman.run(image, "--version").stdout.strip() == f"captchatask {__version__}"
    # Bytecode is compiled at build time: a read-only root filesystem costs no start-up time.
    compiled = podman.run(
        image,
        "-c",
        "import importlib.util, os, captchatask.cli as m;"
        "print(os.path.exists(importlib.util.cache_from_source(m.__file__)))",
        entrypoint="python",
    )
    assert compiled.stdout.strip() == "True"


def test_the_operator_image_has_kopf_and_its_command(
    podman: Podman, built: dict[str, BuiltImage]
) -> None:
    image = built["operator"]

    command = podman.inspect(image)["Config"]["Cmd"]
    assert command == ["operator", "--all-namespaces", "--standalone"]
    helped = podman.run(image, "operator", "--help")
    assert "--all-namespaces" in helped.stdout
    imported = podman.run(
        image, "-c", "import kopf, captchatask_operator; print(kopf.__name__)", entrypoint="python"
    )
    assert imported.stdout.strip() == "kopf"


def test_the_sidecar_image_has_no_kopf(podman: Podman, built: dict[str, BuiltImage]) -> None:
    image = built["sidecar"]

    assert podman.inspect(image)["Config"]["Cmd"] == ["sidecar"]
    assert "usage" in podman.run(image, "sidecar", "--help").stdout
    probe = podman.run(
        image,
        "-c",
        "import importlib.util, captchatask_sidecar;"
        "print(importlib.util.find_spec('kopf') is None)",
        entrypoint="python",
    )
    assert probe.stdout.strip() == "True", "kopf must not be installed in the sidecar image"
    owner = podman.run(image, "-c", "%u:%g", "/var/spool/captchatask", entrypoint="stat")
    assert owner.stdout.strip() == f"{NONROOT}:{NONROOT}"


def test_the_emulator_image_serves_on_all_interfaces_by_default(
    podman: Podman, built: dict[str, BuiltImage]
) -> None:
    image = built["emulator"]

    with _Serving(podman, image, network="none") as (host, port):
        # All interfaces: in a pod the emulator is reached through its Service.
        assert (host, port) == ("0.0.0.0", 8089)


def test_the_emulator_image_answers_http(podman: Podman, built: dict[str, BuiltImage]) -> None:
    image = built["emulator"]

    # The host's network namespace, bound to loopback only: the test reaches it and nothing else.
    command = ("emulator", "--host", "127.0.0.1", "--port", "0")
    with _Serving(podman, image, network="host", command=command) as (host, port):
        summary = _get_json(f"http://{host}:{port}/_emulator/summary")
    assert summary["totals"] == {}
    assert summary["balance"] > 0


class _Serving:
    """A long-running emulator container: entering gives where it listens, leaving stops it."""

    def __init__(
        self, podman: Podman, image: BuiltImage, *, network: str, command: tuple[str, ...] = ()
    ) -> None:
        self.podman = podman
        self.name = f"captchatask-image-test-{os.getpid()}"
        self.command = [*podman.base, "run", "--rm", "--name", self.name, "--read-only"]
        self.command += [*ULIMITS, "--network", network, image.name, *command]
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> tuple[str, int]:
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        lines: list[str] = []
        found: list[tuple[str, int]] = []

        def read() -> None:
            assert self.process is not None
            assert self.process.stdout is not None
            for line in self.process.stdout:
                lines.append(line)
                if match := LISTENING.search(line):
                    found.append((match.group(1), int(match.group(2))))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(RUN_TIMEOUT)
        if not found:
            self.__exit__()
            pytest.fail(f"the emulator never said it was listening:\n{''.join(lines)}")
        return found[0]

    def __exit__(self, *exc: object) -> None:
        self.podman("stop", "--time", "10", self.name, check=False)
        if self.process is not None:
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            if self.process.stdout is not None:
                self.process.stdout.close()
        self.podman("rm", "--force", self.name, check=False)


def _get_json(url: str) -> Any:
    """GET ``url`` and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=30) as reply:
        return json.loads(reply.read())


def _archive_index(archive: Path) -> dict[str, Any]:
    """The ``index.json`` of an OCI archive, read with tar (no unpacking)."""
    out = subprocess.run(
        ["tar", "-xOf", str(archive), "index.json"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    index: dict[str, Any] = json.loads(out)
    return index
