"""The edge's side of credential changes: follow auth's `WatchCredentialChanges` and keep the ext_authz
cache (`EdgeAuthorizer.decisions`) current.

One long-lived server stream per edge process, over the channel the edge already uses for auth. Each
message names the users whose cached decisions to drop (or says "drop everything": the first message
of every stream, and any after auth may have missed changes) and how long before sending auth was
last confirmed to hold every change. Auth sends one at least every 200 ms while it is current.

The cache answers only while the feed is confirmed within `MAX_CONFIRMED_AGE_S` (its
`FeedConfirmation` says how long ago). A stream that fails, ends, or stays silent for that long is
cancelled and dialled again (backing off up to `retry_max_s`); until a new stream's first message
arrives, every check goes to auth. So a change reaches this cache within milliseconds while all is
well, and no cached answer outlives a change by more than `MAX_CONFIRMED_AGE_S` whatever fails.

Metrics (on the edge's registry): `parley_edge_authz_cache_evictions_total{cause}` and
`parley_edge_credential_feed_fresh` (1 while cached answers are used); the feed's state changes are
logged once each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from services.common.credential_changes import MAX_CONFIRMED_AGE_S, FeedConfirmation, WatchedCache

logger = logging.getLogger(__name__)

DEFAULT_RETRY_INITIAL_S: Final = 0.1
DEFAULT_RETRY_MAX_S: Final = 2.0


class CredentialFeedMetrics:
    """Evictions by cause, and whether the feed is current."""

    def __init__(self, registry: CollectorRegistry, cache: WatchedCache[Any]) -> None:
        self.evictions = Counter(
            "parley_edge_authz_cache_evictions_total",
            "Cached credential decisions dropped on auth's word, by cause (user_changed: that user's "
            "credentials changed; resync: a new feed, or auth may have missed changes).",
            ("cause",),
            registry=registry,
        )
        self.fresh = Gauge(
            "parley_edge_credential_feed_fresh",
            "1 while auth's credential-change feed is confirmed current, so cached credential checks "
            "are answered; 0 while every check goes to auth.",
            registry=registry,
        )
        self.fresh.set_function(lambda: 1.0 if cache.trusted else 0.0)


class CredentialFeedFollower:
    """Follows auth's credential changes into the edge's cache; see the module docstring."""

    def __init__(
        self,
        auth: auth_pb2_grpc.AuthInternalServiceAsyncStub,
        cache: WatchedCache[Any],
        confirmation: FeedConfirmation,
        *,
        registry: CollectorRegistry,
        max_age_s: float = MAX_CONFIRMED_AGE_S,
        retry_initial_s: float = DEFAULT_RETRY_INITIAL_S,
        retry_max_s: float = DEFAULT_RETRY_MAX_S,
    ) -> None:
        """`confirmation` is what `cache` reads its feed's age from."""
        self._auth = auth
        self._cache = cache
        self._confirmation = confirmation
        self._metrics = CredentialFeedMetrics(registry, cache)
        self._max_age_s = max_age_s
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._task: asyncio.Task[None] | None = None
        # The state last logged: None until the first one is.
        self._logged_fresh: bool | None = None

    def start(self) -> None:
        """Start following, on the running event loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._follow(), name="credential-feed")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._confirmation.lost()

    def apply(self, message: auth_pb2.WatchCredentialChangesResponse, *, confirms: bool) -> None:
        """Drop what `message` names; with `confirms` (its stream has resynced), note the feed current."""
        if message.resync:
            self._metrics.evictions.labels("resync").inc(self._cache.forget_everything())
        for user_id in message.user_ids:
            self._metrics.evictions.labels("user_changed").inc(self._cache.forget_user(user_id))
        if confirms:
            self._confirmation.confirmed(message.confirmed_age.ToTimedelta().total_seconds())
        self._note_state("")

    async def _follow(self) -> None:
        delay = self._retry_initial_s
        while True:
            call = self._auth.WatchCredentialChanges(auth_pb2.WatchCredentialChangesRequest())
            resynced = False
            why = "auth ended the stream"
            try:
                while True:
                    # A stream that goes quiet may be dead without knowing it: stop trusting it.
                    async with asyncio.timeout(self._max_age_s):
                        message = await call.read()
                    if message is grpc.aio.EOF:
                        break
                    resynced = resynced or message.resync
                    self.apply(message, confirms=resynced)
                    delay = self._retry_initial_s
            except grpc.aio.AioRpcError as error:
                why = f"{error.code().name}: {error.details()}"
            except TimeoutError:
                why = f"no message for {self._max_age_s:g} s"
            finally:
                call.cancel()
                self._confirmation.lost()
            self._note_state(why)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max_s)

    def _note_state(self, why: str) -> None:
        fresh = self._cache.trusted
        if fresh == self._logged_fresh:
            return
        if fresh:
            logger.info("auth's credential-change feed is current: cached credential checks are used")
        elif self._logged_fresh is not None or why:
            logger.warning(
                "auth's credential-change feed is not current (%s): every credential check goes to auth",
                why or "no recent confirmation",
            )
        else:
            return
        self._logged_fresh = fresh
