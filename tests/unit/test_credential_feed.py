"""What the edge does with each message of auth's credential-change stream: forget what it names,
trust only a stream that started afresh, count the evictions and say whether the feed is current."""

from __future__ import annotations

from datetime import timedelta

from prometheus_client import CollectorRegistry

from gateway.credential_feed import CredentialFeedFollower
from parley.auth.v1 import auth_pb2
from services.common.credential_changes import MAX_CONFIRMED_AGE_S, FeedConfirmation, WatchedCache


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def stored(entries: WatchedCache[str], key: str, user_id: str) -> bool:
    return entries.put(key, user_id, f"answer for {key}", ttl_s=60, ticket=entries.ticket())


def news(*user_ids: str, resync: bool = False, age_s: float = 0.0) -> auth_pb2.WatchCredentialChangesResponse:
    message = auth_pb2.WatchCredentialChangesResponse(resync=resync, user_ids=list(user_ids))
    message.confirmed_age.FromTimedelta(timedelta(seconds=age_s))
    return message


def test_the_edge_forgets_what_each_message_names_and_trusts_only_a_resynced_stream() -> None:
    clock = Clock()
    confirmation = FeedConfirmation(monotonic=clock)
    entries: WatchedCache[str] = WatchedCache(max_entries=10, confirmed_age_s=confirmation.age_s, timer=clock)
    registry = CollectorRegistry()
    follower = CredentialFeedFollower(None, entries, confirmation, registry=registry)  # type: ignore[arg-type]

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    # A stream that has not said "everything" yet confirms nothing.
    follower.apply(news("alice"), confirms=False)
    assert not entries.trusted
    assert sample("parley_edge_credential_feed_fresh") == 0

    follower.apply(news(resync=True, age_s=0.1), confirms=True)
    assert entries.trusted
    assert sample("parley_edge_credential_feed_fresh") == 1
    for key, user in (("k1", "alice"), ("k2", "alice"), ("k3", "bob")):
        stored(entries, key, user)

    follower.apply(news("alice"), confirms=True)
    assert sorted(entries) == ["k3"]
    follower.apply(news(resync=True), confirms=True)
    assert len(entries) == 0
    assert sample("parley_edge_authz_cache_evictions_total", cause="user_changed") == 2
    assert sample("parley_edge_authz_cache_evictions_total", cause="resync") == 1

    # A sender that was itself behind: the edge counts its age too.
    follower.apply(news(age_s=MAX_CONFIRMED_AGE_S), confirms=True)
    assert not entries.trusted
