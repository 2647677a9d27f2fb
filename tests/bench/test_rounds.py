"""The limit rows' rounds: the median round, the verdicts on medians, and the rounds table.

``bench`` is a directory of the checkout, imported from the repository root.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.bench.conftest import BenchImport


@pytest.fixture
def rounds(bench_import: BenchImport) -> ModuleType:
    return bench_import("rounds")


@pytest.fixture
def report(bench_import: BenchImport) -> ModuleType:
    return bench_import("report")


def _round(ceiling: float, ledger: float, p99: float, http_5xx: int = 0) -> dict[str, Any]:
    return {
        "raw_ceiling": {"patches_per_second": ceiling},
        "raw_ceiling_at_drain_depth": {"patches_per_second": ceiling * 0.9},
        "overload": {
            "ledger_per_second": ledger,
            "p99_ms": p99,
            "http_5xx": http_5xx,
            "factor": 2.0,
            "rate_achieved": 2 * ceiling,
        },
    }


def _ours(rounds: ModuleType, *done: dict[str, Any]) -> dict[str, Any]:
    median: int = rounds.median_index(done)
    return done[median] | {"limit_rounds": list(done), "limit_median_round": median}


def _verdict(report: ModuleType, ours: dict[str, Any], start: str) -> Any:
    (found,) = [v for v in report.overload_verdicts(ours) if v.target.startswith(start)]
    return found


def test_the_median_round_is_the_one_with_the_middle_ledger_ratio(rounds: ModuleType) -> None:
    done = [_round(300, 240, 5.0), _round(250, 245, 6.0), _round(280, 266, 7.0)]
    # Ratios 0.80, 0.98, 0.95: the middle one is the third round's.
    assert rounds.median_index(done) == 2
    # An even count takes the lower middle.
    assert rounds.median_index(done[:2]) == 0


def test_the_verdicts_read_the_median_of_each_figure_not_one_round(
    rounds: ModuleType, report: ModuleType
) -> None:
    # One slow round (ratio 0.80, p99 17 ms) among two good ones: the median meets both targets.
    ours = _ours(rounds, _round(300, 240, 17.0), _round(250, 245, 6.0), _round(280, 266, 7.0))
    ledger = _verdict(report, ours, "results reach the ledger")
    assert ledger.met is True
    assert "median of 3 rounds' ratios 95%" in ledger.figure
    assert "rounds 80% (240/300) / 98% (245/250) / 95% (266/280)" in ledger.figure
    p99 = _verdict(report, ours, "pingback p99")
    assert p99.met is True
    assert "median p99 7.00 ms" in p99.figure
    # Two slow rounds out of three: the median misses.
    ours = _ours(rounds, _round(300, 240, 17.0), _round(300, 250, 12.0), _round(280, 266, 7.0))
    assert _verdict(report, ours, "results reach the ledger").met is False
    assert _verdict(report, ours, "pingback p99").met is False


def test_a_5xx_in_any_round_misses_no_5xx(rounds: ModuleType, report: ModuleType) -> None:
    ours = _ours(
        rounds, _round(300, 280, 5.0), _round(300, 280, 5.0, http_5xx=1), _round(300, 280, 5.0)
    )
    no_5xx = _verdict(report, ours, "no 5xx")
    assert no_5xx.met is False
    assert no_5xx.figure == "1 5xx across the 3 rounds"


def test_a_result_of_one_round_is_judged_as_before(rounds: ModuleType, report: ModuleType) -> None:
    one = _round(234, 199, 17.48)
    assert rounds.of(one) == [one]
    ledger = _verdict(report, one, "results reach the ledger")
    assert ledger.figure == "199 / 234 per s = 85%"
    assert ledger.met is False
    assert report.rounds_table(one) == ""


def test_the_rounds_table_lists_every_round_and_marks_the_median(
    rounds: ModuleType, report: ModuleType
) -> None:
    ours = _ours(rounds, _round(300, 240, 17.0), _round(250, 245, 6.0), _round(280, 266, 7.0))
    table = report.rounds_table(ours)
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(lines) == 4  # header and three rounds
    assert lines[3].startswith("| **3** (above: the median ledger ratio)")
    assert "| 80% |" in lines[1]
    assert "| **95%** |" in lines[3]


def test_no_rounds_is_an_error_not_a_silent_choice(rounds: ModuleType) -> None:
    with pytest.raises(ValueError, match="no rounds"):
        rounds.median_index([])
