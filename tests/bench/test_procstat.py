"""The per-core busy shares both benchmark phases read from ``/proc/stat``.

``bench`` is a directory of the checkout, imported from the repository root.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.bench.conftest import BenchImport


@pytest.fixture
def procstat(bench_import: BenchImport) -> ModuleType:
    return bench_import("procstat")


def test_every_core_of_this_process_is_read_and_busy_is_part_of_total(
    procstat: ModuleType,
) -> None:
    ticks = procstat.core_ticks()
    assert set(os.sched_getaffinity(0)) <= set(ticks)
    for busy, total in ticks.values():
        assert 0 <= busy <= total


def test_busy_shares_are_per_core_deltas_and_skip_a_core_not_read_before(
    procstat: ModuleType,
) -> None:
    before = {0: (10, 100), 1: (50, 100)}
    after = {0: (60, 200), 1: (50, 300), 2: (5, 10)}
    assert procstat.busy_shares(before, after) == {0: 0.5, 1: 0.0}
