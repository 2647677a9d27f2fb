"""Running the emulator in-process: an async context manager and an accounting handle.

Tests and the chaos/benchmark suites use :func:`run_emulator`::

    async with run_emulator(EmulatorConfig(seed=1, solve_time_scale=0.001)) as emulator:
        client = ProviderClient(session=session, base_url=emulator.base_url, ...)
        ...
        assert emulator.task(task_id).token == solution.token

It binds 127.0.0.1 on a free port (or the given one), optionally with TLS, and stops the server
and every pending timer and pingback on exit. The handle reads the same accounting the admin
endpoint serves, without HTTP.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from captchatask.emulator.app import Runtime, create_app, runtime_key
from captchatask.emulator.config import EmulatorConfig
from captchatask.emulator.state import EmulatorState, TaskRecord

__all__ = ["LOOPBACK", "RunningEmulator", "run_emulator"]

LOOPBACK: Final = "127.0.0.1"


@dataclass(frozen=True)
class RunningEmulator:
    """A started emulator: its base URL and accounting.

    Attributes
    ----------
    base_url
        ``http(s)://127.0.0.1:<port>`` serving ``/in.php`` and ``/res.php``.
    port
        The bound port.
    runtime
        The state and pingback sender (for direct inspection).
    """

    base_url: str
    port: int
    runtime: Runtime

    @property
    def state(self) -> EmulatorState:
        """The emulated account."""
        return self.runtime.state

    def task(self, task_id: str) -> TaskRecord:
        """Return one task's record (``KeyError`` once it expired or if unknown)."""
        return self.state.tasks[task_id]

    def tasks(self) -> list[TaskRecord]:
        """Return every remembered task."""
        return list(self.state.tasks.values())

    def summary(self) -> dict[str, Any]:
        """Return the global totals (the admin ``summary`` document)."""
        return self.state.summary()

    def set_faults(self, **changes: Any) -> None:
        """Change fault knobs at runtime (same names and validation as the admin API)."""
        self.state.faults = self.state.faults.updated(changes)

    def burst_res_502(self, count: int) -> None:
        """Answer the next ``count`` ``res.php`` requests with an HTML 502 page."""
        self.state.res_502_burst = count

    def res_502_outage(self, seconds: float, *, until_met: bool = False) -> None:
        """Answer every ``res.php`` with an HTML 502 page for ``seconds`` (see the state's)."""
        self.state.res_502_outage(seconds, until_met=until_met)

    def lose_in_replies(self, count: int, *, mode: str = "502") -> None:
        """Lose the replies of the next ``count`` ``in.php`` that create a task (502 or drop)."""
        self.state.lose_in_replies(count, mode=mode)

    def reset(self) -> None:
        """Forget tasks, counters and bans."""
        self.state.reset()

    async def drain_pingbacks(self) -> None:
        """Wait until every scheduled pingback delivery has finished."""
        if self.runtime.sender is not None:
            await self.runtime.sender.drain()


@contextlib.asynccontextmanager
async def run_emulator(
    config: EmulatorConfig,
    *,
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[RunningEmulator]:
    """Serve the emulator on 127.0.0.1 for the duration of the block.

    Parameters
    ----------
    config
        The emulated account.
    port
        0 (default) picks a free port.
    ssl_context
        Serve HTTPS with this server context (e.g. for SDKs that hard-code ``https://``).
    clock
        Monotonic clock for retention, report windows and rate limits.
    """
    app = create_app(config, state=EmulatorState(config, clock=clock))
    runner = web.AppRunner(app, access_log=None)  # GET requests may carry keys in the URL
    await runner.setup()
    try:
        site = web.TCPSite(runner, LOOPBACK, port, ssl_context=ssl_context)
        await site.start()
        bound = int(runner.addresses[0][1])
        scheme = "https" if ssl_context is not None else "http"
        yield RunningEmulator(
            base_url=f"{scheme}://{LOOPBACK}:{bound}", port=bound, runtime=app[runtime_key]
        )
    finally:
        await runner.cleanup()
