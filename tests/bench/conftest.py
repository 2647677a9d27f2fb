"""Fixtures of the benchmark tests.

``bench`` is a directory of the checkout, not an installed package: ``make test`` runs pytest
without the checkout on ``sys.path``, so its modules are imported from the repository root.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

BenchImport = Callable[[str], ModuleType]


@pytest.fixture
def bench_import(repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> BenchImport:
    """``bench_import("rounds")`` is ``bench.rounds``, imported from the checkout."""
    monkeypatch.syspath_prepend(str(repo_root))

    def load(name: str) -> ModuleType:
        return importlib.import_module(f"bench.{name}")

    return load
