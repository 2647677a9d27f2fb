"""Resource attacks on the real sidecar process: oversize bodies, slow-loris, floods.

A pingback listener faces the internet (through an Ingress), so it must shed abusive requests
without reading them, without holding connections forever and without growing its memory. The
suite runs the sidecar with ``--read-timeout-seconds 2`` and ``--max-body-bytes 16384``. Waits
are hang guards, not timing assertions.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

import pytest

pytestmark = [pytest.mark.controlplane, pytest.mark.slow]

#: Slow-loris connections opened at once.
LORIS_CONNECTIONS = 40
#: What an oversize body may push before the 413 is seen: mostly the loopback socket buffers.
READ_ALLOWANCE = 16 * 1024 * 1024
RSS_SLACK_BYTES = 48 * 1024 * 1024


def valid_path(target: Any, name: str) -> str:
    ref = target.create_task(name, provider_task_id="6000000001")
    return str(target.path(ref))


@pytest.mark.parametrize("listener", ["pingback", "local"])
def test_a_declared_oversize_body_is_refused_without_being_sent(target: Any, listener: str) -> None:
    raw = getattr(target, listener)
    route = valid_path(target, "lim-declared") if listener == "pingback" else "/v1/tasks"
    before = target.state()
    with raw.connect() as sock:
        sock.settimeout(target.read_timeout * 5)
        sock.sendall(
            f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {512 * 1024 * 1024}\r\n\r\n".encode()
        )
        try:
            reply = raw.read_reply(sock)  # answered before a single body byte was sent
        except TimeoutError:
            pytest.fail("a declared 512 MiB body was neither refused nor timed out")
    assert reply.status == 413
    assert target.state() == before


def test_an_oversize_chunked_body_is_cut_off(target: Any) -> None:
    path = valid_path(target, "lim-chunked")
    before = target.state()
    rss = target.sidecar_rss_bytes()
    sent = 0
    answer = b""
    with target.pingback.connect() as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        chunk = f"{65536:x}\r\n".encode() + b"x" * 65536 + b"\r\n"
        sock.setblocking(False)
        deadline = time.monotonic() + 30  # hang guard
        while not answer and sent < 64 * 1024 * 1024 and time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                sock.sendall(chunk)
                sent += len(chunk)
            try:
                answer = sock.recv(4096) or b"<closed>"
            except BlockingIOError:
                time.sleep(0.001)
            except OSError:
                answer = b"<reset>"
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert sent < READ_ALLOWANCE + target.max_body, f"{sent} bytes pushed before the 413"
    assert target.sidecar_rss_bytes() - rss < RSS_SLACK_BYTES
    assert target.state() == before


def _open_loris(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"GET /v1/pingback/attack/x HTTP/1.1\r\nHost: x\r\n")  # never finished
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return False
    except OSError:
        return True
    # A 408 answer, or an orderly close.
    return data == b"" or data.startswith(b"HTTP/1.1 408") or data.startswith(b"HTTP/1.1 4")


@pytest.mark.parametrize("listener", ["pingback", "local"])
def test_slow_loris_headers_are_timed_out_and_do_not_starve_others(
    target: Any, listener: str
) -> None:
    raw = getattr(target, listener)
    rss = target.sidecar_rss_bytes()
    socks = [_open_loris(raw.port) for _ in range(LORIS_CONNECTIONS)]
    try:
        # While they hang, an honest request is still served.
        reply = raw.request(
            "GET", "/v1/tasks/does-not-exist" if listener == "local" else "/v1/pingback/"
        )
        assert reply.status is not None
        assert reply.status < 500
        # Keep dribbling header bytes: a read timeout that resets on every byte is no bound.
        open_socks = list(socks)
        deadline = time.monotonic() + target.read_timeout * 10
        while open_socks and time.monotonic() < deadline:
            for sock in list(open_socks):
                with contextlib.suppress(OSError):
                    sock.sendall(b"X")
                if _closed_by_server(sock):
                    open_socks.remove(sock)
            time.sleep(0.25)
        assert not open_socks, f"{len(open_socks)} slow-loris connections still open"
    finally:
        for sock in socks:
            sock.close()
    assert target.sidecar_rss_bytes() - rss < RSS_SLACK_BYTES


def test_a_body_that_trickles_in_is_timed_out(target: Any) -> None:
    path = valid_path(target, "lim-trickle")
    before = target.state()
    with target.pingback.connect() as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            "Content-Length: 200\r\n\r\nid=6000000001&".encode()
        )
        deadline = time.monotonic() + target.read_timeout * 10
        closed = False
        while time.monotonic() < deadline and not closed:
            with contextlib.suppress(OSError):
                sock.sendall(b"c")
            closed = _closed_by_server(sock)
            time.sleep(0.25)
    assert closed, "a trickled body kept its connection open"
    assert target.state() == before


def test_a_flood_of_forged_pingbacks_keeps_memory_bounded(target: Any) -> None:
    ref = target.random_ref()
    path = target.path(ref).rsplit("/", 1)[0] + "/" + "A" * 24
    before = target.state()
    rss = target.sidecar_rss_bytes()
    body = b"id=1&code=" + b"t" * 8000
    for _ in range(1500):
        reply = target.pingback.request(
            "POST", path, body=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        assert reply.status == 403
    assert target.sidecar_rss_bytes() - rss < RSS_SLACK_BYTES
    assert target.state() == before
