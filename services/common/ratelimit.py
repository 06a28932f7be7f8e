"""Global rate limits: the rules (`envoy/ratelimits.yaml`), and the GCRA limiter that enforces them.

The gateway's rate-limit service (`gateway/rls.py`) asks the limiter about every descriptor Envoy
sends; services ask it directly for limits the gateway cannot see (auth's per-email login limit).

The algorithm is GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp per
counter). A rule admits `requests` per `per_s` seconds, so one request costs the emission interval
`T = per_s / requests`, and `burst` requests may arrive at once after a quiet spell (tolerance
`burst * T`). Each counter stores its theoretical arrival time (TAT): a request of `hits` is allowed
iff `max(TAT, now) + hits * T - now <= burst * T`, and then the TAT moves to that sum. A counter
whose TAT lies in the past is a full bucket and is forgotten.

One request is decided atomically across all its limits, all or nothing: if any enforced limit
refuses, no counter moves. Shadow limits are computed and reported but never refuse.

Two adapters: `RedisRateLimiter` (one Lua script per decision, Redis' own clock, shared by every
replica) and `InMemoryRateLimiter` (embedded mode only: limits kept in one process's memory multiply
by the number of processes).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Final, Literal, Protocol, get_args

from pydantic import Field, field_validator, model_validator
from redis import RedisError

from services.common.config_files import (
    ConfigFileError,
    ConfigSection,
    Flag,
    MethodKey,
    NonEmptyText,
    Number,
    PositiveInt,
    load_yaml_model,
    validate_document,
)
from services.common.errors import QuotaViolation, ResourceExhausted, Unavailable
from services.common.redis_multiplex import MultiplexedRedis, Script

logger = logging.getLogger(__name__)

DEFAULT_RATE_LIMITS_FILE: Final = Path(__file__).resolve().parents[2] / "envoy" / "ratelimits.yaml"

# Where a route descriptor's entries come from: the client address Envoy saw, and the gateway's
# identity headers.
EntrySource = Literal["remote_address", "user", "plan"]
ENTRY_SOURCES: Final = frozenset(get_args(EntrySource))
# Key entries whose values are hashed before they become part of a counter key, so no email
# address sits in Redis.
HASHED_KEY_ENTRIES: Final = frozenset({"email"})
HASHED_VALUE_CHARS: Final = 32
COUNTER_KEY_PREFIX: Final = "rl:"
# The descriptor entry every rule and route descriptor names its limit with.
LIMIT_ENTRY: Final = "limit"

MICROSECONDS_PER_SECOND: Final = 1_000_000
OnFailure = Literal["allow", "deny"]

_NAME_PATTERN: Final = re.compile(r"^[a-z][a-z0-9_]*$")


class RateLimitConfigError(ConfigFileError):
    """The rate-limit file is unusable; the one-line message names the file, the key and the problem."""


class RateLimiterUnavailable(Unavailable):
    """The limiter's store (Redis) did not answer, so no decision could be made."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            "Rate limits cannot be checked right now; try again shortly.",
            reason="RATE_LIMITER_UNAVAILABLE",
            metadata={"dependency": "redis"},
        )
        self.detail = detail


@dataclass(frozen=True)
class RateLimitRule:
    """One limit: `requests` per `per_s` seconds sustained, `burst` at once, one counter per key."""

    name: str
    # The descriptor entries (and values) a request descriptor must carry for this rule to apply.
    descriptor: Mapping[str, str] = field(hash=False)
    # The entries whose values pick the counter (e.g. `user`: one counter per user).
    key: tuple[str, ...]
    requests: int
    per_s: float
    burst: int
    # Counted and reported, never refusing.
    shadow: bool = False

    def __post_init__(self) -> None:
        # The loader explains these to operators; this guards rules built in code.
        if self.requests < 1 or self.per_s <= 0 or self.burst < 1:
            raise ValueError(f"rule {self.name!r} needs requests >= 1, per_s > 0 and burst >= 1")
        if LIMIT_ENTRY not in self.descriptor:
            raise ValueError(f"rule {self.name!r} needs a {LIMIT_ENTRY!r} descriptor entry")
        object.__setattr__(self, "descriptor", MappingProxyType(dict(self.descriptor)))

    @property
    def emission_interval_s(self) -> float:
        """What one request costs: the time the bucket takes to win one request back."""
        return self.per_s / self.requests

    @property
    def emission_interval_us(self) -> int:
        # Whole microseconds keep the Lua script's and this module's arithmetic exact and equal.
        return max(1, round(self.emission_interval_s * MICROSECONDS_PER_SECOND))

    @property
    def burst_window_s(self) -> float:
        """How long an empty bucket takes to refill its whole burst."""
        return self.burst * self.emission_interval_us / MICROSECONDS_PER_SECOND

    def describe(self) -> str:
        """The rule in words, for error messages and docs: no counter key, so no user or address."""
        return f"{self.requests} requests per {_period_text(self.per_s)} with bursts of {self.burst}"


