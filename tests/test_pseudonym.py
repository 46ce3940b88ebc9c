"""Keyed pseudonyms: stable across formats, keyed, domain-separated and versioned, never
the number itself; and the secret's strength check at start."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import date

import pytest

from likvard.config import ConfigError, Settings, pseudonym_secret_weakness
from likvard.pseudonym import (
    DOMAIN,
    ERROR_CODES,
    VERSION,
    InvalidIdentityNumber,
    ItemError,
    normalise,
    pseudonymise,
    pseudonymise_all,
)

SECRET = b"a-test-secret-of-enough-length-7f3c"


@pytest.mark.parametrize("number", ["19121212-1212", "191212121212", "121212+1212"])
def test_formats_of_one_number_give_one_pseudonym(number: str) -> None:
    assert normalise(number) == "191212121212"
    assert pseudonymise(number, SECRET) == pseudonymise("191212121212", SECRET)


def test_pseudonym_is_keyed_hex_and_hides_the_number() -> None:
    p = pseudonymise("19121212-1212", SECRET)
    assert len(p) == 64 and all(c in "0123456789abcdef" for c in p)
    assert "121212" not in p
    assert pseudonymise("19121212-1212", b"another-secret-of-length") != p


def test_coordination_number_is_accepted() -> None:
    # day 72 = 12 + 60: a coordination number
    assert normalise("701072-1236") == "197010721236"


@pytest.mark.parametrize("bad", ["19121212-1213", "abc", "1912121212", "19121312-1212", ""])
def test_invalid_numbers_are_refused_without_echoing_them(bad: str) -> None:
    with pytest.raises(InvalidIdentityNumber) as info:
        normalise(bad)
    if bad:
        assert bad not in str(info.value)


@pytest.mark.parametrize(
    ("number", "born"),
    [
        ("261130-0001", "20261130"),  # earlier this year: born this year
        ("261215-0009", "19261215"),  # later this year: a hundred years ago
        ("280101-0006", "19280101"),  # 2028 would be in the future
        ("000101-0008", "20000101"),
        ("990101-0000", "19990101"),
        ("000101+0008", "19000101"),  # '+': over 100
    ],
)
def test_a_ten_digit_number_is_born_on_the_latest_date_not_in_the_future(
    number: str, born: str
) -> None:
    assert normalise(number, today=date(2026, 12, 1))[:8] == born


# --- domain separation and the version -----------------------------------------------------
def test_the_hmac_input_is_domain_separated_and_versioned() -> None:
    assert VERSION == "v1"
    assert DOMAIN == b"likvard/pseudonym/v1\x00"
    expected = hmac.new(SECRET, b"likvard/pseudonym/v1\x00191212121212", hashlib.sha256)
    assert pseudonymise("19121212-1212", SECRET) == expected.hexdigest()
    # the HMAC of the bare number (what a district system computed before) is another value
    bare = hmac.new(SECRET, b"191212121212", hashlib.sha256).hexdigest()
    assert pseudonymise("19121212-1212", SECRET) != bare


# --- a batch, as POST /pseudonyms answers it ----------------------------------------------
def test_a_batch_gives_each_number_its_pseudonym_in_order_and_codes_for_the_invalid() -> None:
    numbers = ["19121212-1212", "19121212-1213", "abc", "19121312-1211", "701072-1236"]
    batch = pseudonymise_all(numbers, SECRET)
    assert batch.pseudonyms == [
        pseudonymise("19121212-1212", SECRET),
        None,
        None,
        None,
        pseudonymise("701072-1236", SECRET),
    ]
    assert batch.errors == [
        ItemError(1, "wrong-check-digit"),
        ItemError(2, "malformed"),
        ItemError(3, "invalid-date"),
    ]
    assert {e.error for e in batch.errors} == set(ERROR_CODES)


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        ("19121212-1213", "wrong-check-digit"),
        ("1912121212", "wrong-check-digit"),
        ("", "malformed"),
        ("19121212/1212", "malformed"),
        ("19121312-1211", "invalid-date"),  # month 13, its check digit right
    ],
)
def test_each_invalid_number_has_its_code(bad: str, code: str) -> None:
    with pytest.raises(InvalidIdentityNumber) as info:
        normalise(bad)
    assert info.value.code == code


# --- the secret's strength -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("secret", "weakness"),
    [
        (b"", "0 bytes long"),
        (b"short-but-random-9f8e7d", "23 bytes long"),
        (b"a" * 64, "entropy"),
        (b"ab" * 32, "entropy"),
        (b"password" * 4, "repeats a shorter pattern"),
        (b"aaaaaaaabbbbbbbbccccccccdddddddd", "entropy"),
        (b"0123456789abcdef" * 2, "repeats a shorter pattern"),
        (b"s3cr3t-Kl9q" * 3, "repeats a shorter pattern"),
        (b"abcdefghijklmnopqrstuvwxyz0123456789", "in sequence"),
        (secrets.token_hex(32).encode(), None),
        (secrets.token_hex(16).encode(), None),  # 32 hex characters: the shortest allowed
        (secrets.token_urlsafe(32).encode(), None),
        (b"test-pseudonym-secret-0123456789", None),  # conftest.py's
    ],
)
def test_the_secret_is_checked_for_length_and_entropy(secret: bytes, weakness: str | None) -> None:
    found = pseudonym_secret_weakness(secret)
    if weakness is None:
        assert found is None
    else:
        assert found is not None and weakness in found


@pytest.mark.parametrize("secret", [b"a" * 40, b"ab" * 20, b"tooshort"])
def test_a_service_refuses_to_start_with_a_weak_secret_and_never_prints_it(secret: bytes) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(pseudonym_secret=secret).require_pseudonym_secret()
    message = str(info.value)
    assert "LIKVARD_PSEUDONYM_SECRET is too weak" in message and "token_hex(32)" in message
    assert secret.decode() not in message


def test_a_missing_secret_says_how_to_make_one() -> None:
    with pytest.raises(ConfigError, match=r"not set.*token_hex"):
        Settings().require_pseudonym_secret()


def test_a_strong_secret_is_returned_as_given() -> None:
    strong = secrets.token_hex(32).encode()
    assert Settings(pseudonym_secret=strong).require_pseudonym_secret() == strong
