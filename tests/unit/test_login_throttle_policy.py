"""The arithmetic of sign-in throttling (ThrottlePolicy): which failure locks for how long."""

from __future__ import annotations

from datetime import timedelta

import pytest

from services.auth.throttle import LoginThrottleSettings, ThrottlePolicy, account_key, client_ip_key


def test_account_defaults_back_off_exponentially_then_lock_out() -> None:
    policy = ThrottlePolicy()
    steps = {failures: policy.lock_after(failures) for failures in range(1, 13)}
    assert steps == {
        1: None,
        2: None,
        3: None,
        4: (timedelta(seconds=1), False),
        5: (timedelta(seconds=2), False),
        6: (timedelta(seconds=4), False),
        7: (timedelta(seconds=8), False),
        8: (timedelta(seconds=16), False),
        9: (timedelta(seconds=32), False),
        10: (timedelta(minutes=15), True),
        11: (timedelta(minutes=15), True),
        12: (timedelta(minutes=15), True),
    }


def test_backoff_is_capped() -> None:
    policy = ThrottlePolicy(free_failures=0, backoff_max=timedelta(seconds=10), lockout_after=10_000)
    assert policy.lock_after(5) == (timedelta(seconds=10), False)
    assert policy.lock_after(9_999) == (timedelta(seconds=10), False)


def test_client_ips_get_more_room_than_accounts() -> None:
    settings = LoginThrottleSettings()
    assert settings.client_ip.free_failures > settings.account.free_failures
    assert settings.client_ip.lockout_after > settings.account.lockout_after


@pytest.mark.parametrize(
    "arguments",
    [
        {"free_failures": -1},
        {"free_failures": 10, "lockout_after": 10},
        {"backoff_base": timedelta(0)},
        {"backoff_base": timedelta(minutes=10), "backoff_max": timedelta(minutes=5)},
        {"lockout_duration": timedelta(0)},
        {"forget_after": timedelta(minutes=15)},
    ],
)
def test_inconsistent_policies_are_refused(arguments: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ThrottlePolicy(**arguments)  # type: ignore[arg-type]


def test_keys() -> None:
    assert account_key("ada@example.com") == "email:ada@example.com"
    assert len(account_key("a" * 1000)) == len("email:") + 320
    assert client_ip_key(" 192.0.2.1 ") == "ip:192.0.2.1"
    assert client_ip_key("") is None