@dataclass(frozen=True)
class RouteDescriptor:
    """One descriptor the gateway sends for a route: a limit name plus entries from the request."""

    limit: str
    entries: tuple[str, ...]
    # Sent only for callers without an identity.
    only_anonymous: bool = False


@dataclass(frozen=True)
class RouteLimits:
    """The descriptors of one route class, and what Envoy does when the limiter cannot answer."""

    on_failure: OnFailure
    descriptors: tuple[RouteDescriptor, ...]


@dataclass(frozen=True)
class RateLimitRoutes:
    """`default` applies to every public route; `methods` adds endpoint limits per gRPC method."""

    default: RouteLimits
    # "package.Service/Method" -> its limits.
    methods: Mapping[str, RouteLimits] = field(hash=False)
    # Methods no limit applies to at all (e.g. the JWKS, which the gateway itself fetches).
    exempt: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RateLimitConfig:
    """The parsed rate-limit file."""

    domain: str
    rules: tuple[RateLimitRule, ...]
    routes: RateLimitRoutes
    # The file it came from, for messages.
    source: str = ""
    _by_limit: Mapping[str, tuple[RateLimitRule, ...]] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        by_limit: dict[str, list[RateLimitRule]] = {}
        for rule in self.rules:
            by_limit.setdefault(rule.descriptor[LIMIT_ENTRY], []).append(rule)
        # The most specific rule first; among equally specific ones, the file's order.
        ordered = {
            limit: tuple(sorted(rules, key=lambda rule: -len(rule.descriptor)))
            for limit, rules in by_limit.items()
        }
        object.__setattr__(self, "_by_limit", MappingProxyType(ordered))

    def rule(self, name: str) -> RateLimitRule:
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(name)

    def match(self, descriptor_entries: Sequence[tuple[str, str]]) -> tuple[RateLimitRule, str] | None:
        """The rule for a request descriptor and the counter it counts on, or None if no rule applies.

        A rule applies when every entry of its `descriptor` is present with the same value and every
        entry of its `key` is present; the most specific such rule wins.
        """
        entries = dict(descriptor_entries)
        limit = entries.get(LIMIT_ENTRY)
        if limit is None:
            return None
        for rule in self._by_limit.get(limit, ()):
            if all(entries.get(name) == value for name, value in rule.descriptor.items()) and all(
                name in entries for name in rule.key
            ):
                return rule, counter_key(rule, entries)
        return None


def counter_key(rule: RateLimitRule, entries: Mapping[str, str]) -> str:
    """`rl:<rule>:<value>[:<value>...]`: key values percent-escape `%` and `:` so that no two
    different value lists share a key, and email values are hashed."""
    values = [_key_value(name, entries[name]) for name in rule.key]
    return f"{COUNTER_KEY_PREFIX}{rule.name}:" + ":".join(values)


def _key_value(name: str, value: str) -> str:
    if name in HASHED_KEY_ENTRIES:
        return hashlib.sha256(value.encode()).hexdigest()[:HASHED_VALUE_CHARS]
    return value.replace("%", "%25").replace(":", "%3A")


_PERIOD_NAMES: Final = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86400.0: "day"}


def _period_text(seconds: float) -> str:
    return _PERIOD_NAMES.get(seconds) or f"{seconds:g} s"


# --- loading -------------------------------------------------------------------------------------


def load_rate_limit_config(path: Path | None = None) -> RateLimitConfig:
    """Read and validate a rate-limit file (None: the shipped envoy/ratelimits.yaml); any problem is
    a one-line `RateLimitConfigError`."""
    path = path or DEFAULT_RATE_LIMITS_FILE
    return load_yaml_model(path, _RateLimitFile, RateLimitConfigError).config(str(path))


