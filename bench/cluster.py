"""The benchmarks' side of a running :class:`~captchatask.stack.Stack`: objects, metrics, versions.

* :func:`kube_session` opens an async API client as the admin kubeconfig (the benchmark plays the
  application and the cluster admin, never a component);
* :func:`create_submitted_tasks` puts N tasks into ``Submitted`` with provider ids, exactly the
  status the operator writes after ``in.php`` (through :meth:`captchatask.ledger.Ledger.
  update_status`, the only way task status is written), so every pingback sent to them records
  one result — with no operator and no solver involved;
* Prometheus text from the components, etcd's ``/metrics`` and the API server's ``/metrics``
  are parsed into plain dicts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import re
import ssl
import urllib.request
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from captchatask import kube, model
from captchatask.decision import CONDITION_SUBMITTED, set_condition
from captchatask.ledger import Ledger
from captchatask.model import Phase, TaskRef, TaskView
from captchatask.stack import Stack

API_VERSION: Final = f"{model.GROUP}/v1alpha1"
#: A realistic Turnstile site key (the emulator validates shapes like the real service).
TURNSTILE_SITE_KEY: Final = "0x4AAAAAAABkMYinukE8nzYS"
RECAPTCHA_SITE_KEY: Final = "6Le-wvkSAAAAAPBMRTvw0Q4Muexq9bi0DJwx_mJ-"
PAGE_URL: Final = "https://shop.example/login"
#: Concurrent writes when preparing objects (the API server, not us, is the limit).
CREATE_CONCURRENCY: Final = 32
_SAMPLE: Final = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL: Final = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@contextlib.asynccontextmanager
async def kube_session(stack: Stack) -> AsyncIterator[kube.KubeClient]:
    """An API client for the stack's control plane (admin kubeconfig)."""
    config = kube.load_config(str(stack.plane.kubeconfig))
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:
        yield kube.KubeClient(config, session)


def task_body(name: str, *, task_type: str = "Turnstile", **spec: Any) -> dict[str, Any]:
    """A CaptchaTask manifest with a realistic site key and page URL."""
    site_key = TURNSTILE_SITE_KEY if task_type == "Turnstile" else RECAPTCHA_SITE_KEY
    return {
        "apiVersion": API_VERSION,
        "kind": "CaptchaTask",
        "metadata": {"name": name},
        "spec": {"type": task_type, "siteKey": site_key, "pageURL": PAGE_URL, **spec},
    }


async def bounded(coros: Iterable[Any], *, limit: int = CREATE_CONCURRENCY) -> list[Any]:
    """Run coroutines with at most ``limit`` in flight; results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(coro: Any) -> Any:
        async with gate:
            return await coro

    return await asyncio.gather(*(one(coro) for coro in coros))


@dataclass(frozen=True, slots=True)
class SubmittedTask:
    """A task put into ``Submitted`` by the benchmark, with its provider id."""

    ref: TaskRef
    provider_task_id: str


async def create_submitted_tasks(
    client: kube.KubeClient, namespace: str, *, prefix: str, count: int, first_id: int
) -> list[SubmittedTask]:
    """Create ``count`` tasks and write ``Submitted`` status with provider ids on each.

    The status is what the operator writes after ``in.php`` answered (phase, provider id,
    ``submittedAt``, the ``Submitted`` condition), written through the shared ledger.
    """
    ledger = Ledger(client)

    async def one(index: int) -> SubmittedTask:
        body = await client.create(kube.TASKS, namespace, task_body(f"{prefix}-{index:05d}"))
        view = TaskView.from_body(body)
        provider_task_id = str(first_id + index)
        now = dt.datetime.now(dt.UTC)
        fields = {
            "phase": str(Phase.SUBMITTED),
            "providerTaskId": provider_task_id,
            "submittedAt": model.format_time(now),
            "polls": 0,
            "observedGeneration": view.generation,
            "conditions": set_condition(
                [],
                type_=CONDITION_SUBMITTED,
                status="True",
                reason="Submitted",
                message="prepared by the benchmark",
                generation=view.generation,
                now=now,
            ),
        }
        written = await ledger.update_status(view, fields)
        if written is None:
            raise RuntimeError(f"could not prepare {view.ref.name}")
        return SubmittedTask(ref=view.ref, provider_task_id=provider_task_id)

    return await bounded(one(index) for index in range(count))


def parse_prometheus(text: str) -> Samples:
    """Parse Prometheus text exposition into ``{(name, labels): value}``."""
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        labels = frozenset(_LABEL.findall(match.group(2) or ""))
        try:
            samples[match.group(1), labels] = float(match.group(3))
        except ValueError:
            continue
    return samples


def metric_sum(samples: Samples, name: str, **labels: str) -> float:
    """Sum every sample of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(
        value for (metric, have), value in samples.items() if metric == name and wanted <= have
    )


