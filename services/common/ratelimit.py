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
from typing import Any, Final, Literal, Protocol

import yaml
from redis import RedisError

from services.common.errors import QuotaViolation, ResourceExhausted, Unavailable
from services.common.redis_multiplex import MultiplexedRedis, Script

logger = logging.getLogger(__name__)

DEFAULT_RATE_LIMITS_FILE: Final = Path(__file__).resolve().parents[2] / "envoy" / "ratelimits.yaml"

# Where a route descriptor's entries come from: the client address Envoy saw, and the gateway's
# identity headers.
ENTRY_SOURCES: Final = frozenset({"remote_address", "user", "plan"})
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
_METHOD_PATTERN: Final = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+/[A-Za-z_][A-Za-z0-9_]*$"
)


class RateLimitConfigError(ValueError):
    """The rate-limit file is unusable; the one-line message names the file and the problem."""


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
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise RateLimitConfigError(f"{path}: cannot be read ({error.strerror or error})") from error
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        problem = " ".join(str(error).split())
        raise RateLimitConfigError(f"{path}: is not valid YAML ({problem})") from error
    return parse_rate_limit_config(document, source=str(path))


def parse_rate_limit_config(document: object, *, source: str = "<rate limits>") -> RateLimitConfig:
    """Validate an already-parsed rate-limit document (the shape of `envoy/ratelimits.yaml`)."""
    try:
        return _parse(document, source)
    except _InvalidError as problem:
        raise RateLimitConfigError(f"{source}: {problem}") from None


class _InvalidError(Exception):
    """A problem found while parsing; `parse_rate_limit_config` prefixes it with the file."""


def _parse(document: object, source: str) -> RateLimitConfig:
    top = _mapping(document, "the document", required={"domain", "limits", "routes"})
    domain = _text(top["domain"], "domain")
    raw_limits = top["limits"]
    if not isinstance(raw_limits, list) or not raw_limits:
        raise _InvalidError("limits must be a non-empty list")
    rules = tuple(_parse_rule(entry, f"limits[{index}]") for index, entry in enumerate(raw_limits))
    _check_unique_rules(rules)
    routes_raw = _mapping(top["routes"], "routes", required={"default"}, optional={"methods", "exempt"})
    default = _parse_route(routes_raw["default"], "routes.default", rules)
    methods_raw = routes_raw.get("methods") or {}
    if not isinstance(methods_raw, dict):
        raise _InvalidError("routes.methods must be a mapping of 'package.Service/Method' to route limits")
    methods: dict[str, RouteLimits] = {}
    for method, route in methods_raw.items():
        where = f"routes.methods[{method!r}]"
        if not isinstance(method, str) or not _METHOD_PATTERN.match(method):
            raise _InvalidError(f"{where}: the key must be a gRPC method 'package.Service/Method'")
        methods[method] = _parse_route(route, where, rules)
    exempt = _text_list(routes_raw.get("exempt") or [], "routes.exempt")
    for method in exempt:
        if not _METHOD_PATTERN.match(method):
            raise _InvalidError(f"routes.exempt: {method!r} is not a gRPC method 'package.Service/Method'")
        if method in methods:
            raise _InvalidError(f"routes.exempt: {method!r} also has limits under routes.methods")
    routes = RateLimitRoutes(default=default, methods=MappingProxyType(methods), exempt=frozenset(exempt))
    return RateLimitConfig(domain=domain, rules=rules, routes=routes, source=source)


def _parse_rule(entry: object, where: str) -> RateLimitRule:
    raw = _mapping(entry, where, required={"name", "descriptor", "key", "rate", "burst"}, optional={"shadow"})
    name = _text(raw["name"], f"{where}.name")
    if not _NAME_PATTERN.match(name):
        raise _InvalidError(f"{where}.name {name!r} must be lower_snake_case (it is a header and key part)")
    where = f"{where} ({name})"
    descriptor_raw = _mapping(
        raw["descriptor"], f"{where}.descriptor", required={LIMIT_ENTRY}, open_keys=True
    )
    descriptor = {
        _text(key, f"{where}.descriptor key"): _text(value, f"{where}.descriptor.{key}")
        for key, value in descriptor_raw.items()
    }
    key = _text_list(raw["key"], f"{where}.key")
    if not key:
        raise _InvalidError(f"{where}.key must name at least one entry")
    overlap = sorted(set(key) & set(descriptor))
    if overlap:
        raise _InvalidError(f"{where}.key repeats descriptor entries {overlap}")
    rate = _mapping(raw["rate"], f"{where}.rate", required={"requests", "per_s"})
    requests = rate["requests"]
    if not _is_int(requests) or requests <= 0:
        raise _InvalidError(f"{where}.rate.requests must be a positive integer, got {requests!r}")
    per_s = rate["per_s"]
    if not _is_number(per_s) or per_s <= 0 or not math.isfinite(per_s):
        raise _InvalidError(f"{where}.rate.per_s must be a positive number of seconds, got {per_s!r}")
    if per_s / requests < 1 / MICROSECONDS_PER_SECOND:
        raise _InvalidError(f"{where}.rate is faster than one request per microsecond")
    burst = raw["burst"]
    if not _is_int(burst) or burst < 1:
        raise _InvalidError(f"{where}.burst must be an integer >= 1, got {burst!r}")
    shadow = raw.get("shadow", False)
    if not isinstance(shadow, bool):
        raise _InvalidError(f"{where}.shadow must be true or false, got {shadow!r}")
    return RateLimitRule(
        name=name,
        descriptor=descriptor,
        key=key,
        requests=int(requests),
        per_s=float(per_s),
        burst=int(burst),
        shadow=shadow,
    )