def parse_rate_limit_config(document: object, *, source: str = "<rate limits>") -> RateLimitConfig:
    """Validate an already-parsed rate-limit document (the shape of `envoy/ratelimits.yaml`)."""
    return validate_document(document, _RateLimitFile, source=source, error=RateLimitConfigError).config(
        source
    )


# The file's schema: one model per section, unknown keys refused; `_RateLimitFile.config` builds the
# rules the limiter and the gateway use.


class _Rate(ConfigSection):
    requests: PositiveInt
    per_s: Annotated[Number, Field(gt=0, allow_inf_nan=False)]

    @model_validator(mode="after")
    def _not_too_fast(self) -> _Rate:
        if self.per_s / self.requests < 1 / MICROSECONDS_PER_SECOND:
            raise ValueError("is faster than one request per microsecond")
        return self


class _Limit(ConfigSection):
    name: NonEmptyText
    # The entries (and values) a request descriptor must carry; `limit` names the limit.
    descriptor: Mapping[NonEmptyText, NonEmptyText]
    key: Annotated[tuple[NonEmptyText, ...], Field(min_length=1)]
    rate: _Rate
    burst: PositiveInt
    shadow: Flag = False

    @field_validator("name")
    @classmethod
    def _lower_snake(cls, name: str) -> str:
        if not _NAME_PATTERN.match(name):
            raise ValueError(f"{name!r} must be lower_snake_case (it is a header and key part)")
        return name

    @field_validator("descriptor")
    @classmethod
    def _names_its_limit(cls, descriptor: Mapping[str, str]) -> Mapping[str, str]:
        if LIMIT_ENTRY not in descriptor:
            raise ValueError(f"needs a {LIMIT_ENTRY!r} entry naming the limit")
        return descriptor

    @model_validator(mode="after")
    def _key_is_not_in_the_descriptor(self) -> _Limit:
        overlap = sorted(set(self.key) & set(self.descriptor))
        if overlap:
            raise ValueError(f"key repeats descriptor entries {overlap}")
        return self

    def rule(self) -> RateLimitRule:
        return RateLimitRule(
            name=self.name,
            descriptor=dict(self.descriptor),
            key=self.key,
            requests=self.rate.requests,
            per_s=float(self.rate.per_s),
            burst=self.burst,
            shadow=self.shadow,
        )


class _RouteDescriptor(ConfigSection):
    limit: NonEmptyText
    entries: Annotated[tuple[EntrySource, ...], Field(min_length=1)]
    only_anonymous: Flag = False

    @field_validator("entries")
    @classmethod
    def _each_source_once(cls, entries: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(entries)) != len(entries):
            raise ValueError("names a source twice")
        return entries


class _RouteLimits(ConfigSection):
    on_failure: OnFailure
    descriptors: Annotated[tuple[_RouteDescriptor, ...], Field(min_length=1)]

    @field_validator("descriptors")
    @classmethod
    def _each_limit_once(cls, descriptors: tuple[_RouteDescriptor, ...]) -> tuple[_RouteDescriptor, ...]:
        seen: set[str] = set()
        for descriptor in descriptors:
            if descriptor.limit in seen:
                raise ValueError(f"sends limit {descriptor.limit!r} twice")
            seen.add(descriptor.limit)
        return descriptors

    def limits(self) -> RouteLimits:
        return RouteLimits(
            on_failure=self.on_failure,
            descriptors=tuple(
                RouteDescriptor(limit=d.limit, entries=d.entries, only_anonymous=d.only_anonymous)
                for d in self.descriptors
            ),
        )


class _Routes(ConfigSection):
    default: _RouteLimits
    methods: Mapping[MethodKey, _RouteLimits] = Field(default_factory=dict)
    exempt: tuple[MethodKey, ...] = ()

    @model_validator(mode="after")
    def _exempt_means_no_limits(self) -> _Routes:
        for method in self.exempt:
            if method in self.methods:
                raise ValueError(f"exempt: {method!r} also has limits under routes.methods")
        return self


