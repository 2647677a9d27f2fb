"""Parsers for every reply shape the providers are known to send."""

from __future__ import annotations

import json

import pytest

from captchatask.provider.replies import (
    MalformedReplyError,
    Reply,
    Solution,
    ThreadsInfo,
    is_not_ready,
    parse_balance,
    parse_bulk,
    parse_reply,
    parse_solution,
    parse_solution_text,
    parse_task_id,
    parse_threads_info,
)


@pytest.mark.parametrize(
    ("body", "ok", "payload"),
    [
        ("OK|2122988149", True, "2122988149"),
        ('{"status":1,"request":"2122988149"}', True, "2122988149"),
        ('{"status":1,"request":3397637370}', True, "3397637370"),
        ('{"status":"1","request":"x"}', True, "x"),
        ("CAPCHA_NOT_READY", False, "CAPCHA_NOT_READY"),
        ('{"status":0,"request":"CAPCHA_NOT_READY"}', False, "CAPCHA_NOT_READY"),
        ("ERROR_UPLOAD", False, "ERROR_UPLOAD"),  # plain text despite json=1
        ("ERROR: 1005", False, "ERROR: 1005"),
        ("MAX_USER_TURN\n", False, "MAX_USER_TURN"),
        ("IP_BANNED", False, "IP_BANNED"),
        ("OK_REPORT_RECORDED", True, "OK_REPORT_RECORDED"),
        ('{"status":1,"request":"OK_REPORT_RECORDED"}', True, "OK_REPORT_RECORDED"),
        ("OK", True, "OK"),
        ("17.87942", True, "17.87942"),
        ('{"status":1,"request":"17.87942"}', True, "17.87942"),
        ('{"status":1,"request":17.5}', True, "17.5"),
    ],
)
def test_reply_shapes_decode_to_status_and_request(body: str, ok: bool, payload: str) -> None:
    reply = parse_reply(body)
    assert (reply.ok, reply.request) == (ok, payload)


def test_json_error_text_is_exposed() -> None:
    reply = parse_reply('{"status":0,"request":"ERROR_WRONG_USER_KEY","error_text":"bad key"}')
    assert reply.error_text == "bad key"
    assert parse_reply('{"status":0,"request":"E"}').error_text is None


@pytest.mark.parametrize(
    "body",
    [
        "",
        "   ",
        "<html><head><title>502 Bad Gateway</title></head></html>",
        "<!DOCTYPE html><html>500</html>",
        "Internal Server Error",
        "[1,2]",
        '{"status":',
        '{"request":"x"}',
        '{"status":"yes","request":"x"}',
        '{"status":1,"request":null}',
        '{"status":1,"request":true}',
    ],
)
def test_non_api_bodies_are_malformed(body: str) -> None:
    with pytest.raises(MalformedReplyError):
        parse_reply(body)


def test_task_id_accepts_ints_and_strings_and_rejects_the_rest() -> None:
    assert parse_task_id(parse_reply('{"status":1,"request":3397637370}')) == "3397637370"
    assert parse_task_id(parse_reply("OK|0123456789")) == "0123456789"
    with pytest.raises(MalformedReplyError):
        parse_task_id(parse_reply("OK|abc"))
    with pytest.raises(MalformedReplyError):
        parse_task_id(parse_reply("ERROR_PAGEURL"))


def test_plain_token_answer() -> None:
    assert parse_solution(parse_reply("OK|03AGdBq24")) == Solution("03AGdBq24")


def test_enterprise_answer_reads_result_and_user_agent() -> None:
    reply = parse_reply('{"status":1,"request":"ignored","result":"TOKEN","user_agent":"UA/1"}')
    assert parse_solution(reply) == Solution("TOKEN", user_agent="UA/1")


def test_enterprise_answer_without_request_field() -> None:
    reply = parse_reply('{"status":1,"result":"TOKEN","user_agent":"UA/1"}')
    assert parse_solution(reply).token == "TOKEN"


def test_geetest_json_string_answer_is_decoded_and_kept_raw() -> None:
    answer = '{"challenge":"c","validate":"v","seccode":"s"}'
    body = json.dumps({"status": 1, "request": answer})
    solution = parse_solution(parse_reply(body))
    assert solution.token == '{"challenge":"c","validate":"v","seccode":"s"}'
    assert solution.data == {"challenge": "c", "validate": "v", "seccode": "s"}


def test_geetest_object_answer_is_reencoded() -> None:
    solution = parse_solution(parse_reply('{"status":1,"request":{"challenge":"c"}}'))
    assert solution.token == '{"challenge":"c"}'
    assert solution.data == {"challenge": "c"}


