"""Every documented reply code, in both dialects and on both endpoints, gets one verdict."""

from __future__ import annotations

import pytest

from captchatask.provider.codes import (
    CONNECT_ERROR,
    HTTP_5XX,
    TRANSPORT_ERROR,
    UNPARSEABLE_REPLY,
    Classification,
    Dialect,
    Verdict,
    classify,
    first_poll_delay,
    known_codes,
)

NR, RL, TF, CE, UK = (
    Verdict.NOT_READY,
    Verdict.RETRY_LATER,
    Verdict.TASK_FAILED,
    Verdict.CONFIG_ERROR,
    Verdict.UNKNOWN,
)

# (code, endpoint, captchaai (verdict, wait), 2captcha (verdict, wait)); provider-api.md §4.
TABLE: list[tuple[str, str, tuple[Verdict, float | None], tuple[Verdict, float | None]]] = [
    ("CAPCHA_NOT_READY", "res", (NR, 5.0), (NR, 5.0)),
    ("CAPTCHA_NOT_READY", "res", (NR, 5.0), (NR, 5.0)),
    ("ERROR_WRONG_USER_KEY", "in", (CE, None), (CE, None)),
    ("ERROR_WRONG_USER_KEY", "res", (CE, None), (CE, None)),
    ("ERROR_KEY_DOES_NOT_EXIST", "in", (CE, None), (CE, None)),
    ("ERROR_KEY_DOES_NOT_EXIST", "res", (CE, None), (CE, None)),
    ("ERROR_ZERO_BALANCE", "in", (RL, 60.0), (CE, 60.0)),
    ("ERROR_NO_SLOT_AVAILABLE", "in", (RL, 5.0), (RL, 5.0)),
    ("ERROR_PAGEURL", "in", (TF, None), (TF, None)),
    ("ERROR_GOOGLEKEY", "in", (TF, None), (TF, None)),
    ("ERROR_WRONG_GOOGLEKEY", "in", (TF, None), (TF, None)),
    ("ERROR_BAD_TOKEN_OR_PAGEURL", "in", (TF, None), (TF, None)),
    ("ERROR_BAD_PARAMETERS", "in", (TF, None), (TF, None)),
    ("ERROR_ZERO_CAPTCHA_FILESIZE", "in", (TF, None), (TF, None)),
    ("ERROR_TOO_BIG_CAPTCHA_FILESIZE", "in", (TF, None), (TF, None)),
    ("ERROR_IMAGE_DIMENSIONS_TOO_LARGE", "in", (TF, None), (TF, None)),
    ("ERROR_WRONG_FILE_EXTENSION", "in", (TF, None), (TF, None)),
    ("ERROR_IMAGE_TYPE_NOT_SUPPORTED", "in", (TF, None), (TF, None)),
    ("ERROR_UPLOAD", "in", (TF, None), (TF, None)),
    ("ERROR_CAPTCHAIMAGE_BLOCKED", "in", (TF, None), (TF, None)),
    ("TOO_MANY_BAD_IMAGES", "in", (CE, None), (CE, None)),
    ("ERROR_IP_NOT_ALLOWED", "in", (CE, None), (CE, None)),
    ("IP_BANNED", "in", (CE, 300.0), (CE, 300.0)),
    ("ERROR_PROXY_FORMAT", "in", (CE, None), (CE, None)),
    ("ERROR_BAD_PROXY", "in", (TF, None), (TF, None)),
    ("ERROR_PROXY_CONNECTION_FAILED", "in", (RL, 5.0), (RL, 5.0)),
    ("ERROR_PROXY_CONNECTION_FAILED", "res", (RL, 5.0), (TF, None)),
    ("MAX_USER_TURN", "in", (RL, 10.0), (RL, 10.0)),
    ("ERROR: 1001", "in", (RL, 600.0), (RL, 600.0)),
    ("ERROR: 1002", "in", (RL, 300.0), (RL, 300.0)),
    ("ERROR: 1003", "in", (RL, 30.0), (RL, 30.0)),
    ("ERROR: 1004", "in", (RL, 600.0), (RL, 600.0)),
    ("ERROR: 1005", "res", (RL, 300.0), (RL, 300.0)),
    ("ERROR_SERVER_ERROR", "in", (RL, 10.0), (RL, 10.0)),
    ("ERROR_SERVER_ERROR", "res", (RL, 10.0), (RL, 10.0)),
    ("ERROR_INTERNAL_SERVER_ERROR", "res", (RL, 10.0), (RL, 10.0)),
    (HTTP_5XX, "res", (RL, 5.0), (RL, 5.0)),
    (TRANSPORT_ERROR, "in", (RL, 5.0), (RL, 5.0)),
    (CONNECT_ERROR, "in", (RL, 5.0), (RL, 5.0)),
    (UNPARSEABLE_REPLY, "res", (RL, 5.0), (RL, 5.0)),
    ("ERROR_CAPTCHA_UNSOLVABLE", "res", (TF, None), (TF, None)),
    ("ERROR_BAD_DUPLICATES", "res", (TF, None), (TF, None)),
    ("ERROR_WRONG_ID_FORMAT", "res", (TF, None), (TF, None)),
    ("ERROR_WRONG_CAPTCHA_ID", "res", (TF, None), (TF, None)),
    ("ERROR_NO_SUCH_CAPCHA_ID", "res", (TF, None), (TF, None)),
    ("ERROR_EMPTY_ACTION", "res", (TF, None), (TF, None)),
    ("ERROR_TOKEN_EXPIRED", "res", (TF, None), (TF, None)),
    ("ERROR_REPORT_NOT_RECORDED", "res", (TF, None), (TF, None)),
    ("REPORT_NOT_RECORDED", "res", (TF, None), (TF, None)),
    ("ERROR_DUPLICATE_REPORT", "res", (TF, None), (TF, None)),
    ("ERROR_IP_ADDRES", "res", (CE, None), (CE, None)),
    ("ERROR_DOMAIN_NOT_ALLOWED", "in", (TF, None), (TF, None)),
    ("ERROR_EMPTY_CAPTCHA", "in", (TF, None), (TF, None)),
    ("ERROR_IP_BLOCKED", "in", (CE, 300.0), (CE, 300.0)),
    ("ERROR_TASK_ABSENT", "res", (TF, None), (TF, None)),
    ("ERROR_TASK_NOT_SUPPORTED", "in", (TF, None), (TF, None)),
    ("ERROR_NO_SUCH_METHOD", "in", (TF, None), (TF, None)),
    # Undocumented codes: never a crash, a conservative wait, counted as unknown.
    ("ERROR_SOMETHING_NEW", "res", (UK, 30.0), (UK, 30.0)),
    ("ERROR_SOMETHING_NEW", "in", (UK, 60.0), (UK, 60.0)),
    ("ERROR: 1999", "res", (UK, 600.0), (UK, 600.0)),
    ("", "res", (UK, 30.0), (UK, 30.0)),
]


