"""Active/standby: two operator processes with kopf peering; the standby takes over."""

from __future__ import annotations

import signal
from typing import Any

from captchatask.emulator.server import RunningEmulator

PEERING = "captchatask"


async def test_the_standby_takes_over_when_the_active_operator_dies(
    harness: Any, receiver: Any, emulator: RunningEmulator, peering_crds: None
) -> None:
    harness.kubectl(
        "apply",
        "-n",
        harness.namespace,
        "-f",
        "-",
        input=f"apiVersion: kopf.dev/v1\nkind: KopfPeering\nmetadata:\n  name: {PEERING}\n",
    )
    await harness.secret()
    await harness.provider(emulator, public_url=receiver.base_url, callback_timeout=30)
    common = ("--peering-lifetime", "3")
    active = harness.start_operator(*common, "--peering-priority", "200", peering=PEERING)
    await harness.started(active, active=True)
    standby = harness.start_operator(*common, "--peering-priority", "100", peering=PEERING)
    await harness.started(standby, active=False)

    await harness.tasks(5, prefix="a")
    await harness.wait_terminal(5)
    assert standby.ready() == {"started": True, "active": False}
    assert standby.metric("captchatask_submissions_total", outcome="submitted") == 0

    active.process.send_signal(signal.SIGKILL)
    active.process.wait(timeout=10)
    await harness.tasks(5, prefix="b")
    tasks = await harness.wait_terminal(10)

    assert {t["status"]["phase"] for t in tasks} == {"Solved"}
    assert standby.ready() == {"started": True, "active": True}
    assert standby.metric("captchatask_submissions_total", outcome="submitted") == 5
    assert set(harness.per_uid(emulator).values()) == {1}