def _check_unique_rules(rules: Sequence[RateLimitRule]) -> None:
    names: set[str] = set()
    descriptors: dict[frozenset[tuple[str, str]], str] = {}
    for rule in rules:
        if rule.name in names:
            raise _InvalidError(f"duplicate limit name {rule.name!r}")
        names.add(rule.name)
        signature = frozenset(rule.descriptor.items())
        if signature in descriptors:
            raise _InvalidError(
                f"limits {descriptors[signature]!r} and {rule.name!r} have the same descriptor "
                f"{dict(rule.descriptor)}; only one of them could ever apply"
            )
        descriptors[signature] = rule.name


def _parse_route(entry: object, where: str, rules: Sequence[RateLimitRule]) -> RouteLimits:
    raw = _mapping(entry, where, required={"on_failure", "descriptors"})
    on_failure = raw["on_failure"]
    if on_failure not in ("allow", "deny"):
        raise _InvalidError(f"{where}.on_failure must be 'allow' or 'deny', got {on_failure!r}")
    descriptors_raw = raw["descriptors"]
    if not isinstance(descriptors_raw, list) or not descriptors_raw:
        raise _InvalidError(f"{where}.descriptors must be a non-empty list")
    descriptors = tuple(
        _parse_route_descriptor(item, f"{where}.descriptors[{index}]", rules)
        for index, item in enumerate(descriptors_raw)
    )
    seen: set[str] = set()
    for descriptor in descriptors:
        if descriptor.limit in seen:
            raise _InvalidError(f"{where} sends limit {descriptor.limit!r} twice")
        seen.add(descriptor.limit)
    return RouteLimits(on_failure=on_failure, descriptors=descriptors)


def _parse_route_descriptor(entry: object, where: str, rules: Sequence[RateLimitRule]) -> RouteDescriptor:
    raw = _mapping(entry, where, required={LIMIT_ENTRY, "entries"}, optional={"only_anonymous"})
    limit = _text(raw[LIMIT_ENTRY], f"{where}.limit")
    entries = _text_list(raw["entries"], f"{where}.entries")
    if not entries:
        raise _InvalidError(f"{where}.entries must name at least one source")
    unknown = sorted(set(entries) - ENTRY_SOURCES)
    if unknown:
        raise _InvalidError(f"{where}.entries {unknown} are not sources (use {sorted(ENTRY_SOURCES)})")
    if len(set(entries)) != len(entries):
        raise _InvalidError(f"{where}.entries names a source twice")
    only_anonymous = raw.get("only_anonymous", False)
    if not isinstance(only_anonymous, bool):
        raise _InvalidError(f"{where}.only_anonymous must be true or false, got {only_anonymous!r}")
    candidates = [rule for rule in rules if rule.descriptor[LIMIT_ENTRY] == limit]
    if not candidates:
        raise _InvalidError(f"{where}: no limit has descriptor limit {limit!r}")
    sent = {LIMIT_ENTRY, *entries}
    if not any(set(rule.descriptor) <= sent and set(rule.key) <= sent for rule in candidates):
        names = ", ".join(rule.name for rule in candidates)
        raise _InvalidError(
            f"{where}: entries {list(entries)} can never match a {limit!r} limit ({names}): "
            "each needs its descriptor and key entries"
        )
    return RouteDescriptor(limit=limit, entries=entries, only_anonymous=only_anonymous)


def _mapping(
    value: object,
    where: str,
    *,
    required: Iterable[str],
    optional: Iterable[str] = (),
    open_keys: bool = False,
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _InvalidError(f"{where} must be a mapping, got {type(value).__name__}")
    needed = set(required)
    missing = sorted(needed - set(value))
    if missing:
        raise _InvalidError(f"{where} lacks {', '.join(missing)}")
    if not open_keys:
        unknown = sorted(str(key) for key in set(value) - needed - set(optional))
        if unknown:
            raise _InvalidError(f"{where} has unknown keys {', '.join(unknown)}")
    return value


def _text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise _InvalidError(f"{where} must be a non-empty string, got {value!r}")
    return value


def _text_list(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _InvalidError(f"{where} must be a list of names, got {type(value).__name__}")
    return tuple(_text(item, where) for item in value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
