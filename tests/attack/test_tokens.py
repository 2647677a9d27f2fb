"""Forged, replayed and misdirected pingback tokens against the real sidecar process.

The pingback URL is a capability: ``/v1/pingback/<ns>/<name>/<uid>/<token>`` with an HMAC over
namespace, name and uid. These tests try every way around it that does not involve knowing the
key, and check the exact effect (or absence of effect) on the ledger.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Any

import pytest

pytestmark = pytest.mark.controlplane


def get(target: Any, path: str, **query: str) -> Any:
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    return target.pingback.request("GET", f"{path}?{qs}" if qs else path)


def with_token(path: str, token: str) -> str:
    return path.rsplit("/", 1)[0] + "/" + token


def test_a_forged_token_of_the_right_shape_is_forbidden(target: Any) -> None:
    ref = target.create_task("tok-forged", provider_task_id="5000000001")
    before = target.state()
    for _ in range(20):
        forged = base64.urlsafe_b64encode(secrets.token_bytes(18)).decode()
        reply = get(target, with_token(target.path(ref), forged), id="5000000001", code="fake")
        assert reply.status == 403
    assert target.state() == before


def test_a_token_made_with_another_key_is_forbidden(target: Any) -> None:
    ref = target.create_task("tok-otherkey", provider_task_id="5000000002")
    before = target.state()
    message = b"\n".join(
        (b"captchatask.dev/pingback/v1", b"attack", ref.name.encode(), ref.uid.encode())
    )
    for key in (b"", b"secret", b"attack", secrets.token_bytes(32)):
        digest = hmac.new(key, message, hashlib.sha256).digest()[:18]
        token = base64.urlsafe_b64encode(digest).decode()
        reply = get(target, with_token(target.path(ref), token), id="5000000002", code="fake")
        assert reply.status in (403, 404)
    assert target.state() == before


def test_variants_of_a_valid_token_are_not_valid(target: Any) -> None:
    ref = target.create_task("tok-variants", provider_task_id="5000000003")
    token = target.path(ref).rsplit("/", 1)[1]
    before = target.state()
    variants = {
        token.upper(),
        token.lower(),
        token[:-1],
        token + "A",
        token + "=",
        token.replace("-", "+").replace("_", "/"),
        "%" + token.encode().hex(),
        token[::-1],
    } - {token}
    for variant in variants:
        reply = get(target, with_token(target.path(ref), variant), id="5000000003", code="fake")
        assert reply.status in (400, 403, 404), variant
    assert target.state() == before


def test_a_token_for_one_task_does_not_open_another(target: Any) -> None:
    a = target.create_task("tok-a", provider_task_id="5000000011")
    b = target.create_task("tok-b", provider_task_id="5000000012")
    before = target.state()
    token_a = target.path(a).rsplit("/", 1)[1]
    # A's token on B's name and uid; A's token and uid on B's name; B's uid on A's name.
    for path in (
        with_token(target.path(b), token_a),
        f"/v1/pingback/attack/tok-b/{a.uid}/{token_a}",
        f"/v1/pingback/attack/tok-a/{b.uid}/{token_a}",
    ):
        reply = get(target, path, id="5000000012", code="stolen")
        assert reply.status == 403, path
    assert target.state() == before


def test_a_valid_url_with_another_tasks_provider_id_is_a_dead_letter_not_a_result(
    target: Any,
) -> None:
    a = target.create_task("tok-mismatch-a", provider_task_id="5000000021")
    target.create_task("tok-mismatch-b", provider_task_id="5000000022")
    reply = get(target, target.path(a), id="5000000022", code="token-for-b")
    assert reply.status == 200
    assert reply.headers["x-captchatask-outcome"] == "dead_lettered"
    for name in ("tok-mismatch-a", "tok-mismatch-b"):
        assert "phase" not in (target.task(name).get("status") or {}), name
    letters = [
        d
        for d in target.stack.get_json("cdl")["items"]
        if d["spec"]["taskRef"]["name"] == "tok-mismatch-a"
    ]
    assert [d["spec"]["reason"] for d in letters] == ["ProviderTaskMismatch"]


def test_a_replayed_pingback_changes_nothing(target: Any) -> None:
    ref = target.create_task("tok-replay", provider_task_id="5000000031")
    first = get(target, target.path(ref), id="5000000031", code="the-real-token")
    assert first.status == 200
    assert first.headers["x-captchatask-outcome"] == "recorded"
    solved = target.task("tok-replay")
    assert solved["status"]["solution"]["token"] == "the-real-token"
    for code in ("the-real-token", "a-replaced-token", "ERROR_CAPTCHA_UNSOLVABLE"):
        reply = get(target, target.path(ref), id="5000000031", code=code)
        assert reply.status == 200
        assert reply.headers["x-captchatask-outcome"] == "duplicate"
    after = target.task("tok-replay")
    assert after["status"] == solved["status"]
    assert after["metadata"]["resourceVersion"] == solved["metadata"]["resourceVersion"]


def test_a_predecessors_url_does_not_touch_a_recreated_task(target: Any) -> None:
    old = target.create_task("tok-reborn", provider_task_id="5000000041")
    target.stack.plane.kubectl("delete", "-n", "attack", "ctask", "tok-reborn")
    new = target.create_task("tok-reborn", provider_task_id="5000000041")
    assert new.uid != old.uid
    reply = get(target, target.path(old), id="5000000041", code="old-token")
    assert reply.status == 200
    assert reply.headers["x-captchatask-outcome"] == "dead_lettered"
    assert "phase" not in (target.task("tok-reborn").get("status") or {})
    reasons = [
        d["spec"]["reason"]
        for d in target.stack.get_json("cdl")["items"]
        if d["spec"]["taskRef"]["name"] == "tok-reborn"
    ]
    assert reasons == ["TaskRecreated"]


def test_a_validly_signed_url_for_a_namespace_not_served_is_not_found(target: Any) -> None:
    ref = target.random_ref()
    foreign = type(ref)("kube-system", ref.name, ref.uid)
    before = target.state()
    reply = get(target, target.signer.path(foreign), id="5000000051", code="x")
    assert reply.status == 404
    assert target.state() == before
