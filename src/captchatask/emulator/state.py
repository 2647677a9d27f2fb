"""The emulated account: tasks, threads, limits and the accounting that tests read back.

:class:`EmulatorState` is the model behind the HTTP handlers. It knows nothing about HTTP: the
handlers turn requests into calls such as :meth:`EmulatorState.submit` and turn the returned
codes into replies. Solving is simulated with ``loop.call_later`` timers; a finished task
notifies a listener (the pingback sender). All randomness comes from seeded generators, one per
concern, so enabling a fault does not change the ids or tokens of a seeded run.

Every task keeps an accounting record (calls received, token issued, pingback attempts) until
its result expires, which bounds memory; global totals are kept for the emulator's lifetime.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import string
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from captchatask.emulator.config import API_KEY_LENGTH, BusyBehaviour, EmulatorConfig, Faults

__all__ = ["EmulatorState", "PingbackAttempt", "SubmitRejectedError", "TaskRecord"]

_ID_LOW: Final = 1_000_000_000  # ids have ten digits, like observed CaptchaAI ids
_ID_HIGH: Final = 9_999_999_999
_TOKEN_ALPHABET: Final = string.ascii_letters + string.digits + "-_"
_IMAGE_ALPHABET: Final = string.ascii_uppercase + string.digits
_RECAPTCHA_TOKEN_LENGTH: Final = 180
_SHORT_TOKEN_LENGTH: Final = 120
_IMAGE_ANSWER_LENGTH: Final = 6
_HEX_LENGTH: Final = 32
_GRID_CELLS: Final = 9

QUEUED: Final = "queued"
SOLVING: Final = "solving"
SOLVED: Final = "solved"
UNSOLVABLE: Final = "unsolvable"
UNSOLVABLE_CODE: Final = "ERROR_CAPTCHA_UNSOLVABLE"
#: Ways the reply of an ``in.php`` that created a task can be lost (see ``lose_in_replies``).
REPLY_LOST_MODES: Final = frozenset({"502", "drop"})


class SubmitRejectedError(Exception):
    """``in.php`` must answer with ``code`` instead of creating a task."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class PingbackAttempt:
    """One delivery attempt of a pingback (``status`` is the HTTP code, or ``error``)."""

    at: float
    copy: int
    status: int | None = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        """Return the attempt as JSON."""
        return {"at": self.at, "copy": self.copy, "status": self.status, "error": self.error}


@dataclass
class TaskRecord:
    """One task and its accounting."""

    task_id: str
    method: str
    kind: str
    created_at: float
    solve_seconds: float
    unsolvable: bool
    enterprise: bool
    challenge: str | None
    pingback_url: str | None
    state: str = QUEUED
    token: str | None = None
    user_agent: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    finished_clock: float | None = None
    in_calls: int = 1
    res_calls: int = 0
    res_bulk_calls: int = 0
    reported: str | None = None
    #: How ``in.php``'s reply was lost after this task was created (``502``, ``drop``), if it was.
    reply_lost: str | None = None
    pingback_outcome: str | None = None
    pingback_copies: int = 0
    pingback_sent_at: list[float] = field(default_factory=list)
    #: Wall-clock time (like ``created_at``) the first copy was acknowledged with a 2xx.
    pingback_delivered_at: float | None = None
    pingback_attempts: list[PingbackAttempt] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """Whether the task has an answer or has failed."""
        return self.state in {SOLVED, UNSOLVABLE}

    def pingback_code(self) -> str:
        """Return the ``code`` a pingback carries: the answer or the error code."""
        return self.token if self.state == SOLVED and self.token else UNSOLVABLE_CODE

    def as_json(self) -> dict[str, Any]:
        """Return the accounting record as JSON."""
        return {
            "id": self.task_id,
            "method": self.method,
            "kind": self.kind,
            "state": self.state,
            "token": self.token,
            "user_agent": self.user_agent,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "solve_seconds": self.solve_seconds,
            "in_calls": self.in_calls,
            "res_calls": self.res_calls,
            "res_bulk_calls": self.res_bulk_calls,
            "reported": self.reported,
            "in_reply_lost": self.reply_lost,
            "pingback": {
                "url_set": self.pingback_url is not None,
                # The provider's own record of where it reports: lets a test count provider
                # tasks per client-side task (the URL names it), as a real account page would.
                "url": self.pingback_url,
                "outcome": self.pingback_outcome,
                "copies": self.pingback_copies,
                "sent_at": list(self.pingback_sent_at),
                "delivered_at": self.pingback_delivered_at,
                "attempts": [attempt.as_json() for attempt in self.pingback_attempts],
            },
        }


