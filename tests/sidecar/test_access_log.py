"""``--access-log`` logs every request, but never a pingback's path token or a solution token.

The real sidecar process, its access log on, with the API server away (every result spooled):
the tokens are sent the ways providers send them (GET query, form body, a POST carrying the
query) and the process's log is searched for them as the chaos suite's secrets scan does
(``bench.chaos.scan.token_needles``: verbatim and percent-encoded).
"""

from __future__ import annotations

import asyncio
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import aiohttp

from captchatask import signing
from captchatask.model import TaskRef
from captchatask_sidecar.accesslog import redact_target

if TYPE_CHECKING:
    from tests.sidecar.conftest import SidecarFactory

NAMESPACE = "apps"


def leaks(tokens: dict[str, list[str]], text: str) -> list[str]:
    """Which kinds of token appear in ``text``, in which form (never the token itself)."""
    return [
        f"{kind} ({form})"
        for kind, values in tokens.items()
        for token in values
        for form, needle in (("verbatim", token), ("percent-encoded", quote(token, safe="")))
        if needle in text
    ]


def test_the_path_token_and_every_query_value_are_masked() -> None:
    assert redact_target("/v1/pingback/apps/t-1/u-1/SECRETTOKEN", "id=1&code=SECRET&x") == (
        "/v1/pingback/apps/t-1/u-1/<redacted>?id=<redacted>&code=<redacted>&x"
    )
    assert redact_target("/v1/pingback/a/b/c/d/e", "") == "/v1/pingback/a/b/c/<redacted>/<redacted>"
    assert redact_target("/v1/tasks/t-1", "wait=30") == "/v1/tasks/t-1?wait=<redacted>"
    assert redact_target("/readyz", "") == "/readyz"


async def test_the_access_log_has_every_request_but_no_token(
    sidecar: SidecarFactory,
    unreachable: Path,
    http: aiohttp.ClientSession,
    signer: signing.PingbackSigner,
) -> None:
    process = sidecar(kubeconfig=unreachable, namespace=NAMESPACE, run=False)
    process.argv.append("--access-log")
    process.start()
    uids = [f"6a1f8a43-0a51-4b8e-9d5c-3f3b7e0d2a1{i}" for i in range(3)]
    refs = [TaskRef(NAMESPACE, f"task-{i}", uid) for i, uid in enumerate(uids)]
    solutions = [f"03AGdBq2-{secrets.token_urlsafe(24)}+/=" for _ in refs]
    urls = [signer.url(process.pingback_url, ref) for ref in refs]
    async with http.get(urls[0], params={"id": "1", "code": solutions[0]}) as reply:
        assert reply.status == 200
    async with http.post(urls[1], data={"id": "2", "code": solutions[1]}) as reply:
        assert reply.status == 200
    async with http.post(urls[2] + "?id=3&code=" + quote(solutions[2], safe=""), data=b"") as reply:
        assert reply.status == 200
    # A request line the HTTP parser refuses: aiohttp logs its error with the raw line in it.
    bad = signer.path(refs[0]).encode() + b"?id=1&code=" + solutions[0].encode() + b"\x01"
    reader, writer = await asyncio.open_connection("127.0.0.1", process.pingback_port)
    writer.write(b"GET " + bad + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    assert (await reader.read()).startswith(b"HTTP/1.0 400")
    writer.close()
    process.stop()

    log = process.log_text()
    # The requests are there (one access line each, path up to the uid)...
    for ref in refs:
        assert re.search(rf'"(GET|POST) /v1/pingback/{NAMESPACE}/{ref.name}/{ref.uid}/', log)
    assert "Error handling request" in log
    # ... and none of the secrets they carried.
    tokens = {
        "pingback token": [signer.token(ref) for ref in refs],
        "solution token": solutions,
    }
    assert leaks(tokens, log) == []
    # The search itself finds a token where one is.
    assert leaks(tokens, f"GET /x?code={quote(solutions[0], safe='')}")
