"""The attack suite's target: the whole stack, with the sidecar as a real process.

One :class:`captchatask.stack.Stack` (control plane, emulator, sidecar, operator) serves every
test in this package. The operator is stopped right after start: the suite attacks the sidecar,
and with nobody else writing, "nothing changed" can be checked exactly (every object's
resourceVersion, the dead letters, the Events, the spool and the sidecar's own counters).

Requests are written to raw sockets (:class:`Raw`): an attacker is not bound by what an HTTP
client library is willing to send.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from captchatask import model, signing
from captchatask.model import TaskRef
from captchatask.stack import Stack, StackConfig

NAMESPACE = "attack"
#: The sidecar's read timeout in this suite (slow-loris bound), seconds.
READ_TIMEOUT = 2
#: Largest pingback body the sidecar accepts in this suite.
MAX_BODY = 16 * 1024
#: A hang guard for socket reads (never an assertion about speed).
SOCKET_PATIENCE = 30.0
#: Sidecar outcomes that mean "something was accepted and written".
WRITING_OUTCOMES = ("recorded", "duplicate", "late", "spooled", "dead_lettered")
RECAPTCHA_KEY = "6Le-wvkSAAAAAPBMRTvw0Q4Muexq9bi0DJwx_mJ-"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the secrets scan last: it scans what every other attack left behind."""
    scan = [item for item in items if "attack/test_secrets" in item.nodeid]
    rest = [item for item in items if "attack/test_secrets" not in item.nodeid]
    items[:] = rest + scan


@dataclass(frozen=True)
class Reply:
    """What came back on a raw connection."""

    status: int | None
    headers: dict[str, str]
    body: bytes
    closed_by_server: bool


class Raw:
    """HTTP/1.1 over a raw socket: send exactly these bytes, read one reply."""

    def __init__(self, port: int) -> None:
        self.port = port

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=SOCKET_PATIENCE)
        sock.settimeout(SOCKET_PATIENCE)
        return sock

    def send(self, data: bytes) -> Reply:
        with self.connect() as sock:
            sock.sendall(data)
            return self.read_reply(sock)

    @staticmethod
    def read_reply(sock: socket.socket) -> Reply:
        chunks: list[bytes] = []
        closed = False
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
            data = b"".join(chunks)
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                headers = _headers(head)
                length = int(headers.get("content-length", "-1"))
                if length >= 0 and len(rest) >= length:
                    break
        data = b"".join(chunks)
        head, _, body = data.partition(b"\r\n\r\n")
        status: int | None = None
        if head.startswith(b"HTTP/"):
            status = int(head.split(b" ", 2)[1])
        return Reply(status, _headers(head), body, closed)

    def request(
        self,
        method: str,
        target: str,
        *,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> Reply:
        lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{self.port}"]
        all_headers = {"Connection": "close", **(headers or {})}
        if body and "Transfer-Encoding" not in all_headers:
            all_headers.setdefault("Content-Length", str(len(body)))
        lines += [f"{k}: {v}" for k, v in all_headers.items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        return self.send(head + body)


def _headers(head: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            out[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
    return out


@dataclass
class Target:
    """The running stack plus what the attacks need to know about it."""

    stack: Stack
    signer: signing.PingbackSigner
    pingback: Raw
    local: Raw
    admin: Raw
    read_timeout: float = READ_TIMEOUT
    max_body: int = MAX_BODY
    writing_outcomes: tuple[str, ...] = WRITING_OUTCOMES

    # -- helpers (fixtures, not imports: test modules cannot import each other) --------------
    @staticmethod
    def random_ref(name: str | None = None) -> TaskRef:
        return TaskRef(NAMESPACE, name or f"ghost-{secrets.token_hex(3)}", str(uuid.uuid4()))

    @staticmethod
    def wait_for(predicate: Any, *, timeout: float = SOCKET_PATIENCE, what: str = "") -> None:
        """Poll until true; fail after ``timeout`` (a hang guard, not a timing assertion)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.1)

    @staticmethod
    def json_body(reply: Reply) -> Any:
        return json.loads(reply.body) if reply.body else None

    # -- objects ---------------------------------------------------------------------------
    def create_task(self, name: str, *, provider_task_id: str | None = None) -> TaskRef:
        """An adopted (external) task: the operator would never submit it."""
        spec: dict[str, Any] = {
            "type": "RecaptchaV2",
            "siteKey": RECAPTCHA_KEY,
            "pageURL": "https://shop.example.com/login",
            "external": True,
        }
        if provider_task_id:
            spec["providerTaskId"] = provider_task_id
        self.stack.apply(
            [
                {
                    "apiVersion": model.API_VERSION,
                    "kind": model.TASK_KIND,
                    "metadata": {"name": name},
                    "spec": spec,
                }
            ]
        )
        body = self.stack.get_json("ctask", name)
        return TaskRef(NAMESPACE, name, body["metadata"]["uid"])

    def task(self, name: str) -> dict[str, Any]:
        return dict(self.stack.get_json("ctask", name))

    def path(self, ref: TaskRef) -> str:
        return self.signer.path(ref)

    # -- observation -----------------------------------------------------------------------
    def sidecar_metrics_text(self) -> str:
        with urllib.request.urlopen(self.stack.sidecar_metrics_url, timeout=10) as reply:
            return str(reply.read().decode())

    def sidecar_counter(self, name: str, **labels: str) -> float:
        total = 0.0
        for family in text_string_to_metric_families(self.sidecar_metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total

    def state(self) -> dict[str, Any]:
        """Everything a successful attack would have to change."""
        tasks = self.stack.get_json("ctask")["items"]
        letters = self.stack.get_json("cdl")["items"]
        events = self.stack.get_json("events")["items"]
        return {
            "tasks": {t["metadata"]["name"]: t["metadata"]["resourceVersion"] for t in tasks},
            "dead_letters": sorted(d["metadata"]["name"] for d in letters),
            "events": sorted(e["metadata"]["name"] for e in events),
            "spool_bytes": self.spool_bytes(),
            "accepted": {
                outcome: self.sidecar_counter("captchatask_pingbacks_total", outcome=outcome)
                for outcome in WRITING_OUTCOMES
            },
        }

    def spool_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.stack.spool_dir.glob("spool-*.log"))

    def sidecar_rss_bytes(self) -> int:
        pid = self.stack.processes["sidecar"].pid
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def sidecar_alive(self) -> bool:
        return self.stack.processes["sidecar"].alive()


@pytest.fixture(scope="package")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    workdir = tmp_path_factory.mktemp("attack-stack")
    config = StackConfig(
        workdir=workdir,
        namespace=NAMESPACE,
        seed=11,
        sidecar_args=[
            *("--read-timeout-seconds", str(READ_TIMEOUT)),
            *("--max-body-bytes", str(MAX_BODY)),
            "--access-log",
        ],
    )
    stack = Stack(config)
    try:
        stack.start()
    except Exception:
        stack.stop()
        raise
    try:
        # Nobody but the sidecar writes from here on: "nothing changed" is then exact.
        stack.kill("operator")
        signer = signing.PingbackSigner(signing.load_keys(stack.key_file))
        admin_port = int(stack.sidecar_metrics_url.rsplit(":", 1)[1].split("/", 1)[0])
        yield Target(
            stack=stack,
            signer=signer,
            pingback=Raw(stack.pingback_port),
            local=Raw(stack.local_port),
            admin=Raw(admin_port),
        )
    finally:
        stack.stop()
