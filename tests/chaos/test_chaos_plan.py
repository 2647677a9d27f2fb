"""The chaos plan describes its provider outages as what they are: spans of time.

A ``res.php`` 502 burst used to be a number of requests. An operator that backs off (or holds
its answers through an API-server outage) then met the failures it had not spent long after the
outage should have ended: in a full 2captcha-dialect run a restarted operator sat behind 40 of
them for 90 s. The emulator now ends an outage by the clock, and the plan, the fault timeline and
the report say how long each one lasted. Pure: no stack is started.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture
def chaos(repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, ModuleType]:
    monkeypatch.syspath_prepend(str(repo_root))
    return {
        name: importlib.import_module(f"bench.chaos.{name}")
        for name in ("plan", "profiles", "report")
    }


@pytest.mark.parametrize("profile_name", ["smoke", "ci", "full"])
def test_every_res_php_502_burst_is_planned_as_an_outage_of_the_profiles_seconds(
    chaos: dict[str, ModuleType], profile_name: str
) -> None:
    profile = chaos["profiles"].PROFILES[profile_name]
    plan = chaos["plan"].make_plan(profile, 482114080)
    bursts = [f for f in plan.faults if f.kind is chaos["plan"].FaultKind.RES_502_BURST]
    assert len(bursts) == profile.res_502_bursts
    for burst in bursts:
        assert burst.amount == profile.res_502_burst_seconds
        assert burst.describe().endswith(f"res-502-burst for {profile.res_502_burst_seconds}s")


def test_the_report_says_how_long_the_502_outages_lasted(chaos: dict[str, ModuleType]) -> None:
    row = chaos["report"]._outages(
        {"res_php_html_502": 31, "res_php_502_outage_seconds": [8.0, 8.0, 8.0]}
    )
    assert row == "31 (every res.php request during 3 timed outages, 8 s each)"
    # Results written before the outages were timed carry only the page count.
    assert chaos["report"]._outages({"res_php_html_502": 72}) == "72"
