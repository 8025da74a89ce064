"""The `logins` of a relay's table summary, as the operator reads them."""

from __future__ import annotations

import pytest

from vncgate.common.model import LOGIN_REFUSED, LoginOutcome, login_outcome_from_json


def test_an_outcome_round_trips() -> None:
    outcome = LoginOutcome(LOGIN_REFUSED, 1_700_000_000.5, "refused the stored credential")
    assert login_outcome_from_json(outcome.to_json()) == outcome


@pytest.mark.parametrize("body", [
    None, [], "refused", {"result": "refused"}, {"result": "maybe", "at": 1.0},
    {"result": "ok", "at": "yesterday"}, {"result": "ok", "at": True},
])
def test_anything_else_is_ignored(body: object) -> None:
    # (A newer relay's result, or a broken one, must not turn a target Unreachable.)
    assert login_outcome_from_json(body) is None


def test_a_long_reason_is_cut() -> None:
    outcome = login_outcome_from_json({"result": "refused", "at": 1, "reason": "x" * 5000})
    assert outcome is not None and len(outcome.reason) == 512 and outcome.at == 1.0
