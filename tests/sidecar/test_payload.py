"""Pingback payload parsing: the three wire shapes accepted, everything else refused."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

import pytest
from yarl import URL

from captchatask.decision import ResultKind
from captchatask.model import DeliveredBy
from captchatask.provider.codes import Dialect
from captchatask_sidecar.payload import (
    MalformedPingbackError,
    NotAResultError,
    Source,
    from_fields,
    from_json,
    query_fields,
)


def test_captchaai_get_fields_become_a_solved_result() -> None:
    pingback = from_fields([("id", "123"), ("code", "03AGdBq2")], source=Source.GET)
    result = pingback.to_result(dialect=Dialect.CAPTCHAAI)
    assert result.kind is ResultKind.SOLVED
    assert result.token == "03AGdBq2"
    assert result.provider_task_id == "123"
    assert result.delivered_by is DeliveredBy.PINGBACK


def test_an_error_code_is_classified_as_a_task_failure() -> None:
    pingback = from_fields([("id", "9"), ("code", "ERROR_CAPTCHA_UNSOLVABLE")], source=Source.FORM)
    result = pingback.to_result(dialect=Dialect.TWOCAPTCHA)
    assert result.kind is ResultKind.FAILED
    assert result.code == "ERROR_CAPTCHA_UNSOLVABLE"
    assert result.message


@pytest.mark.parametrize("code", ["CAPCHA_NOT_READY", "ERROR_NO_SLOT_AVAILABLE", "ERROR_BRAND_NEW"])
def test_codes_that_are_no_final_result_are_refused(code: str) -> None:
    pingback = from_fields([("id", "9"), ("code", code)], source=Source.GET)
    with pytest.raises(NotAResultError):
        pingback.to_result(dialect=Dialect.CAPTCHAAI)


@pytest.mark.parametrize(
    "pairs",
    [
        [],
        [("id", "1")],
        [("code", "x")],
        [("id", "1"), ("code", "")],
        [("id", "1"), ("code", "   ")],
        [("id", "1/../2"), ("code", "x")],
        [("id", "1" * 65), ("code", "x")],
        [("id", "1"), ("id", "2"), ("code", "x")],
        [("id", "1"), ("code", "x" * 65537)],
        [("id", "1"), ("code", "x"), *[(f"f{i}", "v") for i in range(20)]],
    ],
)
def test_malformed_fields_are_refused(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(MalformedPingbackError):
        from_fields(pairs, source=Source.GET)


def test_anticaptcha_json_solution_is_read_with_its_user_agent() -> None:
    body = {
        "taskId": 7654321,
        "errorId": 0,
        "status": "ready",
        "solution": {"gRecaptchaResponse": "3AHJ", "userAgent": "UA/1"},
        "cost": "0.0007",
    }
    pingback = from_json(json.dumps(body).encode())
    assert (pingback.provider_task_id, pingback.code, pingback.user_agent) == (
        "7654321",
        "3AHJ",
        "UA/1",
    )
    assert pingback.source is Source.JSON


def test_anticaptcha_json_error_becomes_a_failure() -> None:
    body = {"taskId": "77", "errorId": 12, "errorCode": "ERROR_CAPTCHA_UNSOLVABLE"}
    result = from_json(json.dumps(body).encode()).to_result(dialect=Dialect.CAPTCHAAI)
    assert (result.kind, result.code) == (ResultKind.FAILED, "ERROR_CAPTCHA_UNSOLVABLE")


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        b'{"taskId": 1, "status": "processing"}',
        b'{"taskId": true, "status": "ready", "solution": {"token": "x"}}',
        b'{"taskId": 1, "status": "ready", "solution": {}}',
        b'{"taskId": 1, "status": "ready", "solution": {"token": 5}}',
        b'{"taskId": 1, "errorId": 3}',
        b'{"status": "ready", "solution": {"text": "abc"}}',
        b"\xff\xfe",
    ],
)
def test_malformed_json_is_refused(raw: bytes) -> None:
    with pytest.raises(MalformedPingbackError):
        from_json(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "id=1&code=03AG-_x",
        "id=1&code=a+b&&code",
        "=&id=&code==x=y",
        "id=1;code=2",
        "a&b&c",
        "ü=ß&id=1",
    ],
)
def test_the_fast_query_split_agrees_with_the_framework_parser(raw: str) -> None:
    fields = query_fields(raw)
    assert fields == list(URL.build(path="/", query_string=raw, encoded=True).query.items())
    assert fields == parse_qsl(raw, keep_blank_values=True)


def test_a_query_with_escapes_is_left_to_the_framework_parser() -> None:
    assert query_fields("id=1&code=a%2Bb") is None