@pytest.mark.parametrize(("code", "endpoint", "cai", "twoc"), TABLE)
def test_every_code_gets_its_documented_verdict_and_wait(
    code: str,
    endpoint: str,
    cai: tuple[Verdict, float | None],
    twoc: tuple[Verdict, float | None],
) -> None:
    for dialect, expected in ((Dialect.CAPTCHAAI, cai), (Dialect.TWOCAPTCHA, twoc)):
        result = classify(code, dialect=dialect, endpoint=endpoint)  # type: ignore[arg-type]
        assert (result.verdict, result.wait_seconds) == expected, (dialect, code)
        assert result.code == code.strip()
        assert result.reason


def test_the_table_covers_every_known_code() -> None:
    tested = {row[0] for row in TABLE}
    assert known_codes() <= tested


def test_surrounding_whitespace_is_ignored() -> None:
    result = classify(" CAPCHA_NOT_READY\n", dialect=Dialect.CAPTCHAAI, endpoint="res")
    assert result.verdict is Verdict.NOT_READY
    assert result.code == "CAPCHA_NOT_READY"


def test_unknown_is_acted_on_as_retry_later() -> None:
    unknown = classify("ERROR_NEW", dialect=Dialect.CAPTCHAAI, endpoint="res")
    assert unknown.effective_verdict is Verdict.RETRY_LATER
    known = Classification(Verdict.TASK_FAILED, "X", None, "r")
    assert known.effective_verdict is Verdict.TASK_FAILED


@pytest.mark.parametrize(
    ("task_type", "captchaai", "twocaptcha"),
    [
        ("RecaptchaV2", 15.0, 20.0),
        ("RecaptchaEnterprise", 15.0, 20.0),
        ("RecaptchaV3", 10.0, 15.0),
        ("Turnstile", 10.0, 5.0),
        ("HCaptcha", 10.0, 5.0),
        ("GeeTest", 15.0, 5.0),
        ("GeeTestV4", 15.0, 5.0),
        ("Image", 1.0, 5.0),
        ("SomethingElse", 15.0, 15.0),
    ],
)
def test_first_poll_delay_follows_the_documented_initial_waits(
    task_type: str, captchaai: float, twocaptcha: float
) -> None:
    assert first_poll_delay(task_type) == captchaai
    assert first_poll_delay(task_type, dialect=Dialect.TWOCAPTCHA) == twocaptcha
