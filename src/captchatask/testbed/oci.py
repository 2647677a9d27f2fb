"""Write a single-layer OCI image archive from a few files, without a builder or a registry.

The test bed's node needs a pod sandbox ("pause") image, and none can be pulled on machines
without registry access. An OCI image is only a tar of blobs named by their digests plus three
small JSON documents, so it is written here directly and imported with ``ctr images import``.
Every timestamp is zero, so the same inputs always give the same image digest.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

__all__ = ["ImageFile", "go_architecture", "write_oci_archive"]

#: ``platform.machine()`` to the GOARCH names OCI platforms use.
_ARCHITECTURES: Final = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}

#: The annotation containerd's importer reads the full image name from.
CONTAINERD_IMAGE_NAME: Final = "io.containerd.image.name"
#: The standard annotation for the reference (the tag) of a manifest in an index.
OCI_REF_NAME: Final = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class ImageFile:
    """One regular file of the image: its path inside the image, content and mode."""

    path: str
    content: bytes
    mode: int = 0o644


def go_architecture() -> str:
    """Return this machine's architecture as OCI names it (``amd64``, ``arm64``)."""
    machine = platform.machine()
    return _ARCHITECTURES.get(machine, machine)


def _layer(files: Sequence[ImageFile]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for item in files:
            info = tarfile.TarInfo(item.path.lstrip("/"))
            info.size = len(item.content)
            info.mode = item.mode
            info.mtime = 0
            tar.addfile(info, io.BytesIO(item.content))
    return buffer.getvalue()


def _blob(tar: tarfile.TarFile, media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data), **extra}


def _json(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def write_oci_archive(
    target: Path, *, name: str, files: Sequence[ImageFile], entrypoint: Sequence[str]
) -> Path:
    """Write an OCI image archive holding ``files`` in one layer.

    Parameters
    ----------
    target
        The archive to write (a tar of an OCI image layout).
    name
        The fully qualified image name (``registry/path:tag``) the importer gives the image.
    files
        The files of the single layer.
    entrypoint
        The image's entrypoint.

    Returns
    -------
    Path
        ``target``.
    """
    layer = _layer(files)
    diff_id = f"sha256:{hashlib.sha256(layer).hexdigest()}"
    config = {
        "architecture": go_architecture(),
        "os": "linux",
        "config": {"Entrypoint": list(entrypoint)},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    tag = name.rpartition(":")[2]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(target, mode="w", format=tarfile.PAX_FORMAT) as tar:
        layer_desc = _blob(tar, "application/vnd.oci.image.layer.v1.tar", layer)
        config_desc = _blob(tar, "application/vnd.oci.image.config.v1+json", _json(config))
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc,
            "layers": [layer_desc],
        }
        manifest_desc = _blob(
            tar,
            "application/vnd.oci.image.manifest.v1+json",
            _json(manifest),
            annotations={CONTAINERD_IMAGE_NAME: name, OCI_REF_NAME: tag},
            platform={"architecture": go_architecture(), "os": "linux"},
        )
        for member, data in (
            ("oci-layout", _json({"imageLayoutVersion": "1.0.0"})),
            ("index.json", _json({"schemaVersion": 2, "manifests": [manifest_desc]})),
        ):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return target