class _RateLimitFile(ConfigSection):
    domain: NonEmptyText
    limits: Annotated[tuple[_Limit, ...], Field(min_length=1)]
    routes: _Routes

    @model_validator(mode="after")
    def _consistent(self) -> _RateLimitFile:
        names: set[str] = set()
        descriptors: dict[frozenset[tuple[str, str]], str] = {}
        for limit in self.limits:
            if limit.name in names:
                raise ValueError(f"duplicate limit name {limit.name!r}")
            names.add(limit.name)
            signature = frozenset(limit.descriptor.items())
            if signature in descriptors:
                raise ValueError(
                    f"limits {descriptors[signature]!r} and {limit.name!r} have the same descriptor "
                    f"{dict(limit.descriptor)}; only one of them could ever apply"
                )
            descriptors[signature] = limit.name
        routes = [("routes.default", self.routes.default)]
        routes += [(f"routes.methods[{method!r}]", route) for method, route in self.routes.methods.items()]
        for where, route in routes:
            for index, descriptor in enumerate(route.descriptors):
                self._check_matchable(f"{where}.descriptors[{index}]", descriptor)
        return self

    def _check_matchable(self, where: str, descriptor: _RouteDescriptor) -> None:
        """A route descriptor must be able to match some limit: each needs its descriptor and key entries."""
        candidates = [limit for limit in self.limits if limit.descriptor[LIMIT_ENTRY] == descriptor.limit]
        if not candidates:
            raise ValueError(f"{where}: no limit has descriptor limit {descriptor.limit!r}")
        sent = {LIMIT_ENTRY, *descriptor.entries}
        if not any(set(limit.descriptor) <= sent and set(limit.key) <= sent for limit in candidates):
            names = ", ".join(limit.name for limit in candidates)
            raise ValueError(
                f"{where}: entries {list(descriptor.entries)} can never match a {descriptor.limit!r} "
                f"limit ({names}): each needs its descriptor and key entries"
            )

    def config(self, source: str) -> RateLimitConfig:
        routes = RateLimitRoutes(
            default=self.routes.default.limits(),
            methods=MappingProxyType(
                {method: route.limits() for method, route in self.routes.methods.items()}
            ),
            exempt=frozenset(self.routes.exempt),
        )
        return RateLimitConfig(
            domain=self.domain,
            rules=tuple(limit.rule() for limit in self.limits),
            routes=routes,
            source=source,
        )


# --- the port ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LimitRequest:
    """Take `hits` from the counter `counter_key` of `rule`."""

    counter_key: str
    rule: RateLimitRule
    hits: int = 1

    def __post_init__(self) -> None:
        if self.hits < 1:
            raise ValueError("hits must be at least 1")


@dataclass(frozen=True)
class LimitDecision:
    """What one limit said about one request.

    `allowed` is this limit's own verdict (a shadow limit may say False without refusing anything).
    When the request as a whole is refused, no counter moved and `remaining` / `reset_after_s`
    describe the untouched counter.
    """

    rule: RateLimitRule
    allowed: bool
    # The bucket's size: the burst.
    limit: int
    # Requests that would be allowed right now, after this one if it went through.
    remaining: int
    # Seconds until the bucket is full again (0 when it is).
    reset_after_s: float
    # Seconds until this limit would allow the request; 0 when it allows it.
    retry_after_s: float

    @property
    def refuses(self) -> bool:
        """True when this decision refuses the request: an enforced limit that said no."""
        return not self.allowed and not self.rule.shadow


def is_allowed(decisions: Iterable[LimitDecision]) -> bool:
    """Whether a request with these decisions goes through: no enforced limit refused it."""
    return not any(decision.refuses for decision in decisions)


def binding_refusal(decisions: Iterable[LimitDecision]) -> LimitDecision | None:
    """The refusing decision a client must wait out longest, or None when the request is allowed."""
    refusing = [decision for decision in decisions if decision.refuses]
    return max(refusing, key=lambda decision: decision.retry_after_s) if refusing else None


def rate_limited_error(decisions: Sequence[LimitDecision]) -> ResourceExhausted:
    """RESOURCE_EXHAUSTED / RATE_LIMITED for a refused request, with a QuotaFailure per refusing limit.

    The message names the limit, its rate and when to retry; never a user, an address or an email.
    """
    binding = binding_refusal(decisions)
    if binding is None:
        raise ValueError("the request was allowed; there is no rate-limit error to report")
    retry_after = retry_after_seconds(binding)
    rule = binding.rule
    return ResourceExhausted(
        f"Rate limit {rule.name} exceeded ({rule.describe()}); retry in {retry_after} s.",
        reason="RATE_LIMITED",
        metadata={"limit": rule.name, "retry_after_s": str(retry_after)},
        quota_violations=[
            QuotaViolation(
                subject=f"{decision.rule.name}:{','.join(decision.rule.key)}",
                description=f"{decision.rule.describe()}, counted per {' and '.join(decision.rule.key)}; "
                f"retry in {retry_after_seconds(decision)} s.",
            )
            for decision in decisions
            if decision.refuses
        ],
    )


