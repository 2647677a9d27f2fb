"""The CustomResourceDefinitions, read from their single source ``charts/captchatask/crds/``.

In a checkout the files are read from the chart; in a built wheel they are shipped inside the
package (``captchatask/_crds``, see ``pyproject.toml``), so ``captchatask testbed up`` works from
an installed package too.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

_REPO_CRDS = Path(__file__).resolve().parents[2] / "charts" / "captchatask" / "crds"


def crd_files() -> list[Path]:
    """Return the CRD files, sorted by name."""
    if _REPO_CRDS.is_dir():
        return sorted(_REPO_CRDS.glob("*.yaml"))
    packaged = resources.files("captchatask") / "_crds"
    return sorted(Path(str(packaged)).glob("*.yaml"))


def crd_documents() -> list[dict[str, Any]]:
    """Return the CRDs as parsed objects."""
    docs: list[dict[str, Any]] = []
    for path in crd_files():
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc)
    return docs
