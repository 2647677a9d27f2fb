"""An open-loop, fixed-rate HTTP load generator (p50/p99/max at a given request rate).

wrk is closed-loop: it sends the next request when the previous one answers, so it cannot hold a
rate and it hides queueing (coordinated omission). Here request *i* is due at ``start + i/rate``
whatever happened to the others, and its latency is measured **from that due time** to the
answer, so a stalled server shows up as latency, not as a lower rate. Requests go over a pool of
keep-alive connections (aiohttp); each line of the paths file is used once, in order, cycling
if there are fewer lines than requests.

Run it as its own process, pinned to the load core (``bench.cores``)::

    taskset -c 1 python -m bench.loadgen --base URL --paths FILE --rate 1000 --seconds 10

It prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp

#: Enough connections that a slow answer never holds back the next due request.
DEFAULT_CONNECTIONS: Final = 256
REQUEST_TIMEOUT_SECONDS: Final = 30.0


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of ``values`` (``fraction`` in 0..1); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, round(fraction * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


async def _one(
    session: aiohttp.ClientSession, url: str, due: float, latencies: list[float], errors: list[str]
) -> None:
    try:
        async with session.get(url) as reply:
            await reply.read()
            if reply.status != 200:
                errors.append(f"HTTP {reply.status}")
                return
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        errors.append(type(exc).__name__)
        return
    latencies.append(time.perf_counter() - due)


async def paced(
    base: str,
    paths: Sequence[str],
    *,
    rate: float,
    seconds: float,
    connections: int = DEFAULT_CONNECTIONS,
) -> dict[str, Any]:
    """Send ``rate`` requests per second for ``seconds``; return latency figures in ms."""
    count = max(1, round(rate * seconds))
    latencies: list[float] = []
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Warm the pool so connection set-up is not billed to the first requests.
        await asyncio.gather(
            *(
                _one(session, base + paths[-1 - i % len(paths)], time.perf_counter(), [], [])
                for i in range(min(16, connections))
            )
        )
        pending: set[asyncio.Task[None]] = set()
        start = time.perf_counter() + 0.05
        lag = 0.0
        for i in range(count):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                lag = max(lag, -delay)
            task = asyncio.create_task(
                _one(session, base + paths[i % len(paths)], due, latencies, errors)
            )
            pending.add(task)
            task.add_done_callback(pending.discard)
        elapsed = time.perf_counter() - start
        await asyncio.gather(*pending)
    ms = [value * 1e3 for value in latencies]
    return {
        "rate_target": rate,
        "requests": count,
        "ok": len(latencies),
        "errors": len(errors),
        "http_5xx": sum(1 for kind in errors if kind.startswith("HTTP 5")),
        # Wall-clock time of the first due request (others compare their own clocks with it).
        "started_at": round(time.time() - (time.perf_counter() - start), 3),
        "error_kinds": sorted(set(errors))[:5],
        "send_seconds": round(elapsed, 3),
        "rate_achieved": round(count / elapsed, 1) if elapsed > 0 else None,
        "max_send_lag_ms": round(lag * 1e3, 3),
        "p50_ms": percentile(ms, 0.50),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": max(ms) if ms else float("nan"),
        "connections": connections,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run, print the JSON result."""
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--base", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--paths", required=True, type=Path, help="file of paths, one a line")
    parser.add_argument("--rate", required=True, type=float, help="requests per second")
    parser.add_argument("--seconds", required=True, type=float, help="how long to send")
    parser.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS)
    args = parser.parse_args(argv)
    paths = [line for line in args.paths.read_text(encoding="utf-8").splitlines() if line]
    result = asyncio.run(
        paced(
            args.base,
            paths,
            rate=args.rate,
            seconds=args.seconds,
            connections=args.connections,
        )
    )
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
