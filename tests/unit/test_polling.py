"""The bounded polling helper: returns the first truthy value, fails naming what it waited for."""

from __future__ import annotations

import pytest

from tests.support.polling import eventually, eventually_sync


class Countdown:
    """A condition that holds from its `ready_on`-th call on; counts its calls."""

    def __init__(self, ready_on: int, value: object = "ready") -> None:
        self.ready_on = ready_on
        self.value = value
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        return self.value if self.calls >= self.ready_on else None

    async def asynchronously(self) -> object:
        return self()


async def test_returns_the_first_truthy_value_of_a_sync_or_async_condition() -> None:
    sync_condition = Countdown(3, value={"id": 7})
    assert await eventually(sync_condition, what="three calls", interval_s=0) == {"id": 7}
    assert sync_condition.calls == 3

    async_condition = Countdown(2)
    assert await eventually(async_condition.asynchronously, what="two calls", interval_s=0) == "ready"
    assert async_condition.calls == 2


async def test_a_condition_that_holds_at_once_is_called_once() -> None:
    condition = Countdown(1)
    assert await eventually(condition, what="at once", timeout_s=0.01, interval_s=60) == "ready"
    assert condition.calls == 1


async def test_a_timeout_names_what_was_awaited_and_the_last_value() -> None:
    def empty_queue() -> list[int]:
        return []

    with pytest.raises(AssertionError, match=r"not within 0\.05 s: the queue filled \(last value: \[\]\)"):
        await eventually(empty_queue, what="the queue filled", timeout_s=0.05, interval_s=0.01)


async def test_the_timeout_message_carries_the_details() -> None:
    with pytest.raises(AssertionError, match="process output:\nboom") as failure:
        await eventually(
            lambda: False,
            what="a reply",
            timeout_s=0.02,
            interval_s=0.01,
            details=lambda: "process output:\nboom",
        )
    assert "last value: False" in str(failure.value)


async def test_retried_exceptions_mean_not_yet_and_the_last_one_is_reported() -> None:
    calls = 0

    def refusing_twice() -> str:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise ConnectionRefusedError(f"refused #{calls}")
        return "connected"

    assert (
        await eventually(refusing_twice, what="a connection", retrying_on=(OSError,), interval_s=0)
        == "connected"
    )

    def always_refusing() -> str:
        raise ConnectionRefusedError("still starting")

    with pytest.raises(AssertionError, match="last error: ConnectionRefusedError: still starting") as failure:
        await eventually(
            always_refusing, what="a connection", retrying_on=(OSError,), timeout_s=0.02, interval_s=0.01
        )
    assert isinstance(failure.value.__cause__, ConnectionRefusedError)


async def test_other_exceptions_end_the_wait_at_once() -> None:
    condition = Countdown(100)

    def broken() -> object:
        condition()
        raise KeyError("bug in the condition")

    with pytest.raises(KeyError, match="bug in the condition"):
        await eventually(broken, what="anything", retrying_on=(OSError,), timeout_s=5, interval_s=0)
    assert condition.calls == 1


async def test_alive_ends_the_wait_at_once_when_it_raises() -> None:
    condition = Countdown(100)
    checks = 0

    def alive() -> None:
        nonlocal checks
        checks += 1
        if checks == 3:
            raise AssertionError("the worker exited")

    with pytest.raises(AssertionError, match="the worker exited"):
        await eventually(condition, what="a mail", alive=alive, timeout_s=5, interval_s=0)
    assert condition.calls == 2


async def test_nonsense_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        await eventually(lambda: True, what="x", timeout_s=0)
    with pytest.raises(ValueError, match="interval_s"):
        eventually_sync(lambda: True, what="x", interval_s=-1)


def test_the_sync_twin_behaves_alike() -> None:
    condition = Countdown(3)
    assert eventually_sync(condition, what="three calls", interval_s=0) == "ready"
    assert condition.calls == 3

    def refusing() -> str:
        raise ConnectionRefusedError("not yet")

    with pytest.raises(AssertionError, match=r"not within 0\.02 s: an answer \(last error: Connection"):
        eventually_sync(refusing, what="an answer", retrying_on=(OSError,), timeout_s=0.02, interval_s=0.01)