def fetch_text(url: str, *, context: ssl.SSLContext | None = None, timeout: float = 30) -> str:
    """GET a URL (loopback only) and return the body as text."""
    with urllib.request.urlopen(url, timeout=timeout, context=context) as reply:
        body: bytes = reply.read()
    return body.decode("utf-8", "replace")


def scrape(url: str) -> Samples:
    """Scrape one ``/metrics`` endpoint."""
    return parse_prometheus(fetch_text(url))


def apiserver_metrics(stack: Stack) -> Samples:
    """The kube-apiserver's own ``/metrics`` (via kubectl, which holds the admin credentials)."""
    return parse_prometheus(stack.plane.kubectl("get", "--raw", "/metrics").stdout)


def versions(stack: Stack) -> dict[str, Any]:
    """Kubernetes and etcd versions of the running test bed."""
    out: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        out["kube_apiserver"] = json.loads(stack.plane.kubectl("get", "--raw", "/version").stdout)[
            "gitVersion"
        ]
    with contextlib.suppress(Exception):
        out["etcd"] = json.loads(fetch_text(stack.plane.etcd_url + "/version"))["etcdserver"]
    return out


def etcd_post(stack: Stack, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST to etcd's JSON gateway (``/v3/...``) and decode the answer."""
    request = urllib.request.Request(
        stack.plane.etcd_url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        decoded: dict[str, Any] = json.loads(reply.read())
    return decoded


def etcd_sizes(stack: Stack) -> dict[str, float]:
    """etcd's database size on disk and in use (bytes), from its ``/metrics``."""
    samples = scrape(stack.plane.etcd_url + "/metrics")
    return {
        "db_total_bytes": metric_sum(samples, "etcd_mvcc_db_total_size_in_bytes"),
        "db_in_use_bytes": metric_sum(samples, "etcd_mvcc_db_total_size_in_use_in_bytes"),
    }


def etcd_prefix_bytes(stack: Stack, prefix: str) -> dict[str, int]:
    """Keys under ``prefix`` and the bytes of their current values (what the objects weigh)."""
    start = prefix.encode()
    end = start[:-1] + bytes([start[-1] + 1])
    reply = etcd_post(
        stack,
        "/v3/kv/range",
        {"key": base64.b64encode(start).decode(), "range_end": base64.b64encode(end).decode()},
    )
    values = [len(base64.b64decode(kv.get("value", ""))) for kv in reply.get("kvs", [])]
    return {"keys": len(values), "value_bytes": sum(values)}


def etcd_compact_and_defragment(stack: Stack) -> bool:
    """Compact etcd to its current revision and defragment it; ``False`` if that failed.

    The API server compacts every 5 minutes on its own; doing it now shows the steady-state
    size (without the MVCC history of every status write) that sizing should use.
    """
    try:
        header = etcd_post(stack, "/v3/kv/range", {"key": "AA=="})["header"]
        etcd_post(stack, "/v3/kv/compaction", {"revision": header["revision"], "physical": True})
        etcd_post(stack, "/v3/maintenance/defragment", {})
    except (OSError, KeyError, ValueError):
        return False
    return True
