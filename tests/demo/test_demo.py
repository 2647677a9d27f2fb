"""`captchatask demo --ci` end to end: nothing lost, and every effect it shows is the system's own.

The demo runs unattended in-process (``demo.run``, the code behind ``captchatask demo``) so the
test can read the sidecar's ``/metrics`` itself while the system is still up, and check the
demo's freeze numbers against it rather than against the demo's own words.
"""

import io
import re
from pathlib import Path

import pytest

from captchatask import demo


def summary_lines(out: str) -> dict[str, str]:
    """The summary's "label   value" lines, by label."""
    summary = out[out.index("== summary") :]
    lines = {}
    for line in summary.splitlines()[1:]:
        if not line.startswith("  ") or line.startswith("  LOST"):
            continue
        label, _, value = line.strip().partition("  ")
        lines[label] = value.strip()
    return lines


@pytest.mark.slow
def test_demo_freezes_the_api_server_on_pingbacks_in_flight_and_loses_nothing(
    tmp_path: Path,
) -> None:
    seen: dict[str, demo.Demo] = {}
    sidecar: list[demo.Sample] = []

    def inspect(finished: demo.Demo) -> None:
        seen["demo"] = finished
        sidecar.extend(demo.scrape(finished.stack.sidecar_metrics_url))

    out = io.StringIO()
    argv = ["--ci", "--tasks", "12", "--timeout", "180", "--workdir", str(tmp_path / "demo")]
    code = demo.run(argv, out=out, inspect=inspect)
    text = out.getvalue()
    assert code == 0, text
    lines = summary_lines(text)
    assert lines["lost"] == "0", text
    assert lines["tasks"] == "12"
    assert "stopping everything" in text

    # The freeze came while pingbacks were in flight, and pingbacks met it.
    finished = seen["demo"]
    freeze = finished.freeze
    assert freeze is not None, text
    assert freeze.after is not None, text  # the spool drained after the thaw
    spooled = freeze.spooled(freeze.after)
    replayed = freeze.replayed(freeze.after)
    assert spooled > 0, text
    assert replayed == spooled, text
    assert re.search(r"\d+ of 12 tasks are Submitted, their pingbacks on the way: freezing", text)
    assert lines["pingbacks spooled during the freeze"] == (
        f"{spooled}, replayed {replayed} ({freeze.replays(freeze.after)})"
    )

    # ...and the sidecar's own counters say the same: everything it ever spooled is the freeze's
    # plus what the summary reports as spooled outside it; every spooled result was replayed.
    outside = int(lines.get("pingbacks spooled outside the freeze", "0"))
    assert demo.metric(sidecar, demo.SPOOLED) == spooled + outside
    assert demo.metric(sidecar, *demo.REPLAYED) == spooled + outside
    assert demo.metric(sidecar, demo.SPOOL_DEPTH) == 0

    # The drops and the poll recoveries are the emulator's and the operator's numbers.
    final = finished.final
    assert final is not None
    assert lines["pingbacks dropped by the emulator"] == str(final.dropped)
    assert lines["results recovered by fallback poll"] == str(final.poll_recoveries)
