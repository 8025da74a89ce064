"""`token_expiry`: the `exp` of a JWT the API server has authenticated, read defensively (a
token's claims are the client's bytes until then, and a bug must not turn into a crash)."""

from __future__ import annotations

import base64
import json

import pytest

from vncgate.relay.access.tokenreview import MAX_TOKEN_LENGTH, token_expiry


def jwt(claims: object, raw: bytes | None = None) -> str:
    payload = raw if raw is not None else json.dumps(claims).encode()
    return "eyJhbGciOiJSUzI1NiJ9." + base64.urlsafe_b64encode(payload).decode().rstrip("=") \
        + ".c2ln"


def test_the_exp_claim_in_epoch_seconds() -> None:
    assert token_expiry(jwt({"exp": 1_900_000_000, "sub": "x"})) == 1_900_000_000.0
    assert token_expiry(jwt({"exp": 1_900_000_000.5})) == 1_900_000_000.5


@pytest.mark.parametrize("token", [
    jwt({"sub": "no exp"}),
    jwt({"exp": "1900000000"}),  # a string, not a number
    jwt({"exp": True}),  # a bool is an int in Python: not a time
    jwt({"exp": None}),
    jwt([1, 2, 3]),  # claims that are not an object
    jwt(None, raw=b"NaN"),
    jwt(None, raw=b'{"exp": NaN}'),
    jwt(None, raw=b'{"exp": Infinity}'),
    jwt(None, raw=b"\xff\xfe not json"),
    jwt(None, raw=b'{"exp": 1e999}'),  # overflows to inf
    "eyJ.only-two",
    "eyJ.a.b.c",
    "eyJ.!!!not-base64!!!.sig",
    "eyJ." + "A" * (MAX_TOKEN_LENGTH + 1) + ".sig",
    "",
])
def test_anything_else_is_no_expiry(token: str) -> None:
    assert token_expiry(token) is None
