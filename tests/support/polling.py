"""Bounded polling: the one way a test waits for something another task, thread or process does.

Tests never sleep a fixed time and hope: they poll the observable condition with a bound, or they
inject a clock. `eventually` is for async tests (it yields to the event loop between attempts, so
servers on that loop keep running); `eventually_sync` is its twin for synchronous tests.

    user = await eventually(lambda: repo.find(user_id), what=f"user {user_id} stored")

The condition may be sync or async. Its first truthy value is returned. On timeout the wait fails
with an AssertionError that names `what` and the last value (or the last retried exception) seen.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_INTERVAL_S = 0.05


class _Attempts:
    """The deadline and the last outcome of a wait, and the failure it turns into."""

    def __init__(
        self, what: str, timeout_s: float, interval_s: float, details: Callable[[], str] | None
    ) -> None:
        if timeout_s <= 0 or interval_s < 0:
            raise ValueError(f"need timeout_s > 0 and interval_s >= 0, got {timeout_s} and {interval_s}")
        self._what = what
        self._timeout_s = timeout_s
        self._details = details
        self._deadline = time.monotonic() + timeout_s
        self.last_value: object = None
        self.last_error: Exception | None = None

    def saw(self, value: object) -> None:
        self.last_value, self.last_error = value, None

    def failed(self, error: Exception) -> None:
        self.last_value, self.last_error = None, error

    def expired(self) -> bool:
        return time.monotonic() >= self._deadline

    def timeout(self) -> AssertionError:
        if self.last_error is not None:
            last = f"last error: {type(self.last_error).__name__}: {self.last_error}"
        else:
            last = f"last value: {self.last_value!r}"
        message = f"not within {self._timeout_s:g} s: {self._what} ({last})"
        if self._details is not None:
            message += f"\n{self._details()}"
        return AssertionError(message)


@overload
async def eventually(
    condition: Callable[[], Awaitable[T | None]],
    *,
    what: str,
    timeout_s: float = ...,
    interval_s: float = ...,
    retrying_on: tuple[type[Exception], ...] = ...,
    alive: Callable[[], None] | None = ...,
    details: Callable[[], str] | None = ...,
) -> T: ...


@overload
async def eventually(
    condition: Callable[[], T | None],
    *,
    what: str,
    timeout_s: float = ...,
    interval_s: float = ...,
    retrying_on: tuple[type[Exception], ...] = ...,
    alive: Callable[[], None] | None = ...,
    details: Callable[[], str] | None = ...,
) -> T: ...


async def eventually(
    condition: Callable[[], object],
    *,
    what: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    interval_s: float = DEFAULT_INTERVAL_S,
    retrying_on: tuple[type[Exception], ...] = (),
    alive: Callable[[], None] | None = None,
    details: Callable[[], str] | None = None,
) -> object:
    """Call `condition` (sync or async) every `interval_s` until it returns a truthy value, and return it.

    - `what` says what is awaited; the timeout's AssertionError names it and the last value seen.
    - `retrying_on`: exceptions that mean "not yet" (a server still starting refuses connections);
      any other exception raised by the condition ends the wait at once.
    - `alive` is called before each attempt and raises when something the condition depends on
      died (a child process exited), so the wait fails at once instead of at its deadline.
    - `details` adds context (a process's output, a delivery report) to the timeout's message.

    The condition is always tried at least once, and once more after the deadline passed.
    """
    attempts = _Attempts(what, timeout_s, interval_s, details)
    while True:
        if alive is not None:
            alive()
        try:
            value = condition()
            if inspect.isawaitable(value):
                value = await value
        except retrying_on as error:
            attempts.failed(error)
        else:
            if value:
                return value
            attempts.saw(value)
        if attempts.expired():
            raise attempts.timeout() from attempts.last_error
        await asyncio.sleep(interval_s)


def eventually_sync(
    condition: Callable[[], T | None],
    *,
    what: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    interval_s: float = DEFAULT_INTERVAL_S,
    retrying_on: tuple[type[Exception], ...] = (),
    alive: Callable[[], None] | None = None,
    details: Callable[[], str] | None = None,
) -> T:
    """`eventually` for synchronous tests: blocks the calling thread between attempts.

    Never call it from a coroutine: it would stop the event loop, and whatever runs on it, while it waits.
    """
    attempts = _Attempts(what, timeout_s, interval_s, details)
    while True:
        if alive is not None:
            alive()
        try:
            value = condition()
        except retrying_on as error:
            attempts.failed(error)
        else:
            if value:
                return value
            attempts.saw(value)
        if attempts.expired():
            raise attempts.timeout() from attempts.last_error
        time.sleep(interval_s)