def test_geetest_plain_blog_form_is_decoded() -> None:
    solution = parse_solution(parse_reply("OK|challenge:c1,validate:v1,seccode:s1|jordan"))
    assert solution.data == {"challenge": "c1", "validate": "v1", "seccode": "s1|jordan"}


def test_grid_answers_decode_to_lists() -> None:
    assert parse_solution(parse_reply('{"status":1,"request":"[1,4,7]"}')).data == [1, 4, 7]
    assert parse_solution(parse_reply("OK|click:3/8/9")).data == [3, 8, 9]


def test_image_text_answer_has_no_data() -> None:
    assert parse_solution_text("ABC123") == Solution("ABC123")
    assert parse_solution_text("{not json").data is None


def test_solution_requires_a_success() -> None:
    with pytest.raises(MalformedReplyError):
        parse_solution(parse_reply("CAPCHA_NOT_READY"))
    with pytest.raises(MalformedReplyError):
        parse_solution(Reply(ok=True, request=""))


@pytest.mark.parametrize(
    "body",
    [
        "tok1|CAPCHA_NOT_READY|ERROR_CAPTCHA_UNSOLVABLE",
        "OK|tok1|CAPCHA_NOT_READY|ERROR_CAPTCHA_UNSOLVABLE",
        '{"status":1,"request":"tok1|CAPCHA_NOT_READY|ERROR_CAPTCHA_UNSOLVABLE"}',
    ],
)
def test_bulk_replies_split_in_id_order(body: str) -> None:
    assert parse_bulk(body, ["1", "2", "3"]) == {
        "1": "tok1",
        "2": "CAPCHA_NOT_READY",
        "3": "ERROR_CAPTCHA_UNSOLVABLE",
    }


def test_bulk_reply_with_wrong_item_count_is_malformed() -> None:
    with pytest.raises(MalformedReplyError):
        parse_bulk("a|b", ["1", "2", "3"])
    with pytest.raises(MalformedReplyError):
        parse_bulk("ERROR_WRONG_USER_KEY", ["1", "2"])


def test_a_bulk_answer_that_contains_the_separator_stays_one_item() -> None:
    """GeeTest v3 answers are JSON whose ``seccode`` ends in ``|jordan``: not a separator."""
    geetest = json.dumps({"challenge": "c1", "validate": "v1", "seccode": "v1|jordan"})
    body = json.dumps({"status": 1, "request": f"tok1|{geetest}|CAPCHA_NOT_READY"})

    assert parse_bulk(body, ["1", "2", "3"]) == {
        "1": "tok1",
        "2": geetest,
        "3": "CAPCHA_NOT_READY",
    }


def test_bulk_single_id_error_is_an_item() -> None:
    assert parse_bulk("ERROR_WRONG_CAPTCHA_ID", ["1"]) == {"1": "ERROR_WRONG_CAPTCHA_ID"}


@pytest.mark.parametrize(
    ("body", "balance"),
    [
        ("17.87942", 17.87942),
        ('{"status":1,"request":"1.234"}', 1.234),
        ('{"status":1,"request":5}', 5.0),
    ],
)
def test_balance_as_string_or_number(body: str, balance: float) -> None:
    assert parse_balance(parse_reply(body)) == balance


def test_balance_rejects_errors() -> None:
    with pytest.raises(MalformedReplyError):
        parse_balance(parse_reply("ERROR_KEY_DOES_NOT_EXIST"))


@pytest.mark.parametrize(
    "body",
    [
        '{"threads": 10, "working_threads": 3}',
        '{"threads": "10", "working_threads": "3"}',
        '{"status": 1, "request": "OK", "threads": 10, "working_threads": 3}',
    ],
)
def test_threadsinfo_with_ints_or_strings_and_with_or_without_status(body: str) -> None:
    info = parse_threads_info(parse_reply(body))
    assert info == ThreadsInfo(threads=10, working_threads=3)
    assert info.free_threads == 7


def test_threadsinfo_without_counts_is_malformed() -> None:
    with pytest.raises(MalformedReplyError):
        parse_threads_info(parse_reply('{"status":0,"request":"ERROR_WRONG_USER_KEY"}'))


def test_not_ready_accepts_both_spellings() -> None:
    assert is_not_ready("CAPCHA_NOT_READY")
    assert is_not_ready("CAPTCHA_NOT_READY")
    assert not is_not_ready("ERROR_CAPTCHA_UNSOLVABLE")
