"""The OpenAPI document describes exactly the routes the three applications serve."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import yaml
from aiohttp import hdrs
from prometheus_client import CollectorRegistry

from captchatask import kube, signing
from captchatask.ledger import Ledger
from captchatask.provider.codes import Dialect
from captchatask_sidecar.admin import Health, create_admin_app
from captchatask_sidecar.local_api import LocalApi, create_local_app
from captchatask_sidecar.metrics import Metrics
from captchatask_sidecar.pingback import PingbackReceiver, create_pingback_app
from captchatask_sidecar.recorder import Recorder
from captchatask_sidecar.spool import Spool
from captchatask_sidecar.watch import TaskHub

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi" / "sidecar.yaml"


async def test_every_served_route_is_documented_and_nothing_else(
    tmp_path: Path, signer: signing.PingbackSigner
) -> None:
    config = kube.KubeConfig(server="https://127.0.0.1:1", verify=False)
    metrics = Metrics(CollectorRegistry())
    spool = Spool(tmp_path)
    async with aiohttp.ClientSession() as session:
        client = kube.KubeClient(config, session)
        ledger = Ledger(client)
        recorder = Recorder(
            ledger=ledger, spool=spool, metrics=metrics, budget=0.5, received_by="t"
        )
        apps = [
            create_pingback_app(
                PingbackReceiver(
                    namespaces=frozenset({"a"}),
                    signer=signer,
                    recorder=recorder,
                    metrics=metrics,
                    dialect=Dialect.CAPTCHAAI,
                    max_body_bytes=1024,
                    read_timeout=1.0,
                )
            ),
            create_local_app(
                LocalApi(
                    client=client,
                    ledger=ledger,
                    hub=TaskHub(client, "a", metrics),
                    signer=signer,
                    metrics=metrics,
                    namespace="a",
                    provider="default",
                    public_url=None,
                    created_by="t",
                    max_wait=1.0,
                    max_body_bytes=1024,
                    read_timeout=1.0,
                ),
                max_body_bytes=1024,
            ),
            create_admin_app(
                registry=metrics.registry, health=Health(spool=spool, metrics=metrics), probe=False
            ),
        ]
    # The pingback app's catch-all only answers 404/405 problem documents: not an API route.
    served = {
        (route.method.lower(), route.resource.canonical)
        for app in apps
        for route in app.router.routes()
        if route.resource is not None and route.method != hdrs.METH_ANY
    }
    paths = yaml.safe_load(DOC.read_text(encoding="utf-8"))["paths"]
    documented = {
        (method, path)
        for path, item in paths.items()
        for method in item
        if method in {"get", "post", "put", "delete", "patch"}
    }
    assert served == documented
