"""The CaptchaTask API on the real API server: established, usable, and strict about bad input."""

import json
from pathlib import Path

import pytest

from captchatask import testbed

REPO = Path(__file__).resolve().parents[2]

TASK_HEAD = """apiVersion: captchatask.dev/v1alpha1
kind: CaptchaTask
metadata: {name: bad}
"""
PROVIDER_HEAD = """apiVersion: captchatask.dev/v1alpha1
kind: CaptchaProvider
metadata: {name: bad}
"""
LETTER_HEAD = """apiVersion: captchatask.dev/v1alpha1
kind: CaptchaDeadLetter
metadata: {name: bad}
"""


def test_the_three_crds_are_established(kubectl: testbed.Kubectl) -> None:
    out = kubectl("get", "crd", "-o", "json").stdout
    crds = {item["metadata"]["name"]: item for item in json.loads(out)["items"]}
    for plural in ("captchatasks", "captchaproviders", "captchadeadletters"):
        crd = crds[f"{plural}.captchatask.dev"]
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions["Established"] == "True"
        assert "captcha" in crd["spec"]["names"]["categories"]


def test_examples_apply_and_kubectl_get_captcha_shows_the_columns(
    kubectl: testbed.Kubectl, namespace: str
) -> None:
    kubectl("apply", "-n", namespace, "-f", str(REPO / "examples"))
    out = kubectl("get", "captcha", "-n", namespace).stdout
    # One table per kind, each with the columns that answer the first question.
    assert "PHASE   TYPE" in out
    assert "DELIVERED-BY" in out
    assert "captchatask.captchatask.dev/login-1" in out
    assert "DIALECT" in out
    assert "captchaprovider.captchatask.dev/default" in out
    assert "REASON" in out
    assert "captchadeadletter.captchatask.dev/login-0-example" in out
    task = json.loads(kubectl("get", "ctask", "login-1", "-n", namespace, "-o", "json").stdout)
    # Defaults are applied by the API server, so every client sees the same effective spec.
    assert task["spec"]["providerRef"] == {"name": "default"}
    assert task["spec"]["ttlSecondsAfterFinished"] == 3600
    provider = json.loads(kubectl("get", "cprov", "default", "-n", namespace, "-o", "json").stdout)
    assert provider["spec"]["polling"]["intervalSeconds"] == 30
    assert provider["spec"]["apiKeySecretRef"]["key"] == "apiKey"


INVALID = [
    pytest.param(
        TASK_HEAD + "spec: {type: RecaptchaV2, pageURL: 'https://a.example/'}",
        "spec.siteKey",
        id="task-missing-site-key",
    ),
    pytest.param(
        TASK_HEAD + "spec: {type: FunCaptcha, siteKey: k, pageURL: 'https://a.example/'}",
        "spec.type",
        id="task-unknown-type",
    ),
    pytest.param(
        TASK_HEAD
        + "spec: {type: Turnstile, siteKey: k, pageURL: 'https://a.example/', deadlineSeconds: -1}",
        "spec.deadlineSeconds",
        id="task-negative-deadline",
    ),
    pytest.param(
        TASK_HEAD + "spec: {type: Turnstile, siteKey: k, pageURL: 'ftp://a.example/'}",
        "spec.pageURL",
        id="task-page-url-not-http",
    ),
    pytest.param(
        TASK_HEAD + "spec: {type: GeeTest, siteKey: gt, pageURL: 'https://a.example/'}",
        "spec.geetest",
        id="task-geetest-without-challenge",
    ),
    pytest.param(
        TASK_HEAD
        + "spec: {type: RecaptchaV3, siteKey: k, pageURL: 'https://a.example/',"
        + " recaptcha: {minScore: 1.5}}",
        "spec.recaptcha.minScore",
        id="task-min-score-out-of-range",
    ),
    pytest.param(
        TASK_HEAD + "spec: {type: Image}",
        "spec.image",
        id="task-image-without-body",
    ),
    pytest.param(
        TASK_HEAD
        + "spec: {type: Turnstile, siteKey: k, pageURL: 'https://a.example/',"
        + " ttlSecondsAfterFinished: -5}",
        "spec.ttlSecondsAfterFinished",
        id="task-negative-ttl",
    ),
    pytest.param(
        PROVIDER_HEAD + "spec: {apiKey: 0123456789abcdef0123456789abcdef,"
        " apiKeySecretRef: {name: k}}",
        "spec.apiKey",
        id="provider-inline-api-key",
    ),
    pytest.param(
        PROVIDER_HEAD + "spec: {dialect: captchaai}",
        "spec.apiKeySecretRef",
        id="provider-without-key-reference",
    ),
    pytest.param(
        PROVIDER_HEAD + "spec: {apiKeySecretRef: {name: k}, polling: {callbackTimeoutSeconds: -3}}",
        "spec.polling.callbackTimeoutSeconds",
        id="provider-negative-callback-timeout",
    ),
    pytest.param(
        PROVIDER_HEAD + "spec: {apiKeySecretRef: {name: k}, dialect: anticaptcha}",
        "spec.dialect",
        id="provider-unknown-dialect",
    ),
    pytest.param(
        LETTER_HEAD
        + "spec: {reason: Whatever, payload: {code: x}, receivedAt: '2026-01-01T00:00:00Z'}",
        "spec.reason",
        id="dead-letter-unknown-reason",
    ),
]


@pytest.mark.parametrize(("manifest", "field"), INVALID)
def test_invalid_objects_are_rejected_naming_the_field(
    kubectl: testbed.Kubectl, namespace: str, manifest: str, field: str
) -> None:
    result = kubectl("apply", "-n", namespace, "-f", "-", input=manifest, check=False)
    assert result.returncode != 0, result.stdout
    assert field in result.stderr, result.stderr
    assert kubectl("get", "captcha", "-n", namespace, "-o", "name").stdout.strip() == ""


def test_provider_task_id_and_type_are_immutable(kubectl: testbed.Kubectl, namespace: str) -> None:
    kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input="""apiVersion: captchatask.dev/v1alpha1
kind: CaptchaTask
metadata: {name: adopted}
spec: {type: Turnstile, siteKey: k, pageURL: 'https://a.example/', providerTaskId: '123'}
""",
    )
    changed = kubectl(
        "patch",
        "ctask",
        "adopted",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"providerTaskId": "456"}}',
        check=False,
    )
    assert changed.returncode != 0
    assert "spec.providerTaskId" in changed.stderr
    retyped = kubectl(
        "patch",
        "ctask",
        "adopted",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"type": "HCaptcha"}}',
        check=False,
    )
    assert retyped.returncode != 0
    assert "spec.type" in retyped.stderr
