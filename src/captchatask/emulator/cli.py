"""``captchatask emulator``: run the CaptchaAI/2captcha-compatible emulator as a process.

The lead's CLI calls :func:`main` with the arguments after ``emulator``; ``python -m
captchatask.emulator`` does the same. Every option maps to one field of
:class:`~captchatask.emulator.config.EmulatorConfig` or
:class:`~captchatask.emulator.config.Faults`; the fault knobs can also be changed while it runs
with ``POST /_emulator/faults``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
import sys
from collections.abc import Sequence
from typing import Final

from aiohttp import web

from captchatask.emulator.app import ADMIN_PREFIX, create_app, runtime_key
from captchatask.emulator.config import (
    DEFAULT_API_KEY,
    DEFAULT_SOLVE_TIMES,
    SOLVE_KINDS,
    BusyBehaviour,
    EmulatorConfig,
    Faults,
    IdType,
    PingbackStyle,
)

__all__ = ["build_parser", "config_from_args", "main"]

DEFAULT_PORT: Final = 8089
_EXIT_USAGE: Final = 2


def _range(text: str) -> tuple[float, float]:
    low, sep, high = text.partition(":")
    try:
        return (float(low), float(high)) if sep else (float(low), float(low))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected LOW:HIGH seconds, got {text!r}") from exc


def _solve_time(text: str) -> tuple[str, tuple[float, float]]:
    kind, sep, value = text.partition("=")
    if not sep or kind not in SOLVE_KINDS:
        raise argparse.ArgumentTypeError(f"expected KIND=LOW:HIGH with KIND in {SOLVE_KINDS}")
    return kind, _range(value)


def build_parser(prog: str = "captchatask emulator") -> argparse.ArgumentParser:  # noqa: PLR0915 - one statement per documented knob
    """Return the argument parser (every knob documented in ``--help``)."""
    defaults = EmulatorConfig()
    faults = Faults()
    kinds = ", ".join(
        f"{kind}={low:g}:{high:g}" for kind, (low, high) in DEFAULT_SOLVE_TIMES.items()
    )
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Serve a CaptchaAI/2captcha-compatible in.php/res.php API for tests, demos and "
            f"benchmarks. Accounting and runtime fault control live under {ADMIN_PREFIX}/ "
            "on the same port (summary, tasks, tasks/ID, faults, faults/res-502-burst, reset)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind")
    server.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0 = any free)")
    server.add_argument("--tls-cert", help="PEM certificate: serve HTTPS (needs --tls-key)")
    server.add_argument("--tls-key", help="PEM private key for --tls-cert")
    server.add_argument("--seed", type=int, help="seed for ids, tokens, timings and faults")

    account = parser.add_argument_group("account")
    account.add_argument(
        "--key",
        action="append",
        dest="keys",
        metavar="KEY",
        help=f"accepted 32-character API key (repeatable; default {DEFAULT_API_KEY})",
    )
    account.add_argument("--threads", type=int, default=defaults.threads, help="thread cap")
    account.add_argument(
        "--busy",
        choices=[item.value for item in BusyBehaviour],
        default=defaults.busy.value,
        help="reply when all threads are busy: ERROR_ZERO_BALANCE, "
        "ERROR_NO_SLOT_AVAILABLE, or queue silently",
    )
    account.add_argument("--balance", type=float, default=defaults.balance, help="start balance")
    account.add_argument("--price", type=float, default=defaults.price, help="charge per solve")
    account.add_argument(
        "--id-type",
        choices=[item.value for item in IdType],
        default=defaults.id_type.value,
        help="task id type in JSON submit replies",
    )

    solving = parser.add_argument_group("solving")
    solving.add_argument(
        "--unsolvable-rate",
        type=float,
        default=defaults.unsolvable_rate,
        help="fraction of tasks ending in ERROR_CAPTCHA_UNSOLVABLE",
    )
    solving.add_argument(
        "--solve-time",
        type=_solve_time,
        action="append",
        default=[],
        metavar="KIND=LOW:HIGH",
        help=f"uniform solve time in seconds per kind (repeatable); defaults: {kinds}",
    )
    solving.add_argument(
        "--solve-time-scale",
        type=float,
        default=defaults.solve_time_scale,
        help="multiply every solve time (0.01 = hundredths)",
    )
    solving.add_argument(
        "--retention-seconds",
        type=float,
        default=defaults.retention_seconds,
        help="finished results (and their accounting) are gone after this",
    )
    solving.add_argument(
        "--max-tasks", type=int, default=defaults.max_tasks, help="most tasks remembered"
    )
    solving.add_argument(
        "--report-window-seconds",
        type=float,
        default=defaults.report_window_seconds,
        help="reportbad/reportgood later than this -> ERROR_REPORT_NOT_RECORDED",
    )
    solving.add_argument(
        "--bulk-max-ids",
        type=int,
        default=defaults.bulk_max_ids,
        help="most ids in one bulk get (more -> ERROR_BAD_PARAMETERS)",
    )

    limits = parser.add_argument_group("rate limits")
    limits.add_argument(
        "--max-user-turn",
        action="store_true",
        help="enable MAX_USER_TURN (tuned by the next three options)",
    )
    limits.add_argument(
        "--max-user-turn-limit",
        type=int,
        default=defaults.max_user_turn_limit,
        help="in.php requests allowed per window",
    )
    limits.add_argument(
        "--max-user-turn-window",
        type=float,
        default=defaults.max_user_turn_window,
        help="window in seconds",
    )
    limits.add_argument(
        "--max-user-turn-ban",
        type=float,
        default=defaults.max_user_turn_ban,
        help="seconds submits stay banned",
    )
    limits.add_argument(
        "--res-rate-limit",
        action="store_true",
        help="enable 'ERROR: 1005' when res.php requests > PER_TASK*tasks + BASE in WINDOW",
    )
    limits.add_argument(
        "--res-limit-per-task",
        type=int,
        default=defaults.res_limit_per_task,
        help="res.php requests allowed per task created in the window",
    )
    limits.add_argument(
        "--res-limit-base",
        type=int,
        default=defaults.res_limit_base,
        help="res.php requests allowed on top",
    )
    limits.add_argument(
        "--res-limit-window",
        type=float,
        default=defaults.res_limit_window,
        help="window in seconds",
    )
    limits.add_argument(
        "--res-limit-block",
        type=float,
        default=defaults.res_limit_block,
        help="seconds res.php stays blocked",
    )
    limits.add_argument(
        "--ban-after-bad-keys",
        type=int,
        default=defaults.ban_after_bad_keys,
        help="answer IP_BANNED after this many wrong-key requests (0 = never)",
    )
    limits.add_argument(
        "--ban-seconds", type=float, default=defaults.ban_seconds, help="how long IP_BANNED lasts"
    )

    parser.add_argument(
        "--pingback-host",
        action="append",
        default=[],
        metavar="HOST",
        help="a host name pingbacks may be sent to besides loopback (repeatable; fixed at start)",
    )

    fault = parser.add_argument_group("faults (also changeable at runtime)")
    fault.add_argument(
        "--pingback-style",
        choices=[item.value for item in PingbackStyle],
        default=faults.pingback_style.value,
        help="cai-get: GET URL?id=&code=; 2c-post: POST urlencoded id, code",
    )
    fault.add_argument("--pingback-drop-rate", type=float, default=0.0, help="fraction never sent")
    fault.add_argument(
        "--pingback-duplicate-rate", type=float, default=0.0, help="fraction sent twice"
    )
    fault.add_argument(
        "--pingback-delay",
        type=_range,
        default=faults.pingback_delay,
        metavar="LOW:HIGH",
        help="uniform delay in seconds before sending",
    )
    fault.add_argument(
        "--pingback-late-rate",
        type=float,
        default=0.0,
        help="fraction delayed by an extra --pingback-late-delay (past a threshold)",
    )
    fault.add_argument("--pingback-late-delay", type=float, default=0.0, help="seconds")
    fault.add_argument(
        "--pingback-reorder-window",
        type=float,
        default=0.0,
        help="hold pingbacks this many seconds and release them shuffled",
    )
    fault.add_argument(
        "--pingback-retries",
        type=int,
        default=0,
        help="retries when the receiver is down or answers 5xx (0 = none, like the service)",
    )
    fault.add_argument(
        "--pingback-retry-delay",
        type=float,
        default=faults.pingback_retry_delay,
        help="seconds between retries",
    )
    fault.add_argument(
        "--pingback-timeout",
        type=float,
        default=faults.pingback_timeout,
        help="seconds before a delivery attempt is abandoned",
    )
    fault.add_argument(
        "--no-error-pingbacks",
        action="store_true",
        help="do not send code=ERROR_CAPTCHA_UNSOLVABLE pingbacks",
    )
    fault.add_argument(
        "--res-502-rate", type=float, default=0.0, help="fraction of res.php -> HTML 502"
    )
    fault.add_argument(
        "--res-502-burst",
        type=int,
        default=0,
        help="the first N res.php requests -> HTML 502 (runtime: POST faults/res-502-burst)",
    )
    fault.add_argument(
        "--in-502-rate", type=float, default=0.0, help="fraction of in.php -> HTML 502"
    )
    fault.add_argument(
        "--plain-error-rate",
        type=float,
        default=0.0,
        help="fraction of error replies in plain text despite json=1",
    )
    fault.add_argument(
        "--server-error-rate",
        type=float,
        default=0.0,
        help="fraction of requests answered ERROR_SERVER_ERROR",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """Build the frozen configuration from parsed arguments."""
    solve_times = dict(DEFAULT_SOLVE_TIMES)
    solve_times.update(dict(args.solve_time))
    faults = Faults(
        pingback_style=PingbackStyle(args.pingback_style),
        pingback_drop_rate=args.pingback_drop_rate,
        pingback_duplicate_rate=args.pingback_duplicate_rate,
        pingback_delay=args.pingback_delay,
        pingback_late_rate=args.pingback_late_rate,
        pingback_late_delay=args.pingback_late_delay,
        pingback_reorder_window=args.pingback_reorder_window,
        pingback_retries=args.pingback_retries,
        pingback_retry_delay=args.pingback_retry_delay,
        pingback_timeout=args.pingback_timeout,
        pingback_errors=not args.no_error_pingbacks,
        res_502_rate=args.res_502_rate,
        in_502_rate=args.in_502_rate,
        plain_error_rate=args.plain_error_rate,
        server_error_rate=args.server_error_rate,
    )
    return EmulatorConfig(
        seed=args.seed,
        api_keys=frozenset(args.keys or [DEFAULT_API_KEY]),
        threads=args.threads,
        busy=BusyBehaviour(args.busy),
        unsolvable_rate=args.unsolvable_rate,
        solve_times=solve_times,
        solve_time_scale=args.solve_time_scale,
        retention_seconds=args.retention_seconds,
        max_tasks=args.max_tasks,
        id_type=IdType(args.id_type),
        balance=args.balance,
        price=args.price,
        report_window_seconds=args.report_window_seconds,
        max_user_turn=args.max_user_turn,
        max_user_turn_limit=args.max_user_turn_limit,
        max_user_turn_window=args.max_user_turn_window,
        max_user_turn_ban=args.max_user_turn_ban,
        res_rate_limit=args.res_rate_limit,
        res_limit_per_task=args.res_limit_per_task,
        res_limit_base=args.res_limit_base,
        res_limit_window=args.res_limit_window,
        res_limit_block=args.res_limit_block,
        ban_after_bad_keys=args.ban_after_bad_keys,
        ban_seconds=args.ban_seconds,
        bulk_max_ids=args.bulk_max_ids,
        pingback_hosts=frozenset(args.pingback_host),
        faults=faults,
    )


async def _serve(
    config: EmulatorConfig,
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    res_502_burst: int,
) -> None:
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None)  # GET requests may carry keys in the URL
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
        if res_502_burst:
            app[runtime_key].state.res_502_burst = res_502_burst
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        bound_host, bound_port = runner.addresses[0][:2]
        scheme = "https" if ssl_context is not None else "http"
        print(f"captchatask emulator listening on {scheme}://{bound_host}:{bound_port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the emulator until SIGINT/SIGTERM; return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"captchatask emulator: {exc}", file=sys.stderr)
        return _EXIT_USAGE
    ssl_context = None
    if args.tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            _serve(
                config,
                host=args.host,
                port=args.port,
                ssl_context=ssl_context,
                res_502_burst=args.res_502_burst,
            )
        )
    return 0
