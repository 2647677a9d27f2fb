"""Guards on the source layout: operator/ and sidecar/ are source roots, never packages."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import captchatask_operator
import captchatask_sidecar

REPO = Path(__file__).resolve().parents[1]


def test_source_roots_hold_no_init_module() -> None:
    assert not (REPO / "operator" / "__init__.py").exists()
    assert not (REPO / "sidecar" / "__init__.py").exists()


def test_import_operator_is_the_standard_library_even_with_the_repo_root_first() -> None:
    # -S skips site, so nothing has pre-imported the stdlib module: the import below is decided
    # by sys.path alone, with the repository root (which holds operator/) searched first.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import operator; "
        "print(operator.__file__); print(operator.itemgetter)"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code, str(REPO)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout.splitlines()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(out[0]).resolve().parent == stdlib
    assert "itemgetter" in out[1]


def test_component_packages_import_from_their_source_roots() -> None:
    assert Path(captchatask_operator.__file__).resolve().parent.parent == REPO / "operator"
    assert Path(captchatask_sidecar.__file__).resolve().parent.parent == REPO / "sidecar"
