"""Rounds of the "API server at its limit" rows, and the median they are judged by.

Why: the ledger's target is a ratio of two closed-loop rates taken seconds apart, and on a
shared machine the API server's speed drifts (the raw ceiling read 234-333 patches/s within one
day, here). One round can land in a slow phase for its overload and a fast one for its probe. So
every round probes and overloads on tasks of its own, each round's ratio is to its own probes,
and the verdicts take the median across rounds; the tables show the round whose ledger ratio is
that median, with every round's figures beside it.

Pure: a round is the dict :func:`bench.ingest.at_the_limit` records (``raw_ceiling``,
``raw_ceiling_at_drain_depth``, ``overload``).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class RoundFigures:
    """What the targets read from one round."""

    ceiling: float
    """Patches/s of the 64-deep raw probe."""
    at_drain_depth: float | None
    """Patches/s of the probe at the drainer's depth (None: a round recorded before it existed)."""
    ledger: float
    """Results/s the overload put into the ledger."""
    p99_ms: float
    http_5xx: int

    @property
    def ratio(self) -> float:
        """Ledger rate over this round's own raw ceiling."""
        return self.ledger / self.ceiling

    @property
    def ratio_at_drain_depth(self) -> float | None:
        """Ledger rate over this round's probe at the drainer's depth."""
        return None if not self.at_drain_depth else self.ledger / self.at_drain_depth


def figures(round_: dict[str, Any]) -> RoundFigures:
    """One round's figures."""
    shallow = round_.get("raw_ceiling_at_drain_depth")
    over = round_["overload"]
    return RoundFigures(
        ceiling=round_["raw_ceiling"]["patches_per_second"],
        at_drain_depth=shallow["patches_per_second"] if shallow else None,
        ledger=over["ledger_per_second"],
        p99_ms=over["p99_ms"],
        http_5xx=over["http_5xx"],
    )


def of(ours: dict[str, Any]) -> list[dict[str, Any]]:
    """The rounds of an ingestion result (a result of one round keeps them at its top level)."""
    if ours.get("limit_rounds"):
        return list(ours["limit_rounds"])
    if ours.get("raw_ceiling") and ours.get("overload"):
        return [ours]
    return []


def median_index(rounds: Sequence[dict[str, Any]]) -> int:
    """The round whose ledger ratio is the median (the lower middle of an even count)."""
    if not rounds:
        raise ValueError("no rounds")
    order = sorted(range(len(rounds)), key=lambda i: figures(rounds[i]).ratio)
    return order[(len(order) - 1) // 2]


@dataclass(frozen=True, slots=True)
class Summary:
    """The median across rounds of each figure a target reads, and every round's value."""

    rounds: tuple[RoundFigures, ...]

    @property
    def ratio(self) -> float:
        return statistics.median(r.ratio for r in self.rounds)

    @property
    def p99_ms(self) -> float:
        return statistics.median(r.p99_ms for r in self.rounds)

    @property
    def http_5xx(self) -> int:
        """Every round's 5xx together: one 5xx in any round misses "no 5xx"."""
        return sum(r.http_5xx for r in self.rounds)

    @property
    def ledger(self) -> float:
        return statistics.median(r.ledger for r in self.rounds)

    @property
    def ceiling(self) -> float:
        return statistics.median(r.ceiling for r in self.rounds)


def summary(ours: dict[str, Any]) -> Summary | None:
    """The medians of an ingestion result's rounds (None if it has none)."""
    rounds = of(ours)
    return Summary(tuple(figures(r) for r in rounds)) if rounds else None
