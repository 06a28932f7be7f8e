"""The bound under which the credit fast path settles: below it a settlement makes no overage and
crosses no usage threshold, whatever exactly was used; one token more and it does one of them."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

from services.billing.ledger import (
    USAGE_THRESHOLDS_PERCENT,
    CreditAccount,
    _most_used_for_a_quiet_settlement,
)

START = datetime(2031, 3, 1, tzinfo=UTC)


def account(included: int, purchased: int, used: int, notified: int) -> CreditAccount:
    return CreditAccount(
        account_id="u",
        plan_id="free",
        hard_stop=True,
        period_start=START,
        period_end=START,
        included_tokens=included,
        purchased_tokens=purchased,
        used_tokens=used,
        reserved_tokens=0,
        notified_percent=notified,
    )


def announces(before: CreditAccount, tokens: int) -> bool:
    """What the settlement's events depend on, as `CreditLedger.settle` computes it: overage it
    makes, or a usage threshold it crosses (`_announce_thresholds`)."""
    used = before.used_tokens + tokens
    overage = max(0, used - before.included_tokens - before.purchased_tokens) - before.overage_tokens
    if overage:
        return True
    if before.included_tokens <= 0:
        return False
    used_percent = used * 100 // before.included_tokens
    return any(before.notified_percent < t <= used_percent for t in USAGE_THRESHOLDS_PERCENT)


def test_below_the_bound_nothing_is_announced_and_just_above_it_something_is() -> None:
    for included, purchased, notified, tokens in itertools.product(
        (0, 1, 7, 99, 100, 1_000, 100_000), (0, 5, 333), (0, 80, 100), (0, 1, 3, 250)
    ):
        bound = _most_used_for_a_quiet_settlement(account(included, purchased, 0, notified), tokens)
        for used in range(max(0, bound - 3), bound + 1):
            assert not announces(account(included, purchased, used, notified), tokens), (
                included,
                purchased,
                notified,
                tokens,
                used,
            )
        if tokens > 0:
            # One token more and it does: the bound gives nothing away.
            assert announces(account(included, purchased, bound + 1, notified), tokens)
