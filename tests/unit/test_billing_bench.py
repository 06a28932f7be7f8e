"""`scripts/bench billing`'s arguments and bounds, the client's book, and per-concurrency baselines."""

from __future__ import annotations

import pytest

from benchmarks.billing import (
    CONTENDED_ESTIMATE,
    FREE_ALLOWANCE,
    PAIR_ESTIMATE,
    PAIR_USAGE,
    Book,
    _arguments,
    contended_tokens,
    spending_attempts,
    spread_tokens_per_user,
)
from benchmarks.harness import Measurement, Report, goal_check


def measurement(name: str, per_second: float, concurrency: int = 1) -> Measurement:
    return Measurement(name, concurrency, 1, 0, 1.0, per_second, 1.0, 1.0, 1.0)


def test_the_defaults_run_both_databases_at_1_and_32_callers() -> None:
    arguments = _arguments([])

    assert arguments.databases == ["postgresql", "sqlite"]
    assert arguments.concurrency == [1, 32]
    assert (arguments.requests, arguments.seconds, arguments.users) == (20_000, 5.0, 1_000)
    assert arguments.spend_seconds == 30.0


def test_one_database_and_repeated_values_are_taken_once() -> None:
    arguments = _arguments(["--databases", "sqlite", "sqlite", "--concurrency", "4", "4", "1"])

    assert arguments.databases == ["sqlite"]
    assert arguments.concurrency == [4, 1]


@pytest.mark.parametrize(
    "argv",
    [
        ["--concurrency", "0"],
        ["--concurrency", "257"],
        ["--requests", "0"],
        ["--seconds", "0"],
        ["--seconds", "601"],
        ["--spend-seconds", "0"],
        ["--users", "0"],
        ["--databases", "mysql"],
    ],
)
def test_values_out_of_bounds_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        _arguments(argv)

    assert exited.value.code == 2
    assert "error" in capsys.readouterr().err


def test_spread_users_are_never_sized_to_meet_the_hard_stop(capsys: pytest.CaptureFixture[str]) -> None:
    # 1,000 pairs per user at two concurrencies would reserve 600,000 tokens each.
    with pytest.raises(SystemExit):
        _arguments(["--users", "10", "--requests", "5000"])
    assert "spend a user's free" in capsys.readouterr().err

    allowed = _arguments(["--users", "100", "--requests", "10000"])
    assert spread_tokens_per_user(allowed.requests, allowed.users, allowed.concurrency) <= FREE_ALLOWANCE


def test_the_contended_user_is_never_sized_to_meet_the_hard_stop(capsys: pytest.CaptureFixture[str]) -> None:
    most = FREE_ALLOWANCE // CONTENDED_ESTIMATE.tokens - 32
    assert contended_tokens(most, [1, 32]) <= FREE_ALLOWANCE
    assert contended_tokens(most + 1, [1, 32]) > FREE_ALLOWANCE

    with pytest.raises(SystemExit):
        _arguments(["--requests", str(most + 1), "--users", "100000"])
    assert "contended user" in capsys.readouterr().err


def test_spread_tokens_count_every_concurrency_and_its_warm_up() -> None:
    # (100 + 1) / 10 -> 11 pairs, (100 + 32) / 10 -> 14 pairs.
    assert spread_tokens_per_user(100, 10, [1, 32]) == (11 + 14) * PAIR_ESTIMATE.tokens


def test_spending_tries_twice_what_the_allowance_pays_for() -> None:
    assert spending_attempts() == 2 * FREE_ALLOWANCE // PAIR_USAGE.tokens == 800


def test_the_book_follows_holds_settlements_and_refusals() -> None:
    book = Book()
    book.open("u")
    book.reserved("u", 300)
    book.reserved("u", 300)
    book.settled("u", 300, 250)
    book.refused("u")

    assert (book.used["u"], book.held["u"]) == (250, 300)
    assert book.total_refusals() == 1
    assert book.pairs_settled("u", PAIR_USAGE) == 1


def test_each_measurement_is_compared_with_its_own_baseline() -> None:
    report = Report(benchmark="b", baseline="base c1")
    report.measurements += [
        measurement("base c1", 100.0),
        measurement("work c1", 50.0),
        measurement("base c32", 400.0, 32),
        measurement("work c32", 100.0, 32),
    ]
    report.baseline_of.update({"base c32": "base c32", "work c32": "base c32"})

    assert report.ratios() == {"base c1": 1.0, "work c1": 0.5, "base c32": 1.0, "work c32": 0.25}


def test_goal_checks_read_both_ways() -> None:
    assert goal_check(1_200.0, 1_000.0, 3_000.0, at_most=False) == {
        "value": 1_200.0,
        "goal": 1_000.0,
        "met": True,
        "moonshot": 3_000.0,
        "moonshot_met": False,
    }
    assert goal_check(0, 0, 0, at_most=True)["met"] is True
    assert goal_check(1, 0, 0, at_most=True)["met"] is False
