"""Load run of the sidecar's pingback path: acknowledged pingbacks/s and latency percentiles.

Four measurements, one run, same machine:

* ``ceiling``  - the empty aiohttp handler (bench/baselines/empty_aiohttp.py);
* ``spool``    - the sidecar with its API server unreachable (every pingback fsync'd to the spool);
* ``ledger``   - the sidecar with a real etcd + kube-apiserver behind it (every pingback one
  compare-and-set PATCH on a distinct ``Submitted`` task);
* each at full speed with ``wrk`` (closed loop, 64 connections) and at a fixed rate with an
  open-loop aiohttp client (1,000/s spool, 500/s ledger) for p50/p99/max.

Keeping load generator and server apart: the server under test is pinned to CPU 0 with
``taskset``, wrk and the fixed-rate client to CPU 1 (the API server and etcd float, as they must
on a 2-core machine). Usage::

    .venv/bin/python -m bench.sidecar_load [--duration 10] [--tasks 12000]

Needs ``wrk`` (Debian package) and the control-plane binaries (``make testbin``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp

from captchatask import kube, model, signing, testbed
from captchatask.ledger import Ledger, set_condition, utcnow
from captchatask.model import TaskRef, TaskView

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "sidecar_load.json"
SERVER_CPU = "0"
CLIENT_CPU = "1"
CONNECTIONS = 64
NAMESPACE = "bench"

WRK_SCRIPT = """
local paths = {}
for line in io.lines(os.getenv("PATHS_FILE")) do paths[#paths + 1] = line end
local i = 0
request = function()
  i = i + 1
  if i > #paths then i = 1 end
  return wrk.format("GET", paths[i])
end
done = function(summary, latency, requests)
  io.write(string.format("JSON{\\"requests\\":%d,\\"seconds\\":%f,\\"p50\\":%f,\\"p99\\":%f,"
    .. "\\"max\\":%f,\\"errors\\":%d,\\"non2xx\\":%d}\\n",
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3,
    summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout, summary.errors.status))
end
"""


def taskset(cpu: str, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if shutil.which("taskset") else list(argv)


def wait_port(port: int, timeout: float = 30.0) -> None:
    import socket  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


@contextmanager
def process(argv: Sequence[str], *, log: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as handle:
        proc = subprocess.Popen(list(argv), stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_port(port)
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_wrk(base: str, paths: Sequence[str], *, duration: int, workdir: Path) -> dict[str, Any]:
    script = workdir / "paths.lua"
    script.write_text(WRK_SCRIPT)
    paths_file = workdir / "paths.txt"
    paths_file.write_text("\n".join(paths) + "\n")
    argv = taskset(
        CLIENT_CPU,
        ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration}s", "--latency", "-s", str(script), base],
    )
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env={**os.environ, "PATHS_FILE": str(paths_file)},
        check=True,
    ).stdout
    match = re.search(r"JSON(\{.*\})", out)
    assert match, out
    data = json.loads(match.group(1))
    data["rps"] = data["requests"] / data["seconds"]
    return data


async def fixed_rate(
    base: str, paths: Sequence[str], *, rate: float, seconds: float
) -> dict[str, Any]:
    """Open loop: send at ``rate``/s whatever the answers do; latency from the schedule."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(base, connector=connector) as session:

        async def one(path: str, due: float) -> None:
            async with session.get(path) as response:
                await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1
            latencies.append(time.perf_counter() - due)

        tasks = []
        start = time.perf_counter()
        count = int(rate * seconds)
        for index in range(count):
            due = start + index / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(paths[index % len(paths)], due)))
        await asyncio.gather(*tasks)
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3  # noqa: E731
    return {
        "rate": rate,
        "requests": count,
        "p50": pick(0.5),
        "p99": pick(0.99),
        "max": latencies[-1] * 1e3,
        "statuses": statuses,
    }


def fixed_rate_pinned(
    base: str, paths: Sequence[str], *, rate: float, seconds: float, workdir: Path
) -> dict[str, Any]:
    """Run :func:`fixed_rate` in a child pinned to the client CPU."""
    paths_file = workdir / "fixed-paths.json"
    paths_file.write_text(json.dumps(list(paths)))
    argv = taskset(
        CLIENT_CPU,
        [
            sys.executable,
            "-m",
            "bench.sidecar_load",
            "--fixed-rate-child",
            base,
            str(paths_file),
            str(rate),
            str(seconds),
        ],
    )
    out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def sidecar_argv(*, kubeconfig: Path, key: Path, spool: Path, ports: Sequence[int]) -> list[str]:
    return taskset(
        SERVER_CPU,
        [
            sys.executable,
            "-m",
            "captchatask_sidecar",
            f"--kubeconfig={kubeconfig}",
            f"--namespace={NAMESPACE}",
            f"--pingback-key-file={key}",
            f"--spool-dir={spool}",
            f"--pingback-addr=127.0.0.1:{ports[0]}",
            f"--local-addr=127.0.0.1:{ports[1]}",
            f"--admin-addr=127.0.0.1:{ports[2]}",
            "--pod-name=bench",
            "--log-level=WARNING",
        ],
    )


