"""The seed tutorial's "callback + fallback polling" (Pattern 1), as an async script.

Faithful to the tutorial, only with every time multiplied by one ``scale`` (the benchmark runs
ours with the same factor):

* ``submit_captcha``: ``in.php`` with ``pingback=<callback URL>`` and ``json=1``; on success the
  task id goes into ``pending_tasks`` with ``submitted_at = time.time()`` *after* the reply;
* the callback handler (Pattern 3, idempotent): ``results[id] = code``, ``pending_tasks.pop(id)``;
* ``fallback_poller``: ``sleep(30)``, then every pending task older than 120 s is polled with one
  ``res.php?action=get&id=...`` each, **sequentially** (the tutorial's ``for`` loop with
  ``requests.get``); ``status 1`` recovers it, anything but ``CAPCHA_NOT_READY`` drops it.

The class records, for the benchmark, when each task was recovered by a poll, so the recovery
delay after ``submitted_at + 120 s`` can be compared with ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
from aiohttp import web

#: The tutorial's numbers, before scaling.
CALLBACK_TIMEOUT_SECONDS: Final = 120.0
SWEEP_SECONDS: Final = 30.0
NOT_READY: Final = "CAPCHA_NOT_READY"


@dataclass
class SeedPoller:
    """The seed's pending/results dicts, its callback handler and its poller.

    Parameters
    ----------
    solver_url
        Base URL of the solver (``in.php``/``res.php``).
    api_key
        The account key.
    callback_url
        Where the solver should send pingbacks (this object's :meth:`app`).
    scale
        Multiplies the tutorial's 120 s threshold and 30 s sweep.
    """

    solver_url: str
    api_key: str
    callback_url: str
    scale: float
    pending_tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: dict[str, str] = field(default_factory=dict)
    submitted_at: dict[str, float] = field(default_factory=dict)
    recovered_at: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    submit_errors: int = 0

    @property
    def threshold(self) -> float:
        """The scaled callback timeout (the tutorial's 120 s)."""
        return CALLBACK_TIMEOUT_SECONDS * self.scale

    @property
    def sweep(self) -> float:
        """The scaled sweep period (the tutorial's 30 s)."""
        return SWEEP_SECONDS * self.scale

    async def submit_captcha(
        self, session: aiohttp.ClientSession, *, sitekey: str, pageurl: str
    ) -> str | None:
        """``in.php`` with the callback URL; remember the task for fallback polling."""
        data = {
            "key": self.api_key,
            "method": "userrecaptcha",
            "googlekey": sitekey,
            "pageurl": pageurl,
            "pingback": self.callback_url,
            "json": "1",
        }
        async with session.post(f"{self.solver_url}/in.php", data=data) as reply:
            body = await reply.json(content_type=None)
        if body.get("status") == 1:
            task_id = str(body["request"])
            now = time.time()
            self.pending_tasks[task_id] = {"submitted_at": now, "status": "pending"}
            self.submitted_at[task_id] = now
            return task_id
        self.submit_errors += 1
        return None

    async def captcha_callback(self, request: web.Request) -> web.Response:
        """Pattern 3: record once, acknowledge always."""
        task_id = request.query.get("id", "")
        solution = request.query.get("code", "")
        if task_id not in self.results:
            self.results[task_id] = solution
            self.pending_tasks.pop(task_id, None)
        return web.Response(text="OK")

    async def fallback_poller(self, session: aiohttp.ClientSession) -> None:
        """Every sweep, poll each task older than the threshold, one request at a time."""
        while True:
            await asyncio.sleep(self.sweep)
            now = time.time()
            stale = [
                task_id
                for task_id, info in self.pending_tasks.items()
                if now - info["submitted_at"] > self.threshold and info["status"] == "pending"
            ]
            for task_id in stale:
                params = {"key": self.api_key, "action": "get", "id": task_id, "json": "1"}
                async with session.get(f"{self.solver_url}/res.php", params=params) as reply:
                    data = await reply.json(content_type=None)
                if data.get("status") == 1:
                    self.results[task_id] = data["request"]
                    self.pending_tasks.pop(task_id, None)
                    self.recovered_at[task_id] = time.time()
                elif data.get("request") != NOT_READY:
                    self.pending_tasks.pop(task_id, None)
                    self.failed[task_id] = str(data.get("request"))

    def app(self) -> web.Application:
        """The callback receiver (GET and POST, like the tutorial's route)."""
        app = web.Application()
        app.router.add_route("*", "/callback", self.captcha_callback)
        return app

    def recovery_delays(self) -> list[float]:
        """Seconds from ``submitted_at + threshold`` to the poll that recovered each task."""
        return [
            at - (self.submitted_at[task_id] + self.threshold)
            for task_id, at in self.recovered_at.items()
        ]


@contextlib.asynccontextmanager
async def serving(poller: SeedPoller, *, port: int) -> AsyncIterator[aiohttp.ClientSession]:
    """Serve the callback receiver and run the poller; yield the solver session."""
    runner = web.AppRunner(poller.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(poller.fallback_poller(session), name="seed-poller")
        try:
            yield session
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await runner.cleanup()
