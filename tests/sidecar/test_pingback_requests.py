"""Request validation of the pingback route, in process, against an API server that is not there.

The receiver's API client points at a closed port, so any API call would fail and be counted
(``ledger_write_errors{unavailable}``) and the result spooled. Every refusal below must leave
both at zero: nothing written, no API call made.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from yarl import URL

from captchatask import kube, signing, testbed
from captchatask.decision import Result
from captchatask.ledger import Ledger
from captchatask.model import TaskRef
from captchatask.provider.codes import Dialect
from captchatask_sidecar.metrics import Metrics
from captchatask_sidecar.pingback import OUTCOME_HEADER, PingbackReceiver, create_pingback_app
from captchatask_sidecar.recorder import Recorder
from captchatask_sidecar.spool import Spool

NAMESPACE = "apps"
REF = TaskRef(NAMESPACE, "task-1", "6a1f8a43-0a51-4b8e-9d5c-3f3b7e0d2a11")
MAX_BODY = 4096

AiohttpClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


@dataclass
class Receiver:
    client: TestClient[web.Request, web.Application]
    metrics: Metrics
    spool: Spool
    signer: signing.PingbackSigner

    def path(self, ref: TaskRef = REF) -> str:
        return self.signer.path(ref)

    def value(self, name: str, namespace: str = NAMESPACE, **labels: str) -> float:
        sample = self.metrics.registry.get_sample_value(name, {"namespace": namespace, **labels})
        assert sample is not None, name
        return sample

    def assert_nothing_written(self) -> None:
        assert self.spool.depth == 0
        for outcome in ("recorded", "duplicate", "late", "spooled", "dead_lettered"):
            assert self.value("captchatask_pingbacks_total", outcome=outcome) == 0
        for reason in ("timeout", "unavailable", "api_error", "dead_letter_failed"):
            assert self.value("captchatask_ledger_write_errors_total", reason=reason) == 0


@pytest.fixture
async def receiver(
    tmp_path: Path, aiohttp_client: AiohttpClient, signer: signing.PingbackSigner
) -> AsyncIterator[Receiver]:
    (closed_port,) = testbed.free_ports(1)
    config = kube.KubeConfig(server=f"https://127.0.0.1:{closed_port}", verify=False)
    metrics = Metrics(CollectorRegistry())
    metrics.serve([NAMESPACE])
    spool = Spool(tmp_path / "spool")
    spool.open()
    async with aiohttp.ClientSession(connector=kube.connector(config)) as session:
        recorder = Recorder(
            ledger=Ledger(kube.KubeClient(config, session), timeout=0.5),
            spool=spool,
            metrics=metrics,
            budget=0.5,
            received_by="test",
        )
        app = create_pingback_app(
            PingbackReceiver(
                namespaces=frozenset({NAMESPACE}),
                signer=signer,
                recorder=recorder,
                metrics=metrics,
                dialect=Dialect.CAPTCHAAI,
                max_body_bytes=MAX_BODY,
                read_timeout=0.5,
            )
        )
        client = await aiohttp_client(app)
        yield Receiver(client=client, metrics=metrics, spool=spool, signer=signer)
    await spool.close()


async def test_a_forged_token_is_refused_before_anything_happens(receiver: Receiver) -> None:
    forged = receiver.path()[:-4] + "AAAA"
    response = await receiver.client.get(forged, params={"id": "1", "code": "tok"})
    assert response.status == 403
    assert response.content_type == "application/problem+json"
    assert (await response.json())["detail"] == "forbidden"
    receiver.assert_nothing_written()
    # Not authenticated, so nobody's: counted with an empty namespace, never as the path's.
    assert receiver.value("captchatask_pingbacks_total", "", outcome="rejected") == 1
    assert receiver.value("captchatask_pingbacks_total", outcome="rejected") == 0


async def test_a_token_for_one_task_does_not_open_another(receiver: Receiver) -> None:
    other = TaskRef(NAMESPACE, "task-2", REF.uid)
    token = receiver.path().rsplit("/", 1)[1]
    path = receiver.path(other).rsplit("/", 1)[0] + "/" + token
    response = await receiver.client.post(path, data={"id": "1", "code": "tok"})
    assert response.status == 403
    receiver.assert_nothing_written()


@pytest.mark.parametrize(
    "path",
    [
        "/v1/pingback/other-ns/task-1/6a1f8a43-0a51-4b8e-9d5c-3f3b7e0d2a11/AAAAAAAAAAAAAAAAAAAAAAAA",
        "/v1/pingback/apps/Task_1/6a1f8a43-0a51-4b8e-9d5c-3f3b7e0d2a11/AAAAAAAAAAAAAAAAAAAAAAAA",
        "/v1/pingback/apps/task-1/not-a-uid/AAAAAAAAAAAAAAAAAAAAAAAA",
        "/v1/pingback/apps/task-1/6a1f8a43-0a51-4b8e-9d5c-3f3b7e0d2a11/short",
        "/v1/pingback/apps/task-1",
        "/v1/pingbacks",
    ],
)
async def test_paths_that_cannot_be_ours_are_not_found(receiver: Receiver, path: str) -> None:
    response = await receiver.client.get(path, params={"id": "1", "code": "tok"})
    assert response.status == 404
    assert response.content_type == "application/problem+json"
    receiver.assert_nothing_written()


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"id": "1"},
        {"code": "tok"},
        {"id": "1;DROP", "code": "tok"},
        {"id": "1", "code": ""},
    ],
)
async def test_a_malformed_query_is_a_bad_request(
    receiver: Receiver, query: dict[str, str]
) -> None:
    response = await receiver.client.get(receiver.path(), params=query)
    assert response.status == 400
    receiver.assert_nothing_written()


async def test_an_oversize_body_is_refused_without_being_read(receiver: Receiver) -> None:
    body = b"id=1&code=" + b"x" * (MAX_BODY * 4)
    response = await receiver.client.post(
        receiver.path(),
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status == 413
    receiver.assert_nothing_written()


async def test_an_oversize_chunked_body_is_refused(receiver: Receiver) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"id=1&code="
        for _ in range(16):
            yield b"x" * 1024

    response = await receiver.client.post(
        receiver.path(),
        data=chunks(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status == 413
    receiver.assert_nothing_written()


async def test_a_body_that_trickles_in_too_slowly_times_out(receiver: Receiver) -> None:
    async def slow() -> AsyncIterator[bytes]:
        yield b"id=1&"
        await asyncio.sleep(2)
        yield b"code=x"

    response = await receiver.client.post(
        receiver.path(),
        data=slow(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status == 408
    receiver.assert_nothing_written()


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("application/json", b'{"taskId": 1, "status": "processing"}', 400),
        ("application/json", b"{", 400),
        ("application/x-www-form-urlencoded", b"id=1&code=a&code=b", 400),
        ("application/x-www-form-urlencoded", b"\xff\xfe=1", 400),
        ("application/xml", b"<id>1</id>", 415),
        ("application/x-www-form-urlencoded", b"id=1&code=CAPCHA_NOT_READY", 422),
    ],
)
async def test_malformed_bodies_are_refused(
    receiver: Receiver, content_type: str, body: bytes, status: int
) -> None:
    response = await receiver.client.post(
        receiver.path(), data=body, headers={"Content-Type": content_type}
    )
    assert response.status == status
    receiver.assert_nothing_written()


async def test_other_methods_get_a_problem_document(receiver: Receiver) -> None:
    response = await receiver.client.put(receiver.path(), data=b"id=1&code=x")
    assert response.status == 405
    assert response.content_type == "application/problem+json"
    receiver.assert_nothing_written()


async def test_a_valid_pingback_with_the_api_server_away_is_spooled(receiver: Receiver) -> None:
    response = await receiver.client.get(receiver.path(), params={"id": "1", "code": "tok"})
    assert response.status == 200
    assert response.headers[OUTCOME_HEADER] == "spooled"
    assert receiver.spool.depth == 1
    assert receiver.value("captchatask_ledger_write_errors_total", reason="unavailable") == 1
    assert receiver.value("captchatask_pingbacks_total", outcome="spooled") == 1


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_does_not_decode_is_a_bad_request(
    receiver: Receiver, encoding: str
) -> None:
    response = await receiver.client.post(
        receiver.path(),
        data=b"id=1&code=not-compressed",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Content-Encoding": encoding,
        },
    )
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    receiver.assert_nothing_written()


def test_result_series_are_per_served_namespace_and_start_at_zero() -> None:
    from captchatask.version import __version__  # noqa: PLC0415

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.serve(["team-a", "team-b"])
    metrics.pingback("team-b", "recorded").inc()
    sample = registry.get_sample_value
    recorded = {"outcome": "recorded"}
    assert sample("captchatask_pingbacks_total", {"namespace": "team-a", **recorded}) == 0
    assert sample("captchatask_pingbacks_total", {"namespace": "team-b", **recorded}) == 1
    for name, label, value in (
        ("captchatask_spool_replays_total", "outcome", "retry"),
        ("captchatask_ledger_write_errors_total", "reason", "timeout"),
    ):
        assert sample(name, {"namespace": "team-a", label: value}) == 0
    assert sample("captchatask_build_info", {"version": __version__}) == 1


# -- authentic pingbacks with hostile content: a clear 4xx, never a mangled token ---------------


async def test_json_nested_a_thousand_deep_is_a_bad_request(receiver: Receiver) -> None:
    deep = b'{"taskId": 1, "status": "ready", "solution": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    response = await receiver.client.post(
        receiver.path(), data=deep, headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    assert "nested" in (await response.json())["detail"]
    receiver.assert_nothing_written()


@pytest.mark.parametrize(
    "query",
    [
        "id=1&code=%FF",
        "id=1&code=tok%FFen",
        "id=1&code=%ED%B3%BF",  # an encoded lone surrogate: not UTF-8 either
        "id=%FF1&code=tok",
        "id=1&code=tok&userAgent=%C0%AF",
    ],
)
async def test_a_query_that_is_not_utf8_is_refused_not_mangled(
    receiver: Receiver, query: str
) -> None:
    response = await receiver.client.get(URL(receiver.path() + "?" + query, encoded=True))
    assert response.status == 400
    assert (await response.json())["detail"] == "a field is not UTF-8"
    receiver.assert_nothing_written()


@pytest.mark.parametrize(
    "body",
    [
        b"id=1&code=%FF",
        b"id=1&code=tok%FFen",
        b"id=1&code=tok\xffen",
        b"id=1&code=%ED%B3%BF",
    ],
)
async def test_a_form_body_that_is_not_utf8_is_refused_not_mangled(
    receiver: Receiver, body: bytes
) -> None:
    response = await receiver.client.post(
        receiver.path(), data=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    receiver.assert_nothing_written()


@pytest.mark.parametrize(
    "body",
    [
        b'{"taskId": 1, "status": "ready", "solution": {"token": "tok\\udcffen"}}',
        b'{"taskId": 1, "status": "ready", "solution": {"token": "t", "userAgent": "\\ud800"}}',
        b'{"taskId": 1, "status": "ready", "solution": {"token": "tok\xffen"}}',
    ],
)
async def test_a_json_token_that_is_not_unicode_text_is_refused(
    receiver: Receiver, body: bytes
) -> None:
    response = await receiver.client.post(
        receiver.path(), data=body, headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    receiver.assert_nothing_written()


@pytest.mark.parametrize(
    ("raw", "token"),
    [
        ("tok%C3%A9n", "tok\u00e9n"),
        ("%EF%BF%BD", "\ufffd"),  # a replacement character the provider really sent
        ("a%2Bb+c", "a+b c"),
    ],
)
async def test_escaped_utf8_in_a_query_is_kept_exactly(
    receiver: Receiver, raw: str, token: str
) -> None:
    response = await receiver.client.get(URL(receiver.path() + "?id=1&code=" + raw, encoded=True))
    assert response.status == 200
    assert response.headers[OUTCOME_HEADER] == "spooled"
    (entry,) = await receiver.spool.due(float("inf"), 10)
    assert entry.record.result.token == token


async def test_a_multipart_field_whose_charset_decodes_to_a_lone_surrogate_is_refused(
    receiver: Receiver,
) -> None:
    # A guard: a part's own charset is honoured, and Python's UTF-16 decoder refuses a lone
    # surrogate, so this never reaches the spool's UTF-8 encoding.
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="id"\r\n\r\n1\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="code"\r\n'
            "Content-Type: text/plain; charset=utf-16-le\r\n\r\n"
        ).encode()
        + b"t\x00\x00\xd8"
        + f"\r\n--{boundary}--\r\n".encode()
    )
    response = await receiver.client.post(
        receiver.path(),
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    receiver.assert_nothing_written()


# -- errors answered without a middleware ---------------------------------------------------------


async def test_router_errors_are_the_same_problem_documents_without_a_middleware(
    receiver: Receiver,
) -> None:
    # A middleware costs every pingback a wrapper call on the spool path's hot loop; the
    # pingback application answers unknown paths and methods itself, byte for byte as before.
    assert not receiver.client.app.middlewares
    not_found = await receiver.client.get("/v1/pingbacks", params={"id": "1", "code": "tok"})
    assert not_found.status == 404
    assert not_found.headers["Content-Type"] == "application/problem+json"
    assert await not_found.read() == b'{"type":"about:blank","title":"Not Found","status":404}'
    for method in ("PUT", "DELETE", "HEAD", "PATCH"):
        refused = await receiver.client.request(method, receiver.path())
        assert refused.status == 405, method
        assert refused.headers["Content-Type"] == "application/problem+json"
        assert refused.headers["Allow"] == "GET,POST"
        if method != "HEAD":
            assert await refused.read() == (
                b'{"type":"about:blank","title":"Method Not Allowed","status":405,'
                b'"detail":"method not allowed"}'
            )
    # A method other than GET/POST on a path that is not ours is still "not found".
    elsewhere = await receiver.client.put("/v1/pingback/apps/task-1")
    assert elsewhere.status == 404
    receiver.assert_nothing_written()


class CrashingRecorder(Recorder):
    """A recorder with a bug: what the pingback route answers when its own code fails.

    ``admit`` is where every pingback enters the recorder (``accept`` goes through it too).
    """

    def admit(self, ref: TaskRef, result: Result, *, source: str) -> asyncio.Future[int]:
        raise RuntimeError(f"bug while recording {ref.name}")


async def test_a_crash_is_a_bare_500_problem_document_logged_without_the_token(
    tmp_path: Path,
    aiohttp_client: AiohttpClient,
    signer: signing.PingbackSigner,
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics(CollectorRegistry())
    spool = Spool(tmp_path / "spool")
    spool.open()
    config = kube.KubeConfig(server="https://127.0.0.1:1", verify=False)
    async with aiohttp.ClientSession() as session:
        recorder = CrashingRecorder(
            ledger=Ledger(kube.KubeClient(config, session)),
            spool=spool,
            metrics=metrics,
            budget=0.5,
            received_by="test",
        )
        app = create_pingback_app(
            PingbackReceiver(
                namespaces=frozenset({NAMESPACE}),
                signer=signer,
                recorder=recorder,
                metrics=metrics,
                dialect=Dialect.CAPTCHAAI,
                max_body_bytes=MAX_BODY,
                read_timeout=0.5,
            )
        )
        client = await aiohttp_client(app)
        path = signer.path(REF)
        response = await client.get(path, params={"id": "1", "code": "secret-solution"})
        assert response.status == 500
        assert response.headers["Content-Type"] == "application/problem+json"
        assert await response.read() == (
            b'{"type":"about:blank","title":"Internal Server Error","status":500,'
            b'"detail":"internal error"}'
        )
    await spool.close()
    logged = [r for r in caplog.records if r.exc_info is not None]
    assert [r.getMessage() for r in logged] == [
        "unexpected error handling GET /v1/pingback/{namespace}/{name}/{uid}/{token}"
    ]
    text = caplog.text
    assert path.rsplit("/", 1)[-1] not in text
    assert "secret-solution" not in text
