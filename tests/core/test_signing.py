"""Pingback tokens: stateless, per task instance, constant-time verified, rotatable."""

import pytest

from captchatask.model import TaskRef
from captchatask.signing import (
    PINGBACK_PREFIX,
    PingbackSigner,
    SigningKeyError,
    parse_path_parts,
)

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
REF = TaskRef("shop", "login-1", "3f1c2a4e-1111-4222-8333-444455556666")


def test_token_is_deterministic_and_url_safe() -> None:
    signer = PingbackSigner([KEY])
    token = signer.token(REF)
    assert token == PingbackSigner([KEY]).token(REF)
    assert len(token) == 24
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert signer.verify(REF, token)


def test_token_binds_the_task_instance_not_just_its_name() -> None:
    signer = PingbackSigner([KEY])
    recreated = TaskRef(REF.namespace, REF.name, "9f1c2a4e-1111-4222-8333-444455556666")
    assert not signer.verify(recreated, signer.token(REF))


@pytest.mark.parametrize(
    "other",
    [
        TaskRef("shop", "login-2", REF.uid),
        TaskRef("other", "login-1", REF.uid),
    ],
)
def test_a_token_for_one_task_does_not_verify_for_another(other: TaskRef) -> None:
    signer = PingbackSigner([KEY])
    assert not signer.verify(other, signer.token(REF))


def test_a_token_made_with_another_key_is_rejected() -> None:
    assert not PingbackSigner([KEY]).verify(REF, PingbackSigner([OTHER_KEY]).token(REF))


def test_rotation_signs_with_the_first_key_and_accepts_the_retired_one() -> None:
    old = PingbackSigner([OTHER_KEY]).token(REF)
    rotated = PingbackSigner([KEY, OTHER_KEY])
    assert rotated.verify(REF, old)
    assert rotated.token(REF) == PingbackSigner([KEY]).token(REF)


@pytest.mark.parametrize("token", ["", "short", "!" * 24, "A" * 25, "A" * 23])
def test_malformed_tokens_are_rejected_without_error(token: str) -> None:
    assert not PingbackSigner([KEY]).verify(REF, token)


def test_weak_or_missing_keys_are_refused() -> None:
    with pytest.raises(SigningKeyError):
        PingbackSigner([])
    with pytest.raises(SigningKeyError):
        PingbackSigner([b"short"])


def test_the_key_never_appears_in_repr() -> None:
    assert "k" * 32 not in repr(PingbackSigner([KEY]))


def test_url_and_path_round_trip_through_the_parser() -> None:
    signer = PingbackSigner([KEY])
    url = signer.url("https://cb.example.com/", REF)
    assert url.startswith("https://cb.example.com" + PINGBACK_PREFIX + "/shop/login-1/")
    _, _, rest = url.partition(PINGBACK_PREFIX + "/")
    parsed = parse_path_parts(*rest.split("/"))
    assert parsed is not None
    assert parsed.ref == REF
    assert signer.verify(parsed.ref, parsed.token)


@pytest.mark.parametrize(
    "parts",
    [
        ("Shop", "login-1", REF.uid, "A" * 24),  # upper case is not a namespace
        ("shop", "login_1", REF.uid, "A" * 24),  # underscore is not a name
        ("shop", "login-1", "not-a-uid", "A" * 24),
        ("shop", "login-1", REF.uid, "A" * 10),
        ("s" * 64, "login-1", REF.uid, "A" * 24),
    ],
)
def test_parser_refuses_what_cannot_be_ours(parts: tuple[str, str, str, str]) -> None:
    assert parse_path_parts(*parts) is None
