"""The raw ceiling's probe sends, byte for byte, the write a pingback's result makes.

Every ledger figure of ``make bench`` is a ratio to that ceiling, so a probe writing a different
(smaller) patch would measure another write and make the ratio say nothing. Both writers send
to one real HTTP server here, which keeps what each sent and answers like the API server.
``bench`` is a directory of the repository, not an installed package, so it is imported from the
repository root.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

import aiohttp
import pytest
from aiohttp import web

from captchatask import kube
from captchatask.decision import Result
from captchatask.ledger import Ledger
from captchatask.model import DeliveredBy, TaskRef

if TYPE_CHECKING:
    from tests.bench.conftest import BenchImport

NOW = dt.datetime(2026, 5, 4, 3, 2, 1, tzinfo=dt.UTC)
TOKEN = "0.token-of-the-bench"


@dataclass
class KeepingApiServer:
    """Keeps every PATCH body it receives; answers with a task (all a ledger reads back)."""

    bodies: list[tuple[str, str, bytes]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(
            (request.path, request.headers.get("Content-Type", ""), await request.read())
        )
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        return web.json_response(
            {
                "metadata": {"namespace": namespace, "name": name, "uid": "u-1"},
                "status": {"phase": "Solved"},
            }
        )


@pytest.fixture
def bench_modules(bench_import: BenchImport) -> tuple[ModuleType, ModuleType]:
    """``bench.ceiling`` and ``bench.cluster``, imported from the checkout."""
    return bench_import("ceiling"), bench_import("cluster")


@pytest.fixture
async def server() -> AsyncIterator[KeepingApiServer]:
    keeper = KeepingApiServer()
    app = web.Application()
    app.router.add_patch(
        "/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}/status", keeper.handle
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    keeper.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield keeper
    await runner.cleanup()


async def test_the_probe_sends_the_same_patch_as_the_ledger_for_a_pingback(
    server: KeepingApiServer, bench_modules: tuple[ModuleType, ModuleType]
) -> None:
    ceiling, cluster = bench_modules
    task = cluster.SubmittedTask(
        ref=TaskRef("bench", "ceil-0", "u-1"), provider_task_id="8100000000"
    )
    config = kube.KubeConfig(server=server.url)

    report = await ceiling.probe(config, [task], token=TOKEN, in_flight=1, clock=lambda: NOW)
    async with aiohttp.ClientSession() as session:
        ledger = Ledger(kube.KubeClient(config, session), clock=lambda: NOW)
        await ledger.record(
            task.ref,
            Result.solved(
                token=TOKEN,
                delivered_by=DeliveredBy.PINGBACK,
                provider_task_id=task.provider_task_id,
            ),
        )

    assert report["ok"] == 1
    probe_sent, ledger_sent = server.bodies
    assert probe_sent == ledger_sent
