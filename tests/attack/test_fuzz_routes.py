"""Property-based fuzzing of every sidecar route, against the real sidecar process.

Random methods, paths, query strings, bodies, content types, encodings and sizes go to the
pingback listener, the local task API and the admin listener. Properties:

* no answer is a 5xx (a 5xx is a bug: the sidecar crashed on input it should have refused);
* without a valid token nothing changes: no task is touched, no dead letter, no Event, nothing
  spooled, and the sidecar counts no accepted pingback;
* the local API changes state only by answering 201 (each creation is accounted for);
* the sidecar's memory stays bounded and the process stays up.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.controlplane, pytest.mark.slow]

FUZZ = settings(
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: RSS growth allowed over a whole fuzz test (a leak of one buffer per request would exceed it).
RSS_SLACK_BYTES = 48 * 1024 * 1024

METHODS = st.sampled_from(
    [
        "GET",
        "POST",
        "PUT",
        "DELETE",
        "PATCH",
        "HEAD",
        "OPTIONS",
        "TRACE",
        "PROPFIND",
        "get",
        "G\u00e9T",
    ]
) | st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ-_!#", min_size=1, max_size=12)
SEGMENT = (
    st.text(min_size=0, max_size=80)
    | st.sampled_from(
        [
            "..",
            ".",
            "%2e%2e",
            "%00",
            "attack",
            "default",
            "kube-system",
            "a" * 300,
            "\u202e",
            "{name}",
        ]
    )
    | st.from_regex(r"[A-Za-z0-9_-]{22,44}", fullmatch=True)
    | st.uuids().map(str)
)
QUERY_KEYS = st.sampled_from(
    ["id", "code", "json", "key", "token", "wait", "ids", "action"]
) | st.text(max_size=20)
QUERY_VALUES = (
    st.text(max_size=200)
    | st.sampled_from(
        ["ERROR_CAPTCHA_UNSOLVABLE", "CAPCHA_NOT_READY", "1", "", "-1", "1e309", "nan"]
    )
    | st.integers().map(str)
)
CONTENT_TYPES = st.sampled_from(
    [
        "",
        "application/x-www-form-urlencoded",
        "application/x-www-form-urlencoded; charset=latin-1",
        "multipart/form-data; boundary=xyz",
        "multipart/form-data",
        "application/json",
        "application/json; charset=utf-16",
        "text/json",
        "text/plain",
        "application/xml",
        "*/*",
        "application/x-www-form-urlencoded; charset=\x7f",
    ]
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=5)
    ),
    max_leaves=20,
)
BODIES = (
    st.binary(max_size=4096)
    | JSON_VALUES.map(lambda value: json.dumps(value).encode())
    | st.lists(st.tuples(QUERY_KEYS, QUERY_VALUES), max_size=6).map(
        lambda pairs: urllib.parse.urlencode(pairs).encode()
    )
    | st.sampled_from([b"", b"\x00" * 64, b"--xyz\r\n\r\n--xyz--", b"{" * 2000])
)
ENCODINGS = st.sampled_from(["utf-8", "latin-1", "raw"])


def encode_query(pairs: list[tuple[str, str]], encoding: str) -> str:
    if not pairs:
        return ""
    if encoding == "raw":  # unescaped, as a hostile client may send it
        return "?" + "&".join(f"{k}={v}" for k, v in pairs).replace(" ", "+").replace(
            "\r", ""
        ).replace("\n", "")
    return "?" + urllib.parse.urlencode(pairs, encoding=encoding, errors="replace")


def encode_path(segments: list[str], encoding: str) -> str:
    if encoding == "raw":
        return "/" + "/".join(
            s.replace(" ", "").replace("\r", "").replace("\n", "") for s in segments
        )
    return "/" + "/".join(
        urllib.parse.quote(s, safe="", encoding=encoding, errors="replace") for s in segments
    )


@st.composite
def requests(draw: Any, prefixes: list[list[str]]) -> dict[str, Any]:
    prefix = draw(st.sampled_from(prefixes))
    tail = draw(st.lists(SEGMENT, max_size=5))
    encoding = draw(ENCODINGS)
    body = draw(BODIES)
    headers: dict[str, str] = {}
    content_type = draw(CONTENT_TYPES)
    if content_type:
        headers["Content-Type"] = content_type
    if draw(st.booleans()) and body:
        headers["Transfer-Encoding"] = "chunked"
        body = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    if draw(st.integers(0, 9)) == 0:
        headers["Content-Encoding"] = draw(st.sampled_from(["gzip", "deflate", "br", "x-bogus"]))
    return {
        "method": draw(METHODS),
        "target": encode_path(prefix + tail, encoding)
        + encode_query(draw(st.lists(st.tuples(QUERY_KEYS, QUERY_VALUES), max_size=5)), encoding),
        "body": body,
        "headers": headers,
    }


def check(reply: Any, sent: dict[str, Any]) -> None:
    assert reply.status is not None, f"no HTTP answer to {sent!r}"
    assert reply.status < 500, f"{reply.status} {reply.body[:300]!r} for {sent!r}"


@pytest.fixture
def rss_guard(target: Any) -> Any:
    before = target.sidecar_rss_bytes()
    yield
    assert target.sidecar_alive(), "the sidecar died under fuzzing"
    grown = target.sidecar_rss_bytes() - before
    assert grown < RSS_SLACK_BYTES, f"sidecar RSS grew by {grown / 2**20:.1f} MiB"


@pytest.fixture
def unchanged(target: Any) -> Any:
    target.create_task("fuzz-victim", provider_task_id="4000000001")
    before = target.state()
    yield
    assert target.state() == before


def test_pingback_listener_without_a_valid_token(
    target: Any, rss_guard: Any, unchanged: Any
) -> None:
    victim = target.task("fuzz-victim")
    real = ["v1", "pingback", "attack", "fuzz-victim", victim["metadata"]["uid"]]
    prefixes = [[], ["v1"], ["v1", "pingback"], ["v1", "pingback", "attack"], real[:4], real]

    @FUZZ
    @given(sent=requests(prefixes))
    def attack(sent: dict[str, Any]) -> None:
        reply = target.pingback.request(**sent)
        check(reply, sent)
        assert reply.status != 200, f"accepted without a valid token: {sent!r}"

    attack()


def test_pingback_payloads_under_a_valid_token(target: Any, rss_guard: Any) -> None:
    ref = target.create_task("fuzz-signed", provider_task_id="4000000002")
    path = target.path(ref)

    @FUZZ
    @given(
        method=st.sampled_from(["GET", "POST"]),
        query=st.lists(st.tuples(QUERY_KEYS, QUERY_VALUES), max_size=5),
        body=BODIES,
        content_type=CONTENT_TYPES,
        encoding=ENCODINGS,
    )
    def attack(
        method: str, query: list[tuple[str, str]], body: bytes, content_type: str, encoding: str
    ) -> None:
        sent = {
            "method": method,
            "target": path + encode_query(query, encoding),
            "body": body,
            "headers": {"Content-Type": content_type} if content_type else {},
        }
        check(target.pingback.request(**sent), sent)

    attack()
    # Whatever got through was one result for the task on record, applied at most once.
    recorded = target.sidecar_counter("captchatask_pingbacks_total", outcome="recorded")
    assert recorded <= 1
    letters = target.stack.get_json("cdl")["items"]
    assert all(letter["spec"]["taskRef"]["name"] == "fuzz-signed" for letter in letters)
    for letter in letters:
        target.stack.plane.kubectl("delete", "-n", "attack", "cdl", letter["metadata"]["name"])


def test_local_api(target: Any, rss_guard: Any) -> None:
    before = len(target.stack.get_json("ctask")["items"])
    created: list[int] = []
    prefixes = [[], ["v1"], ["v1", "tasks"], ["v1", "tasks:reserve"], ["v1", "tasks:track"]]

    @FUZZ
    @given(
        sent=requests(prefixes),
        wait=st.sampled_from(["", "0", "0.01", "-1", "nan", "inf", "1e9", "x"]),
    )
    def attack(sent: dict[str, Any], wait: str) -> None:
        if wait and "?" not in sent["target"]:
            sent["target"] += f"?wait={wait}"
        reply = target.local.request(**sent)
        check(reply, sent)
        if reply.status == 201:
            created.append(1)

    attack()
    after = len(target.stack.get_json("ctask")["items"])
    assert after - before == len(created)


def test_admin_listener(target: Any, rss_guard: Any, unchanged: Any) -> None:
    prefixes = [[], ["metrics"], ["healthz"], ["readyz"], ["openapi.json"]]

    @FUZZ
    @given(sent=requests(prefixes))
    def attack(sent: dict[str, Any]) -> None:
        check(target.admin.request(**sent), sent)

    attack()


@settings(
    deadline=None, max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    raw=st.binary(min_size=1, max_size=2048)
    | st.sampled_from(
        [
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"POST /v1/pingback/a/b/c/d HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"GET / HTTP/9.9\r\n\r\n",
            b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n",
            b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 500 + b"\r\n",
            b"\r\n\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ]
    ),
    listener=st.sampled_from(["pingback", "local", "admin"]),
)
def test_garbage_on_the_wire(target: Any, raw: bytes, listener: str) -> None:
    data = raw if raw.endswith(b"\r\n\r\n") else raw + b"\r\n\r\n"
    server = getattr(target, listener)
    with server.connect() as sock:
        sock.settimeout(target.read_timeout * 3)
        sock.sendall(data)
        try:
            reply = server.read_reply(sock)
        except TimeoutError:
            # Bytes that are no complete request yet (leading blank lines): the listener must
            # time the connection out (every listener's keep-alive bound is the read timeout).
            pytest.fail(f"{listener} kept a garbage connection open: {raw[:100]!r}")
    # Garbage may be answered with a 4xx or simply dropped; never with a 5xx.
    assert reply.status is None or reply.status < 500, (reply.status, raw[:200])
    assert target.sidecar_alive()


@pytest.mark.parametrize("route", ["pingback", "/v1/tasks", "/v1/tasks:reserve", "/v1/tasks:track"])
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_a_body_with_a_broken_content_encoding_is_a_client_error(
    target: Any, route: str, encoding: str
) -> None:
    """Found by the fuzzer (BUG-3): undecodable compressed bodies must be a 4xx, never a 500."""
    if route == "pingback":
        raw = target.pingback
        path = target.path(target.create_task("enc-victim", provider_task_id="4000000003"))
    else:
        raw, path = target.local, route
    before = target.state()
    reply = raw.request(
        "POST",
        path,
        body=b"\x00\x01not compressed at all",
        headers={"Content-Type": "application/json", "Content-Encoding": encoding},
    )
    assert reply.status is not None
    assert 400 <= reply.status < 500, (reply.status, reply.body[:200])
    if route == "pingback":
        assert target.state() == before