async def make_tasks(kubeconfig: Path, count: int) -> list[TaskRef]:
    config = kube.load_config(str(kubeconfig))
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:
        client = kube.KubeClient(config, session)
        ledger = Ledger(client)
        try:
            await client.create(
                kube.NAMESPACES,
                None,
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
            )
        except kube.ApiError as exc:
            if not exc.conflict:
                raise
        gate = asyncio.Semaphore(48)

        async def one(index: int) -> TaskRef:
            async with gate:
                body = {
                    "apiVersion": model.API_VERSION,
                    "kind": model.TASK_KIND,
                    "metadata": {"name": f"b-{index}", "namespace": NAMESPACE},
                    "spec": {"type": "Turnstile", "siteKey": "k", "pageURL": "https://a.example/"},
                }
                task = TaskView.from_body(await client.create(kube.TASKS, NAMESPACE, body))
                now = utcnow()
                fields = {
                    "phase": "Submitted",
                    "providerTaskId": str(index + 1),
                    "submittedAt": model.format_time(now),
                    "conditions": set_condition(
                        [],
                        type_="Submitted",
                        status="True",
                        reason="Accepted",
                        message="accepted",
                        generation=task.generation,
                        now=now,
                    ),
                }
                assert await ledger.update_status(task, fields) is not None
                return task.ref

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def pingback_paths(signer: signing.PingbackSigner, refs: Sequence[TaskRef]) -> list[str]:
    return [
        f"{signer.path(ref)}?id={int(ref.name.split('-')[1]) + 1}&code=tok-{ref.name}"
        for ref in refs
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--fixed-rate-child":
        base, paths_file, rate, seconds = args[1:5]
        paths = json.loads(Path(paths_file).read_text())
        print(
            json.dumps(
                asyncio.run(fixed_rate(base, paths, rate=float(rate), seconds=float(seconds)))
            )
        )
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--tasks", type=int, default=14000)
    parser.add_argument("--fixed-seconds", type=float, default=5.0)
    opts = parser.parse_args(args)
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "connections": CONNECTIONS,
            "server_cpu": SERVER_CPU,
            "client_cpu": CLIENT_CPU,
        },
    }
    work = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    key = work / "key"
    key.write_text(secrets.token_urlsafe(48) + "\n")
    signer = signing.PingbackSigner(signing.load_keys(key))
    probe_ref = TaskRef(NAMESPACE, "b-0", "00000000-0000-4000-8000-000000000000")
    spool_paths = [f"{signer.path(probe_ref)}?id=1&code=tok-{i}" for i in range(100)]

    port = testbed.free_ports(1)[0]
    with process(
        taskset(
            SERVER_CPU, [sys.executable, "-m", "bench.baselines.empty_aiohttp", "--port", str(port)]
        ),
        log=work / "ceiling.log",
        port=port,
    ):
        base = f"http://127.0.0.1:{port}"
        results["ceiling"] = {
            "wrk": run_wrk(base, spool_paths, duration=opts.duration, workdir=work)
        }
        print("ceiling", results["ceiling"], flush=True)

    ports = testbed.free_ports(3)
    unreachable = work / "unreachable.kubeconfig"
    unreachable.write_text(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: x\n  cluster: {server: 'https://127.0.0.1:"
        f"{testbed.free_ports(1)[0]}', insecure-skip-tls-verify: true}}\n"
        "users:\n- name: x\n  user: {token: t}\n"
        "contexts:\n- name: x\n  context: {cluster: x, user: x}\ncurrent-context: x\n"
    )
    with process(
        sidecar_argv(kubeconfig=unreachable, key=key, spool=work / "spool-a", ports=ports),
        log=work / "spool.log",
        port=ports[0],
    ):
        base = f"http://127.0.0.1:{ports[0]}"
        wrk_result = run_wrk(base, spool_paths, duration=opts.duration, workdir=work)
        fixed = fixed_rate_pinned(
            base, spool_paths, rate=1000, seconds=opts.fixed_seconds, workdir=work
        )
        results["spool"] = {"wrk": wrk_result, "fixed": fixed}
        print("spool", results["spool"], flush=True)

    with testbed.ControlPlane(work / "cp") as plane:
        plane.install_crds(testbed.default_crd_documents())
        started = time.monotonic()
        refs = asyncio.run(make_tasks(plane.kubeconfig, opts.tasks))
        print(
            f"created {len(refs)} Submitted tasks in {time.monotonic() - started:.1f}s", flush=True
        )
        paths = pingback_paths(signer, refs)
        fixed_count = int(500 * opts.fixed_seconds)
        ports = testbed.free_ports(3)
        with process(
            sidecar_argv(kubeconfig=plane.kubeconfig, key=key, spool=work / "spool-b", ports=ports),
            log=work / "ledger.log",
            port=ports[0],
        ):
            base = f"http://127.0.0.1:{ports[0]}"
            fixed = fixed_rate_pinned(
                base, paths[:fixed_count], rate=500, seconds=opts.fixed_seconds, workdir=work
            )
            wrk_result = run_wrk(base, paths[fixed_count:], duration=opts.duration, workdir=work)
            metrics = asyncio.run(_scrape(f"http://127.0.0.1:{ports[2]}/metrics"))
        results["ledger"] = {"wrk": wrk_result, "fixed": fixed, "outcomes": metrics}
        print("ledger", results["ledger"], flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    shutil.rmtree(work, ignore_errors=True)
    return 0


async def _scrape(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    found = re.findall(r'^captchatask_pingbacks_total\{outcome="(\w+)"\} (\S+)$', text, re.M)
    return {name: float(value) for name, value in found}


def table(results: dict[str, Any]) -> str:
    rows = [
        "| run | req/s (wrk, 64 conn) | p50 ms | p99 ms | max ms | fixed rate | p50 | p99 | max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("ceiling", "spool", "ledger"):
        run = results[name]
        w = run["wrk"]
        f = run.get("fixed")
        fixed = (
            f"{f['rate']:.0f}/s | {f['p50']:.2f} | {f['p99']:.2f} | {f['max']:.2f}"
            if f
            else "- | - | - | -"
        )
        closed = f"{w['rps']:.0f} | {w['p50']:.2f} | {w['p99']:.2f} | {w['max']:.2f}"
        rows.append(f"| {name} | {closed} | {fixed} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
