"""What the composition root hands every service's wiring: its settings and shared infrastructure."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.common.cache import InMemoryReadCache, ReadCache
from services.common.consumers import EventSubscription
from services.common.db import Database
from services.common.identity import JwksFetcher
from services.common.revocation import RevocationList
from services.common.server import ServiceRegistration
from services.common.settings import Settings


@dataclass(frozen=True)
class ServiceContext:
    """One process's shared dependencies, built once by `runtime` and passed down."""

    settings: Settings
    database: Database
    # Where token revocations are written (auth) and read (every verifier): Redis or in-process.
    revocations: RevocationList
    # True in `parley up`: one process, SQLite, secrets generated into the data dir when not given.
    embedded: bool
    # The hot-read cache (`named()` views per use): Redis when configured, else this process's memory.
    read_cache: ReadCache = field(default_factory=InMemoryReadCache)


@dataclass
class ServiceBundle:
    """What one service's wiring builds: its gRPC services and what the process must do for it."""

    registrations: list[ServiceRegistration]
    # Set by the service that owns the signing keys (auth); every other process fetches over gRPC.
    jwks: JwksFetcher | None = None
    # Awaited once before the server starts serving (e.g. make sure a signing key exists).
    on_start: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Awaited once after the server stopped (e.g. close connections the service opened itself).
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # The events the service consumes, wherever it is hosted.
    subscriptions: list[EventSubscription] = field(default_factory=list)
    # Loops the service runs while it is hosted (e.g. a sweeper); each returns once `stop` is set.
    background: list[Callable[[asyncio.Event], Awaitable[None]]] = field(default_factory=list)
