"""No key, pingback token or solution token appears where it could leak.

Runs after every other attack (the package's conftest orders it last), over everything the
stack wrote: every component's log (the control plane's too; the emulator's is excluded because
it plays the provider, which is given the key), every Event in every namespace, every task,
provider and dead letter (status included), the sidecar's and operator's metrics, and the spool.
Every task's pingback path token and every solution token are searched for in the logs (the
sidecar runs with ``--access-log`` here, so every attack's request line is in it), the Events and
the metrics; they belong in the objects and the spool. The chaos run (``python -m bench.chaos``)
runs the same scan over its much busier stack.
"""

from __future__ import annotations

import base64
import json
import urllib.request
from typing import Any
from urllib.parse import quote

import pytest

from captchatask.model import TaskView

pytestmark = pytest.mark.controlplane


def forms(secret: str) -> dict[str, str]:
    return {
        "verbatim": secret,
        "base64": base64.b64encode(secret.encode()).decode().rstrip("="),
        "first half": secret[: len(secret) // 2],
    }


def test_no_key_appears_in_logs_events_objects_or_metrics(target: Any) -> None:
    stack = target.stack
    secrets = {"solver API key": stack.api_key}
    for number, line in enumerate(stack.key_file.read_text().split()):
        secrets[f"pingback HMAC key #{number}"] = line

    sources: dict[str, str] = {}
    for path in stack.logs():
        if path.name != "emulator.log":
            sources[f"log {path.name}"] = path.read_text(errors="replace")
    assert sources["log sidecar.log"], "the sidecar logged nothing: the scan would prove nothing"
    for kind in ("ctask", "cprov", "cdl"):
        sources[kind] = json.dumps(stack.get_json(kind))
    sources["events"] = stack.plane.kubectl("get", "events", "-A", "-o", "json").stdout
    with urllib.request.urlopen(stack.sidecar_metrics_url, timeout=10) as reply:
        sources["sidecar /metrics"] = reply.read().decode()
    for path in stack.spool_dir.glob("*"):
        if path.is_file():
            sources[f"spool {path.name}"] = path.read_bytes().decode("latin-1")

    leaks = [
        f"{name} ({form}) in {source}"
        for name, secret in secrets.items()
        for form, needle in forms(secret).items()
        for source, text in sources.items()
        if needle in text
    ]
    assert leaks == []

    tasks = stack.get_json("ctask")["items"]
    tokens = {
        "pingback token": [target.signer.token(TaskView.from_body(body).ref) for body in tasks],
        "solution token": [
            token
            for body in tasks
            if len(token := ((body.get("status") or {}).get("solution") or {}).get("token", ""))
            >= 12
        ],
    }
    assert tokens["pingback token"], "no task: the token scan would prove nothing"
    token_leaks = [
        f"{kind} ({form}) in {source}"
        for kind, values in tokens.items()
        for token in values
        for form, needle in (("verbatim", token), ("percent-encoded", quote(token, safe="")))
        for source, text in sources.items()
        if not source.startswith(("ctask", "cprov", "cdl", "spool ")) and needle in text
    ]
    assert token_leaks == []
    # The scan itself works: it finds a key where one is.
    planted = {"x": f"... key={stack.api_key} ..."}
    assert any(needle in planted["x"] for needle in forms(stack.api_key).values())
