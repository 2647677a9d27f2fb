"""Pingback (callback) delivery of the emulator, with fault injection.

When a task with a ``pingback`` URL finishes, the sender delivers ``id`` and ``code`` (the
answer, or ``ERROR_CAPTCHA_UNSOLVABLE``) in the selected style: CaptchaAI's GET
``URL?id=...&code=...`` or 2captcha's urlencoded POST. The real services document no retries
and no signature, so by default there are none; faults can drop, duplicate, delay, reorder and
retry deliveries. For safety the sender only ever connects to loopback addresses and to the
host names listed at start-up (``--pingback-host``, e.g. a receiver Service inside a test
cluster): any other host is refused and recorded, never contacted.

Each decision and attempt is written to the task's accounting record, so a test can tell a
dropped pingback from one that was sent and lost by the receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import Coroutine
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from captchatask.emulator.config import PingbackStyle
from captchatask.emulator.state import UNSOLVABLE, EmulatorState, PingbackAttempt, TaskRecord

__all__ = ["PingbackSender", "is_allowed_url", "is_loopback_url"]

_LOCALHOST: Final = "localhost"
_HTTP_SERVER_ERROR: Final = 500
_HTTP_OK_MIN: Final = 200
_HTTP_OK_MAX: Final = 299


def is_loopback_url(url: str) -> bool:
    """Return whether ``url`` is http(s) to ``localhost`` or a loopback IP address."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    host = parts.hostname
    if parts.scheme not in {"http", "https"} or not host:
        return False
    if host == _LOCALHOST:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_allowed_url(url: str, hosts: frozenset[str]) -> bool:
    """Return whether a pingback may go to ``url``: loopback, or http(s) to one of ``hosts``."""
    if is_loopback_url(url):
        return True
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return False
    return parts.scheme in {"http", "https"} and host is not None and host in hosts


class PingbackSender:
    """Delivers pingbacks for finished tasks (see the module docstring).

    Parameters
    ----------
    state
        The emulated account; the sender registers itself as a finish listener.
    session
        An HTTP session owned by the caller (the app's cleanup context).
    """

    def __init__(self, state: EmulatorState, session: aiohttp.ClientSession) -> None:
        self._state = state
        self._session = session
        self._pending: set[asyncio.Task[None]] = set()
        self._buffer: list[tuple[TaskRecord, int, float]] = []
        self._flush: asyncio.TimerHandle | None = None
        state.listeners.append(self.on_finished)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _outcome(self, task: TaskRecord, outcome: str) -> None:
        task.pingback_outcome = outcome
        self._state.totals[f"pingbacks_{outcome}"] += 1

    def on_finished(self, task: TaskRecord) -> None:
        """Decide the fate of a finished task's pingback and schedule its delivery."""
        if task.pingback_url is None:
            return
        faults = self._state.faults
        rng = self._state.pingback_rng
        if task.state == UNSOLVABLE and not faults.pingback_errors:
            self._outcome(task, "not_sent")
            return
        if not is_allowed_url(task.pingback_url, self._state.config.pingback_hosts):
            self._outcome(task, "refused")
            return
        if faults.pingback_drop_rate and rng.random() < faults.pingback_drop_rate:
            self._outcome(task, "dropped")
            return
        duplicate = faults.pingback_duplicate_rate and rng.random() < faults.pingback_duplicate_rate
        copies = 2 if duplicate else 1
        delay = rng.uniform(*faults.pingback_delay)
        if faults.pingback_late_rate and rng.random() < faults.pingback_late_rate:
            delay += faults.pingback_late_delay
            self._state.totals["pingbacks_late"] += 1
        task.pingback_copies = copies
        task.pingback_outcome = "pending"
        if faults.pingback_reorder_window > 0:
            self._buffer.append((task, copies, delay))
            if self._flush is None:
                loop = asyncio.get_running_loop()
                self._flush = loop.call_later(faults.pingback_reorder_window, self._release)
            return
        self._spawn(self._deliver(task, copies, delay))

    def _release(self) -> None:
        """Send the held pingbacks in shuffled order (the reordering fault)."""
        self._flush = None
        batch, self._buffer = self._buffer, []
        self._state.pingback_rng.shuffle(batch)
        for position, (task, copies, delay) in enumerate(batch):
            # Stagger by position so the shuffled order is the arrival order.
            self._spawn(self._deliver(task, copies, delay + position * 0.001))

    async def _deliver(self, task: TaskRecord, copies: int, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        results = [await self._send(task, copy) for copy in range(copies)]
        self._state.totals["pingback_duplicates_sent"] += copies - 1
        self._outcome(task, "delivered" if "delivered" in results else results[0])

    async def _attempt(self, task: TaskRecord, copy: int) -> PingbackAttempt:
        faults = self._state.faults
        assert task.pingback_url is not None
        attempt = PingbackAttempt(at=asyncio.get_running_loop().time(), copy=copy)
        payload = {"id": task.task_id, "code": task.pingback_code()}
        timeout = aiohttp.ClientTimeout(total=faults.pingback_timeout)
        try:
            if faults.pingback_style is PingbackStyle.CAI_GET:
                url = URL(task.pingback_url, encoded=False).update_query(payload)
                request = self._session.get(url, timeout=timeout, allow_redirects=False)
            else:
                request = self._session.post(
                    task.pingback_url, data=payload, timeout=timeout, allow_redirects=False
                )
            async with request as response:
                attempt.status = response.status
                await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            attempt.error = type(exc).__name__
        return attempt

    async def _send(self, task: TaskRecord, copy: int) -> str:
        """Deliver one copy, retrying as configured; return its outcome."""
        faults = self._state.faults
        state = self._state
        for number in range(faults.pingback_retries + 1):
            if number:
                state.totals["pingback_retries"] += 1
                await asyncio.sleep(faults.pingback_retry_delay)
            task.pingback_sent_at.append(state.now())
            state.totals["pingback_requests"] += 1
            attempt = await self._attempt(task, copy)
            task.pingback_attempts.append(attempt)
            if attempt.status is not None and attempt.status < _HTTP_SERVER_ERROR:
                delivered = _HTTP_OK_MIN <= attempt.status <= _HTTP_OK_MAX
                if delivered and task.pingback_delivered_at is None:
                    task.pingback_delivered_at = time.time()
                return "delivered" if delivered else "rejected"
        return "failed"

    async def close(self) -> None:
        """Cancel deliveries still in flight (the server is stopping)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        for task in list(self._pending):
            task.cancel()
        for task in list(self._pending):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def drain(self) -> None:
        """Wait until every scheduled delivery has finished (for tests and benchmarks)."""
        while self._pending or self._flush is not None:
            if self._pending:
                await asyncio.gather(*list(self._pending), return_exceptions=True)
            else:
                await asyncio.sleep(0.01)