def retry_after_seconds(decision: LimitDecision) -> int:
    """`retry_after_s` as whole seconds for a Retry-After header: rounded up, at least 1."""
    return max(1, math.ceil(decision.retry_after_s))


class RateLimiter(Protocol):
    """Decides requests against their limits; each call is one atomic, all-or-nothing decision."""

    async def acquire(self, requests: Sequence[LimitRequest]) -> list[LimitDecision]:
        """One decision per request item, in order. Raises `RateLimiterUnavailable` when the
        store cannot answer."""
        ...

    async def aclose(self) -> None:
        """Release the store's connections (nothing to do in memory)."""
        ...


def rate_limiter_for(redis_url: str | None) -> RateLimiter:
    """Redis when configured (every replica shares the counters), else this process's memory."""
    return RedisRateLimiter.from_url(redis_url) if redis_url else InMemoryRateLimiter()


# --- GCRA, shared by the in-memory adapter; the Lua script below is its twin ----------------------


@dataclass(frozen=True)
class _Verdict:
    allowed: bool
    remaining: int
    reset_after_us: int
    retry_after_us: int


def _decide(
    now_us: int, stored_tat: Callable[[str], int], requests: Sequence[LimitRequest]
) -> tuple[list[_Verdict], dict[str, int]]:
    """Verdicts for `requests` at `now_us`, and the TATs to store (empty when the request is refused)."""
    pending: dict[str, int] = {}
    evaluated: list[tuple[int, int, bool]] = []
    refused = False
    for request in requests:
        interval = request.rule.emission_interval_us
        tolerance = request.rule.burst * interval
        tat = (
            pending[request.counter_key]
            if request.counter_key in pending
            else stored_tat(request.counter_key)
        )
        tat = max(tat, now_us)
        new_tat = tat + request.hits * interval
        allowed = new_tat - now_us <= tolerance
        if allowed:
            pending[request.counter_key] = new_tat
        elif not request.rule.shadow:
            refused = True
        evaluated.append((tat, new_tat, allowed))
    verdicts: list[_Verdict] = []
    for request, (tat, new_tat, allowed) in zip(requests, evaluated, strict=True):
        interval = request.rule.emission_interval_us
        tolerance = request.rule.burst * interval
        after = new_tat if allowed and not refused else tat
        verdicts.append(
            _Verdict(
                allowed=allowed,
                remaining=max(0, (tolerance - (after - now_us)) // interval),
                reset_after_us=after - now_us,
                retry_after_us=0 if allowed else new_tat - tolerance - now_us,
            )
        )
    return verdicts, ({} if refused else pending)


def _decisions(requests: Sequence[LimitRequest], verdicts: Sequence[_Verdict]) -> list[LimitDecision]:
    return [
        LimitDecision(
            rule=request.rule,
            allowed=verdict.allowed,
            limit=request.rule.burst,
            remaining=verdict.remaining,
            reset_after_s=verdict.reset_after_us / MICROSECONDS_PER_SECOND,
            retry_after_s=verdict.retry_after_us / MICROSECONDS_PER_SECOND,
        )
        for request, verdict in zip(requests, verdicts, strict=True)
    ]


class InMemoryRateLimiter:
    """Counters in this process's memory: for embedded mode, where one process serves everything.

    `acquire` never awaits while it decides, so concurrent tasks cannot interleave inside one
    decision. Full buckets are dropped by a sweep that runs whenever the table doubles, so memory
    stays within twice the live counters (plus `min_sweep_size`).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, min_sweep_size: int = 1024) -> None:
        self._clock = clock
        self._tats: dict[str, int] = {}
        self._min_sweep_size = min_sweep_size
        self._sweep_at = min_sweep_size

    async def aclose(self) -> None:
        return None

    @property
    def counter_count(self) -> int:
        """Counters currently held (full buckets may linger until the next sweep)."""
        return len(self._tats)

    def sweep(self) -> None:
        """Forget every full bucket now."""
        now_us = self._now_us()
        for key in [key for key, tat in self._tats.items() if tat <= now_us]:
            del self._tats[key]
        self._sweep_at = max(self._min_sweep_size, 2 * len(self._tats))

    async def acquire(self, requests: Sequence[LimitRequest]) -> list[LimitDecision]:
        now_us = self._now_us()
        verdicts, writes = _decide(now_us, lambda key: self._tats.get(key, 0), requests)
        self._tats.update(writes)
        if len(self._tats) >= self._sweep_at:
            self.sweep()
        return _decisions(requests, verdicts)

    def _now_us(self) -> int:
        return round(self._clock() * MICROSECONDS_PER_SECOND)


# KEYS[i]: counter i. ARGV: four values per counter: emission interval (µs), burst, hits, shadow (1/0).
# Returns four integers per counter: allowed (1/0), remaining, reset after (µs), retry after (µs).
# Mirrors `_decide`; the clock is Redis' own, so replicas with skewed clocks agree.
_ACQUIRE_SCRIPT: Final = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local pending = {}
local evaluated = {}
local refused = false
for i, key in ipairs(KEYS) do
  local base = (i - 1) * 4
  local interval = tonumber(ARGV[base + 1])
  local tolerance = tonumber(ARGV[base + 2]) * interval
  local hits = tonumber(ARGV[base + 3])
  local shadow = ARGV[base + 4] == '1'
  local tat = pending[key]
  if tat == nil then
    local stored = redis.call('GET', key)
    tat = stored and tonumber(stored) or 0
  end
  if tat < now then tat = now end
  local new_tat = tat + hits * interval
  local allowed = new_tat - now <= tolerance
  if allowed then
    pending[key] = new_tat
  elseif not shadow then
    refused = true
  end
  evaluated[i] = {tat, new_tat, allowed, interval, tolerance}
end
local result = {}
for i = 1, #KEYS do
  local tat, new_tat, allowed, interval, tolerance = unpack(evaluated[i])
  local after = tat
  if allowed and not refused then after = new_tat end
  local remaining = math.floor((tolerance - (after - now)) / interval)
  if remaining < 0 then remaining = 0 end
  local retry = 0
  if not allowed then retry = new_tat - tolerance - now end
  result[#result + 1] = allowed and 1 or 0
  result[#result + 1] = remaining
  result[#result + 1] = after - now
  result[#result + 1] = retry
end
if not refused then
  for key, new_tat in pairs(pending) do
    redis.call('SET', key, string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
  end
end
return result
"""


class RedisRateLimiter:
    """Counters in Redis, shared by every replica: one Lua script (EVALSHA) per decision.

    Keys are `<key_prefix>rl:<rule>:<key values>`, each holding one TAT in microseconds and
    expiring when its bucket is full again. A decision's keys must live on one Redis node (Redis
    Cluster would need them in one hash slot). Any Redis error raises `RateLimiterUnavailable`.
    Decisions go over one multiplexed connection (`services.common.redis_multiplex`): they are on
    every request's path.
    """

    def __init__(self, client: MultiplexedRedis, *, key_prefix: str = "parley:") -> None:
        self._client = client
        self._prefix = key_prefix
        self._script = Script(_ACQUIRE_SCRIPT)

    @classmethod
    def from_url(
        cls, redis_url: str, *, key_prefix: str = "parley:", socket_timeout_s: float = 1.0
    ) -> RedisRateLimiter:
        """A limiter with its own connection. No retries: Envoy waits milliseconds for an answer and
        applies the route's failure mode itself, so a retried command would only pile up behind an
        outage."""
        client = MultiplexedRedis.from_url(
            redis_url, command_timeout_s=socket_timeout_s, connect_timeout_s=socket_timeout_s
        )
        return cls(client, key_prefix=key_prefix)

    async def aclose(self) -> None:
        """Close the client and its connection."""
        await self._client.aclose()

    async def acquire(self, requests: Sequence[LimitRequest]) -> list[LimitDecision]:
        if not requests:
            return []
        keys = [self._prefix + request.counter_key for request in requests]
        args: list[int] = []
        for request in requests:
            args += [
                request.rule.emission_interval_us,
                request.rule.burst,
                request.hits,
                int(request.rule.shadow),
            ]
        try:
            raw = await self._client.evalsha(self._script, keys, args)
        except (RedisError, OSError) as error:
            raise RateLimiterUnavailable(f"{type(error).__name__}: {error}") from error
        values = [int(value) for value in raw]
        verdicts = [
            _Verdict(
                allowed=values[index] == 1,
                remaining=values[index + 1],
                reset_after_us=values[index + 2],
                retry_after_us=values[index + 3],
            )
            for index in range(0, len(values), 4)
        ]
        return _decisions(requests, verdicts)