FinishListener = Callable[[TaskRecord], None]


def _derive(seed: int, concern: str) -> random.Random:
    return random.Random(f"{seed}:{concern}")  # noqa: S311 - simulation, not cryptography


class EmulatorState:
    """The emulated account (see the module docstring).

    Parameters
    ----------
    config
        The frozen configuration.
    clock
        Monotonic seconds used for retention, report windows and rate limits (injectable so
        tests can move time without sleeping).
    """

    def __init__(
        self, config: EmulatorConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.faults: Faults = config.faults
        self._clock = clock
        seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**32)
        self.seed = seed
        self._ids_rng = _derive(seed, "ids")
        self._tokens_rng = _derive(seed, "tokens")
        self._solve_rng = _derive(seed, "solve")
        self.faults_rng = _derive(seed, "faults")
        self.pingback_rng = _derive(seed, "pingback")
        self.tasks: dict[str, TaskRecord] = {}
        self._issued_tokens: set[str] = set()
        self._running: set[str] = set()
        self._queue: deque[str] = deque()
        self._expiry: deque[str] = deque()  # finished task ids, oldest first
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self.balance = config.balance
        self.totals: Counter[str] = Counter()
        self.reply_codes: Counter[str] = Counter()
        self.res_502_burst = 0
        #: Until when (state clock) every ``res.php`` gets an HTML 502: a timed outage.
        self.res_502_until = 0.0
        #: An outage no ``res.php`` request has met yet, owed to the next one (``until_met``).
        self.res_502_unmet = False
        self.in_reply_lost: deque[str] = deque()
        self.pingback_addrs: list[str] = []
        self._in_times: deque[float] = deque()
        self._res_times: deque[float] = deque()
        self._created_times: deque[float] = deque()
        self._submit_ban_until = 0.0
        self._res_block_until = 0.0
        self._bad_keys: Counter[str] = Counter()
        self._banned_until: dict[str, float] = {}
        self.listeners: list[FinishListener] = []

    # -- time and housekeeping ----------------------------------------------------------------

    def now(self) -> float:
        """Return the state's monotonic clock reading."""
        return self._clock()

    def sweep(self, *, room: int = 0) -> None:
        """Forget finished tasks past retention, and the oldest ones beyond ``max_tasks``.

        ``room`` makes space for tasks about to be created.
        """
        horizon = self.now() - self.config.retention_seconds
        while self._expiry:
            task = self.tasks.get(self._expiry[0])
            if task is None:
                self._expiry.popleft()
                continue
            expired = task.finished_clock is not None and task.finished_clock <= horizon
            if not expired and len(self.tasks) + room <= self.config.max_tasks:
                break
            self._expiry.popleft()
            self._forget(task)

    def _forget(self, task: TaskRecord) -> None:
        self.tasks.pop(task.task_id, None)
        if task.token is not None:
            self._issued_tokens.discard(task.token)
        self.totals["tasks_expired"] += 1

    def reset(self) -> None:
        """Drop every task, counter and ban; keep the configuration and current faults."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self.tasks.clear()
        self._issued_tokens.clear()
        self._running.clear()
        self._queue.clear()
        self._expiry.clear()
        self.totals.clear()
        self.reply_codes.clear()
        self.balance = self.config.balance
        self.res_502_burst = 0
        self.res_502_until = 0.0
        self.res_502_unmet = False
        self.in_reply_lost.clear()
        self._in_times.clear()
        self._res_times.clear()
        self._created_times.clear()
        self._submit_ban_until = 0.0
        self._res_block_until = 0.0
        self._bad_keys.clear()
        self._banned_until.clear()

    def close(self) -> None:
        """Cancel pending solve timers (called when the server stops)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    # -- keys, bans and limits ----------------------------------------------------------------

    def check_key(self, key: str | None, *, peer: str) -> str | None:
        """Return the error code for ``key`` from ``peer``, or ``None`` if it is accepted."""
        now = self.now()
        if self._banned_until.get(peer, 0.0) > now:
            return "IP_BANNED"
        if not key or len(key) != API_KEY_LENGTH:
            code = "ERROR_WRONG_USER_KEY"
        elif key not in self.config.api_keys:
            code = "ERROR_KEY_DOES_NOT_EXIST"
        else:
            return None
        if self.config.ban_after_bad_keys:
            self._bad_keys[peer] += 1
            if self._bad_keys[peer] >= self.config.ban_after_bad_keys:
                self._banned_until[peer] = now + self.config.ban_seconds
                self._bad_keys[peer] = 0
        return code

    @staticmethod
    def _trim(times: deque[float], horizon: float) -> None:
        while times and times[0] <= horizon:
            times.popleft()

    def note_in_request(self) -> str | None:
        """Record a keyed ``in.php`` request; return ``MAX_USER_TURN`` while submits are banned."""
        now = self.now()
        if not self.config.max_user_turn:
            return None
        if now < self._submit_ban_until:
            return "MAX_USER_TURN"
        self._in_times.append(now)
        self._trim(self._in_times, now - self.config.max_user_turn_window)
        if len(self._in_times) > self.config.max_user_turn_limit:
            self._submit_ban_until = now + self.config.max_user_turn_ban
            self._in_times.clear()
            return "MAX_USER_TURN"
        return None

    def note_res_request(self) -> str | None:
        """Record a keyed ``res.php`` request; return ``ERROR: 1005`` while polling is blocked."""
        now = self.now()
        if not self.config.res_rate_limit:
            return None
        if now < self._res_block_until:
            return "ERROR: 1005"
        horizon = now - self.config.res_limit_window
        self._res_times.append(now)
        self._trim(self._res_times, horizon)
        self._trim(self._created_times, horizon)
        allowed = len(self._created_times) * self.config.res_limit_per_task
        if len(self._res_times) > allowed + self.config.res_limit_base:
            self._res_block_until = now + self.config.res_limit_block
            self._res_times.clear()
            return "ERROR: 1005"
        return None

    def roll(self, rate: float) -> bool:
        """Draw a fault decision with probability ``rate`` from the fault generator."""
        return rate > 0 and self.faults_rng.random() < rate

    def take_res_502(self) -> bool:
        """Whether this ``res.php`` request gets an HTML 502 (outage, explicit burst or rate)."""
        if self.now() < self.res_502_until or self.res_502_unmet:
            self.res_502_unmet = False
            return True
        if self.res_502_burst > 0:
            self.res_502_burst -= 1
            return True
        return self.roll(self.faults.res_502_rate)

    def res_502_outage(self, seconds: float, *, until_met: bool = False) -> None:
        """Answer every ``res.php`` request with an HTML 502 for the next ``seconds``.

        A provider's (or its proxy's) outage is a span of time, not a number of requests: a
        client that backs off meets it for as long as it lasts and not a request longer, and a
        busy one does not end it early. An outage still running is extended to the later end,
        never shortened. ``until_met``: if no request came while it lasted, the next one still
        meets it (and ends it). An outage no request meets is indistinguishable from none, so a
        fault plan that must exercise a client's handling of one (the chaos suite's) asks for
        this; the outage still begins at its planned time.
        """
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError("seconds must be a finite number >= 0")
        self.res_502_until = max(self.res_502_until, self.now() + seconds)
        self.res_502_unmet = self.res_502_unmet or until_met

    def res_502_outage_left(self) -> float:
        """Seconds the current ``res.php`` outage still lasts (0 when there is none)."""
        return max(0.0, self.res_502_until - self.now())

    def res_502_faults(self) -> dict[str, float | int | bool]:
        """What the ``res.php`` 502 faults still hold (the summary and the admin answer)."""
        return {
            "res_502_burst_remaining": self.res_502_burst,
            "res_502_outage_seconds_left": round(self.res_502_outage_left(), 3),
            "res_502_outage_unmet": self.res_502_unmet,
        }

    def lose_in_replies(self, count: int, *, mode: str) -> None:
        """Lose the replies of the next ``count`` ``in.php`` requests that create a task.

        ``mode`` is ``502`` (an nginx HTML 502 page, as a proxy in front of the provider sends
        when its upstream answered too late) or ``drop`` (the connection is closed without a
        reply). Either way the task exists and is solved, and its pingback is sent as usual:
        the client just never learns the id.
        """
        if mode not in REPLY_LOST_MODES:
            raise ValueError(f"mode must be one of {sorted(REPLY_LOST_MODES)}")
        self.in_reply_lost.extend([mode] * max(0, count))

    def take_in_reply_lost(self) -> str | None:
        """The reply-lost mode for the task just created, or ``None`` to answer normally."""
        return self.in_reply_lost.popleft() if self.in_reply_lost else None

    # -- tasks --------------------------------------------------------------------------------

    def _new_id(self) -> str:
        while True:
            candidate = str(self._ids_rng.randint(_ID_LOW, _ID_HIGH))
            if candidate not in self.tasks:
                return candidate

    def submit(
        self,
        *,
        method: str,
        kind: str,
        enterprise: bool,
        challenge: str | None,
        pingback_url: str | None,
    ) -> TaskRecord:
        """Create a task, start it if a thread is free, and return it.

        Raises
        ------
        SubmitRejectedError
            When every thread is busy and the busy behaviour rejects.
        """
        self.sweep(room=1)
        if len(self._running) >= self.config.threads:
            if self.config.busy is BusyBehaviour.ZERO_BALANCE:
                raise SubmitRejectedError("ERROR_ZERO_BALANCE")
            if self.config.busy is BusyBehaviour.NO_SLOT:
                raise SubmitRejectedError("ERROR_NO_SLOT_AVAILABLE")
        low, high = self.config.solve_range(kind)
        task = TaskRecord(
            task_id=self._new_id(),
            method=method,
            kind=kind,
            created_at=time.time(),
            solve_seconds=self._solve_rng.uniform(low, high),
            unsolvable=self._solve_rng.random() < self.config.unsolvable_rate,
            enterprise=enterprise,
            challenge=challenge,
            pingback_url=pingback_url,
        )
        if not task.unsolvable:
            # Drawn at submit time so a seeded run issues the same tokens whatever the order in
            # which solves finish; it is only served once the task is solved.
            task.token = self._issue_token(task)
            task.user_agent = self.config.user_agent if enterprise else None
        self.tasks[task.task_id] = task
        self._created_times.append(self.now())
        self.totals["tasks_created"] += 1
        if len(self._running) < self.config.threads:
            self._start(task)
        else:
            self._queue.append(task.task_id)
            self.totals["tasks_queued"] += 1
        return task

    def _start(self, task: TaskRecord) -> None:
        task.state = SOLVING
        task.started_at = time.time()
        self._running.add(task.task_id)
        loop = asyncio.get_running_loop()
        self._timers[task.task_id] = loop.call_later(task.solve_seconds, self._finish, task)

    def _finish(self, task: TaskRecord) -> None:
        self._timers.pop(task.task_id, None)
        self._running.discard(task.task_id)
        task.finished_at = time.time()
        task.finished_clock = self.now()
        if task.unsolvable:
            task.state = UNSOLVABLE
            self.totals["tasks_unsolvable"] += 1
        else:
            task.state = SOLVED
            self.balance = max(0.0, self.balance - self.config.price)
            self.totals["tasks_solved"] += 1
        self._expiry.append(task.task_id)
        while self._queue and len(self._running) < self.config.threads:
            queued = self.tasks.get(self._queue.popleft())
            if queued is not None:
                self._start(queued)
        for listener in self.listeners:
            listener(task)

    @property
    def working_threads(self) -> int:
        """Threads busy solving (queued tasks wait for one and are not counted)."""
        return len(self._running)

    # -- answers ------------------------------------------------------------------------------

    def _random(self, alphabet: str, length: int) -> str:
        return "".join(self._tokens_rng.choices(alphabet, k=length))

    def _hex(self) -> str:
        return self._random("0123456789abcdef", _HEX_LENGTH)

    def _answer(self, task: TaskRecord) -> str:  # noqa: PLR0911 - one return per answer shape
        if task.kind in {"recaptcha_v2", "recaptcha_v3", "recaptcha_enterprise"}:
            return "03A" + self._random(_TOKEN_ALPHABET, _RECAPTCHA_TOKEN_LENGTH)
        if task.kind == "turnstile":
            return "0." + self._random(_TOKEN_ALPHABET, _SHORT_TOKEN_LENGTH)
        if task.kind == "hcaptcha":
            return "P1_" + self._random(_TOKEN_ALPHABET, _SHORT_TOKEN_LENGTH)
        if task.kind == "geetest":
            validate = self._hex()
            answer: Mapping[str, str] = {
                "challenge": task.challenge or self._hex(),
                "validate": validate,
                "seccode": f"{validate}|jordan",
            }
            return json.dumps(answer, separators=(",", ":"))
        if task.kind == "geetest_v4":
            answer = {
                "captcha_id": task.challenge or "",
                "lot_number": self._hex(),
                "pass_token": self._hex() + self._hex(),
                "gen_time": str(int(task.created_at)),
                "captcha_output": self._random(_TOKEN_ALPHABET, _SHORT_TOKEN_LENGTH),
            }
            return json.dumps(answer, separators=(",", ":"))
        if task.kind == "grid":
            cells = sorted(self._tokens_rng.sample(range(1, _GRID_CELLS + 1), k=3))
            return json.dumps(cells)
        return self._random(_IMAGE_ALPHABET, _IMAGE_ANSWER_LENGTH)

    def _issue_token(self, task: TaskRecord) -> str:
        """Return an answer no other remembered task holds (grid answers may repeat)."""
        while True:
            token = self._answer(task)
            if task.kind == "grid" or token not in self._issued_tokens:
                self._issued_tokens.add(token)
                return token

    # -- reports ------------------------------------------------------------------------------

    def report(self, task: TaskRecord, *, good: bool) -> str:
        """Record a report and return the reply code."""
        if task.reported is not None:
            return "ERROR_DUPLICATE_REPORT"
        if task.finished_clock is None or (
            self.now() - task.finished_clock > self.config.report_window_seconds
        ):
            return "ERROR_REPORT_NOT_RECORDED"
        task.reported = "good" if good else "bad"
        self.totals["reports_good" if good else "reports_bad"] += 1
        return "OK_REPORT_RECORDED"

    # -- accounting ---------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Return global totals, current load and the seed as JSON."""
        return {
            "seed": self.seed,
            "totals": dict(self.totals),
            "reply_codes": dict(self.reply_codes),
            "tasks_remembered": len(self.tasks),
            "threads": self.config.threads,
            "working_threads": self.working_threads,
            "queued": len(self._queue),
            "balance": round(self.balance, 6),
            **self.res_502_faults(),
            "in_reply_lost_remaining": len(self.in_reply_lost),
            "faults": self.faults.as_json(),
        }
