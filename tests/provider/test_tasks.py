"""The CaptchaTask spec to in.php mapping, one case per type and option."""

from __future__ import annotations

from typing import Any

import pytest

from captchatask.provider.codes import Dialect
from captchatask.provider.tasks import SpecError, build_submit_params

PAGE = "https://example.com/login"
KEY = "6LeIxAcTAAAAAJcZVRqyHh71UMIEGNQ_MXjiZKhI"
CAI = Dialect.CAPTCHAAI
TWOC = Dialect.TWOCAPTCHA


def build(
    spec: dict[str, Any], dialect: Dialect = CAI, pingback: str | None = None
) -> dict[str, str]:
    return build_submit_params(spec, dialect=dialect, pingback_url=pingback)


def test_recaptcha_v2_with_every_option() -> None:
    spec = {
        "type": "RecaptchaV2",
        "siteKey": KEY,
        "pageURL": PAGE,
        "userAgent": "UA/1",
        "cookies": "a:1;b:2",
        "recaptcha": {"invisible": True, "enterprisePayload": "S", "domain": "recaptcha.net"},
        "deadlineSeconds": 300,
        "providerTaskId": "123",
        "external": False,
    }
    assert build(spec, pingback="http://127.0.0.1:8080/cb?t=1&u=2") == {
        "method": "userrecaptcha",
        "googlekey": KEY,
        "pageurl": PAGE,
        "invisible": "1",
        "data-s": "S",
        "domain": "recaptcha.net",
        "userAgent": "UA/1",
        "cookies": "a:1;b:2",
        "json": "1",
        "pingback": "http://127.0.0.1:8080/cb?t=1&u=2",
    }


def test_recaptcha_v3_defaults_the_action_and_passes_min_score() -> None:
    params = build(
        {"type": "RecaptchaV3", "siteKey": KEY, "pageURL": PAGE, "recaptcha": {"minScore": 0.7}}
    )
    assert params == {
        "method": "userrecaptcha",
        "googlekey": KEY,
        "version": "v3",
        "action": "verify",
        "min_score": "0.7",
        "pageurl": PAGE,
        "json": "1",
    }


def test_recaptcha_enterprise_v2_and_v3() -> None:
    v2 = build(
        {
            "type": "RecaptchaEnterprise",
            "siteKey": KEY,
            "pageURL": PAGE,
            "recaptcha": {"enterprisePayload": "S"},
        }
    )
    assert v2["enterprise"] == "1"
    assert v2["data-s"] == "S"
    assert "version" not in v2
    v3 = build(
        {
            "type": "RecaptchaEnterprise",
            "siteKey": KEY,
            "pageURL": PAGE,
            "recaptcha": {"version": "v3", "action": "login", "minScore": 0.3},
        }
    )
    assert (v3["enterprise"], v3["version"], v3["action"], v3["min_score"]) == (
        "1",
        "v3",
        "login",
        "0.3",
    )


def test_turnstile_and_hcaptcha_use_sitekey() -> None:
    turnstile = build(
        {
            "type": "Turnstile",
            "siteKey": "0x4AAA",
            "pageURL": PAGE,
            "turnstile": {"action": "a", "data": "d"},
        }
    )
    assert turnstile == {
        "method": "turnstile",
        "sitekey": "0x4AAA",
        "action": "a",
        "data": "d",
        "pageurl": PAGE,
        "json": "1",
    }
    hcaptcha = build({"type": "HCaptcha", "siteKey": "uuid-key", "pageURL": PAGE})
    assert hcaptcha == {"method": "hcaptcha", "sitekey": "uuid-key", "pageurl": PAGE, "json": "1"}


def test_geetest_v3() -> None:
    spec = {
        "type": "GeeTest",
        "siteKey": "gt1",
        "pageURL": PAGE,
        "geetest": {"challenge": "c1", "apiServer": "api.geetest.com"},
    }
    assert build(spec) == {
        "method": "geetest",
        "gt": "gt1",
        "challenge": "c1",
        "api_server": "api.geetest.com",
        "pageurl": PAGE,
        "json": "1",
    }


def test_geetest_v4_differs_by_dialect() -> None:
    spec = {"type": "GeeTestV4", "siteKey": "cid", "pageURL": PAGE}
    assert build(spec, CAI) == {
        "method": "geetest",
        "gt": "cid",
        "version": "4",
        "pageurl": PAGE,
        "json": "1",
    }
    assert build(spec, TWOC) == {
        "method": "geetest_v4",
        "captcha_id": "cid",
        "pageurl": PAGE,
        "json": "1",
    }


def test_image_with_every_option() -> None:
    spec = {
        "type": "Image",
        "image": {
            "body": "aGVsbG8=",
            "phrase": True,
            "caseSensitive": False,
            "numeric": 4,
            "minLength": 3,
            "maxLength": 8,
            "language": "en",
            "instructions": "type the red letters",
        },
    }
    assert build(spec) == {
        "method": "base64",
        "body": "aGVsbG8=",
        "phrase": "1",
        "regsense": "0",
        "numeric": "4",
        "min_len": "3",
        "max_len": "8",
        "lang": "en",
        "textinstructions": "type the red letters",
        "json": "1",
    }
    assert build({"type": "Image", "image": {"body": "x", "language": "2"}})["language"] == "2"


def test_the_key_is_never_added() -> None:
    assert "key" not in build({"type": "Turnstile", "siteKey": "0x4AAA", "pageURL": PAGE})


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "Nope", "siteKey": KEY, "pageURL": PAGE},
        {"siteKey": KEY, "pageURL": PAGE},
        {"type": "RecaptchaV2", "pageURL": PAGE},
        {"type": "RecaptchaV2", "siteKey": KEY},
        {"type": "RecaptchaV2", "siteKey": KEY, "pageURL": " "},
        {
            "type": "RecaptchaV2",
            "siteKey": KEY,
            "pageURL": PAGE,
            "recaptcha": {"domain": "evil.com"},
        },
        {
            "type": "RecaptchaEnterprise",
            "siteKey": KEY,
            "pageURL": PAGE,
            "recaptcha": {"version": "v4"},
        },
        {"type": "RecaptchaV2", "siteKey": KEY, "pageURL": PAGE, "recaptcha": "yes"},
        {"type": "GeeTest", "siteKey": "gt", "pageURL": PAGE},
        {"type": "Image", "image": {}},
        {"type": "Image", "image": {"body": "x", "numeric": 7}},
    ],
)
def test_invalid_specs_raise_spec_error(spec: dict[str, Any]) -> None:
    with pytest.raises(SpecError):
        build(spec)
