"""The pure logic of credential changes: the watched cache (what it answers, forgets and refuses to
keep), the hub and the stream auth sends each edge, and the feed's confirmation. Time is injected
everywhere except in the stream, whose heartbeat is made short."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from services.common.credential_changes import (
    MAX_ANSWER_WAIT_S,
    MAX_CONFIRMED_AGE_S,
    CredentialChangeHub,
    CredentialNews,
    FeedConfirmation,
    WatchedCache,
)


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


class Age:
    def __init__(self, age_s: float | None = 0.0) -> None:
        self.age_s = age_s

    def __call__(self) -> float | None:
        return self.age_s


def cache(clock: Clock, age: Age, *, settle_s: float = 0.0, max_entries: int = 100) -> WatchedCache[str]:
    return WatchedCache(max_entries=max_entries, confirmed_age_s=age, timer=clock, settle_s=settle_s)


def stored(entries: WatchedCache[str], key: str, user_id: str, *, ttl_s: float = 60.0) -> bool:
    return entries.put(key, user_id, f"answer for {key}", ttl_s=ttl_s, ticket=entries.ticket())


# ---- the watched cache ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age_s", "trusted"),
    [(0.0, True), (MAX_CONFIRMED_AGE_S - 0.01, True), (MAX_CONFIRMED_AGE_S, False), (None, False)],
)
def test_the_cache_answers_only_while_its_feed_is_confirmed(age_s: float | None, trusted: bool) -> None:
    age = Age(0.0)
    entries = cache(Clock(), age)
    assert stored(entries, "k1", "alice")

    age.age_s = age_s
    assert entries.trusted is trusted
    assert entries.get("k1") == ("answer for k1" if trusted else None)
    # Nothing is kept while it cannot be trusted either: it could not be forgotten in time.
    assert stored(entries, "k2", "bob") is trusted


def test_forgetting_a_user_drops_that_users_answers_only() -> None:
    entries = cache(Clock(), Age())
    for key, user in (("k1", "alice"), ("k2", "alice"), ("k3", "bob")):
        assert stored(entries, key, user)

    assert entries.forget_user("alice") == 2
    assert entries.forget_user("carol") == 0
    assert (entries.get("k1"), entries.get("k2"), entries.get("k3")) == (None, None, "answer for k3")
    assert entries.forget_everything() == 1
    assert len(entries) == 0


def test_an_answer_asked_before_a_change_to_its_user_is_not_kept() -> None:
    entries = cache(Clock(), Age())
    before = entries.ticket()
    entries.forget_user("alice")

    assert not entries.put("k1", "alice", "stale", ttl_s=60, ticket=before)
    assert entries.put("k2", "bob", "fine", ttl_s=60, ticket=before)
    assert entries.put("k1", "alice", "fresh", ttl_s=60, ticket=entries.ticket())

    before = entries.ticket()
    entries.forget_everything()
    assert not entries.put("k3", "carol", "stale", ttl_s=60, ticket=before)
    assert entries.get("k3") is None


def test_answers_about_a_user_are_not_kept_within_the_settle_window_after_a_change() -> None:
    clock = Clock()
    entries = cache(clock, Age(), settle_s=2.0)
    entries.forget_user("alice")

    clock.now += 1.99
    assert not stored(entries, "k1", "alice")
    assert stored(entries, "k2", "bob")
    clock.now += 0.02
    assert stored(entries, "k1", "alice")


def test_an_answer_that_took_too_long_is_not_kept() -> None:
    clock = Clock()
    entries = cache(clock, Age())
    ticket = entries.ticket()
    clock.now += MAX_ANSWER_WAIT_S + 0.1
    assert not entries.put("k1", "alice", "late", ttl_s=60, ticket=ticket)


def test_answers_expire_after_their_own_ttl_and_a_zero_ttl_drops_the_old_one() -> None:
    clock = Clock()
    entries = cache(clock, Age())
    assert stored(entries, "short", "alice", ttl_s=5)
    assert stored(entries, "long", "alice", ttl_s=50)
    clock.now += 5
    assert (entries.get("short"), entries.get("long")) == (None, "answer for long")

    assert not stored(entries, "long", "alice", ttl_s=0)
    assert entries.get("long") is None


def test_the_cache_is_bounded_least_recently_used_first() -> None:
    entries = cache(Clock(), Age(), max_entries=2)
    stored(entries, "k1", "alice")
    stored(entries, "k2", "alice")
    assert entries.get("k1") is not None  # k2 is now the least recently used
    stored(entries, "k3", "alice")
    assert sorted(entries) == ["k1", "k3"]


def test_old_records_of_changes_are_pruned_without_letting_stale_answers_in() -> None:
    clock = Clock()
    entries = cache(clock, Age(), settle_s=2.0)
    stale_ticket = entries.ticket()
    entries.forget_user("alice")
    for n in range(50):
        clock.now += 1.0
        entries.forget_user(f"user-{n}")
    # alice's record is long gone, and so is any answer that could predate it.
    assert not entries.put("k1", "alice", "stale", ttl_s=60, ticket=stale_ticket)
    assert stored(entries, "k1", "alice")


def test_the_cache_refuses_impossible_settings() -> None:
    with pytest.raises(ValueError, match="at least one entry"):
        WatchedCache(max_entries=0, confirmed_age_s=Age())
    with pytest.raises(ValueError, match="max_age_s"):
        WatchedCache(max_entries=1, confirmed_age_s=Age(), max_age_s=0)


# ---- the hub and the stream it serves --------------------------------------------------------------

# Short, so an idle stream answers at once; the tests wait on the stream itself, never on a timer.
TICK_S = 0.01


class Recorder:
    def __init__(self) -> None:
        self.heard: list[str] = []

    def forget_user(self, user_id: str) -> int:
        self.heard.append(user_id)
        return 0

    def forget_everything(self) -> int:
        self.heard.append("*")
        return 0


def test_the_hub_tells_every_listener_until_it_unsubscribes() -> None:
    hub = CredentialChangeHub(lambda: 0.0)
    first, second = Recorder(), Recorder()
    hub.subscribe(first)
    unsubscribe = hub.subscribe(second)

    hub.changed("alice")
    unsubscribe()
    hub.lost_track()

    assert first.heard == ["alice", "*"]
    assert second.heard == ["alice"]


async def next_news(stream: AsyncGenerator[CredentialNews]) -> CredentialNews:
    async with asyncio.timeout(5):
        return await anext(stream)


async def test_a_stream_starts_with_everything_then_batches_changes_and_beats_when_idle() -> None:
    hub = CredentialChangeHub(lambda: 0.25)
    stream = hub.follow(heartbeat_s=TICK_S)

    first = await next_news(stream)
    assert first == CredentialNews(frozenset(), everything=True, confirmed_age_s=0.25)
    hub.changed("alice")
    hub.changed("bob")
    hub.changed("alice")
    assert await next_news(stream) == CredentialNews(frozenset({"alice", "bob"}), False, 0.25)
    assert await next_news(stream) == CredentialNews(frozenset(), False, 0.25)
    hub.lost_track()
    assert (await next_news(stream)).everything
    await stream.aclose()


async def test_too_many_pending_changes_become_everything() -> None:
    hub = CredentialChangeHub(lambda: 0.0, max_pending=2)
    stream = hub.follow(heartbeat_s=TICK_S)
    await next_news(stream)
    for user in ("a", "b", "c"):
        hub.changed(user)
    assert await next_news(stream) == CredentialNews(frozenset(), True, 0.0)
    await stream.aclose()


async def test_a_stream_is_silent_while_unconfirmed_and_then_says_everything() -> None:
    age = Age(0.0)
    hub = CredentialChangeHub(age)
    stream = hub.follow(heartbeat_s=TICK_S)
    await next_news(stream)

    age.age_s = None
    hub.changed("alice")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(TICK_S * 20):
            await anext(stream)
    stream = hub.follow(heartbeat_s=TICK_S)  # the edge reconnects after its bound ran out
    age.age_s = 0.0
    assert (await next_news(stream)).everything
    await stream.aclose()


async def test_closing_the_hub_ends_every_stream_and_unsubscribes_it() -> None:
    hub = CredentialChangeHub(lambda: 0.0)
    stream = hub.follow(heartbeat_s=60)
    await next_news(stream)
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)  # let it start waiting

    hub.close()

    with pytest.raises(StopAsyncIteration):
        async with asyncio.timeout(5):
            await waiting
    recorder = Recorder()
    hub.subscribe(recorder)
    hub.changed("alice")
    assert recorder.heard == ["alice"]  # only the new listener is left


# ---- the edge's side -------------------------------------------------------------------------------


def test_the_feed_confirmation_ages_from_what_the_sender_said() -> None:
    clock = Clock()
    confirmation = FeedConfirmation(monotonic=clock)
    assert confirmation.age_s() is None
    confirmation.confirmed(0.3)
    clock.now += 0.2
    assert confirmation.age_s() == pytest.approx(0.5)
    confirmation.lost()
    assert confirmation.age_s() is None
