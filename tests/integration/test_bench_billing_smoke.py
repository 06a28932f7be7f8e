"""`scripts/bench billing` in miniature on SQLite: every workload runs, and the budgets stay exact."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.billing import _arguments, run

# Two concurrencies of three short workloads, then one user spent to the hard stop.
DEADLINE_S = 60.0


@pytest.mark.timeout(DEADLINE_S + 20)
async def test_the_billing_benchmark_measures_pairs_and_keeps_every_balance_exact() -> None:
    arguments = _arguments(
        ["--databases", "sqlite", "--concurrency", "1", "4", "--requests", "40", "--users", "8"]
    )
    async with asyncio.timeout(DEADLINE_S):
        report, failed = await run(arguments)

    assert failed == []
    names = [m.name for m in report.measurements]
    assert names == [
        f"sqlite c{c} {workload}"
        for c in (1, 4)
        for workload in ("Health.Check", "pairs, 8 users", "pairs, one user")
    ]
    assert all(m.requests == 40 and m.errors == 0 for m in report.measurements)
    spending = report.notes["databases"]["sqlite"]["spending"]  # type: ignore[index]
    assert spending["spent"] and spending["refused_insufficient_credits"] > 0
    assert spending["pairs_settled"] <= spending["most_pairs_payable"]
    assert report.ratios()["sqlite c4 Health.Check"] == 1.0
