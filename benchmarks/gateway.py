"""`scripts/bench gateway`: what a request costs through the Envoy gateway, measured with wrk.

A real `parley up` (Envoy plus the one Python process that hosts every service and the edge server)
runs on free loopback ports in a temporary data dir, on SQLite (what `parley up` ships with) or, with
`--postgres`, on a brand-new PostgreSQL database. PARLEY_REDIS_URL points at the local Redis, so the
rate-limit service decides every request with its Lua script in Redis; the shipped rules are scaled
(x10,000) so that the bench user never meets a limit while every request still goes through the RLS.
One user is registered and logged in through the gateway for the JWT.

Load: wrk, 32 connections on 2 threads, only ever aimed at loopback. Each workload is warmed up, then
bounded by `--seconds` AND by `--requests` (a wrk Lua script stops at the count); any non-2xx answer
or socket error fails the workload. Workloads, in order, one run, same concurrency:
  direct              GET /livez, an Envoy direct_response: the machine's ceiling (the baseline)
  trivial_rpc         GET /v1/models, anonymous: transcoder, RLS (anonymous limit), chat.ListModels
                      (an in-memory catalog)
  authenticated_read  GET /v1/users/me/sessions with a Bearer JWT: jwt_authn, RLS (plan limit),
                      auth.ListSessions (one database read)

Where the time goes: the parley process's /metrics and Envoy's admin /stats are read before and after
each measured run. The differences give Envoy's whole-request time, the service leg as Envoy sees it
and the handler time in Python, the RLS decision time in Python (what is left of Envoy's request time
besides the service leg is the RLS wait plus Envoy's filters; Envoy's `edge` cluster also carries the
span exports, so it is reported but not used for the split), and each process's CPU per request.

Caveats: wrk, Envoy and the Python process share this machine's cores, and the machine is shared
with whatever else runs (the load average is recorded), so the ratios are the comparable numbers.
Logging is as `parley up` ships it (JSON at INFO, Envoy's access log on stdout, here to a file).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from redis.exceptions import RedisError

from benchmarks.harness import Measurement, Report, print_report
from gateway.topology import EDGE_CLUSTER
from tests.support.databases import fresh_postgres_database
from tests.support.parley_process import EmbeddedPorts, ParleyProcess, children_of
from tests.support.rate_limits import scaled_rate_limits

CONNECTIONS: Final = 32
THREADS: Final = 2
BASELINE: Final = "direct"
# Database 14 keeps the bench's rate-limit counters apart from the tests' database (15).
DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/14"
DEFAULT_POSTGRES_URL: Final = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
# The largest factor every shipped rule accepts (a rate may not exceed one request per microsecond):
# the free plan then allows 10,000 req/s with a burst of 200,000, far above what this machine serves.
RATE_LIMIT_SCALE: Final = 10_000
EMAIL: Final = "bench@example.com"
PASSWORD: Final = "violet-harbour-lantern-42"  # noqa: S105 - the benchmark account's password
STARTUP_TIMEOUT_S: Final = 90.0
# Envoy flushes stats every 5 s (its default); its histograms are read once a flush took a run in.
ENVOY_FLUSH_WAIT_S: Final = 15.0
ENVOY_POLL_INTERVAL_S: Final = 0.25
# wrk's own bound is -d; this only catches a wrk that hangs.
WRK_GRACE_S: Final = 30.0
WRK_RESULT_MARKER: Final = "WRK_RESULT "
# The seed's old stack under load (GATEWAY-FACTS.md), for comparison.
SEED_PER_SECOND: Final = 521.0
SEED_MEAN_MS: Final = 16.64
AUTH_READ_VS_TRIVIAL_MIN: Final = 0.5
AUTH_READ_P99_MAX_MS: Final = 50.0
ENVOY_LISTENER: Final = "parley_http"
# Envoy's cluster for the edge server: the rate-limit service, ext_authz and (without an OTLP
# collector) the trace receiver.

# Runs in every wrk thread (and once more for setup/done). A thread stops at its share of the request
# count; it then sends SIGINT to wrk, because wrk's main thread otherwise sleeps through the whole -d
# (and SIGINT is how wrk ends a run early: it reports the time actually spent).
WRK_SCRIPT: Final = r"""
local ffi = require("ffi")
ffi.cdef[[ int kill(int pid, int sig); int getpid(void); ]]
local SIGINT = 2
local threads = {}
local quota = math.huge

responses = 0
non_2xx = 0
first_failure = ""

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  quota = tonumber(args[1]) or math.huge
end

function response(status, headers, body)
  responses = responses + 1
  if status < 200 or status > 299 then
    non_2xx = non_2xx + 1
    if first_failure == "" then
      first_failure = tostring(status) .. " " .. string.sub(body or "", 1, 300)
    end
  end
  if responses >= quota then
    wrk.thread:stop()
    ffi.C.kill(ffi.C.getpid(), SIGINT)
  end
end

local function json_string(text)
  text = string.gsub(text, "[%c\"\\]", function(c)
    if c == "\"" or c == "\\" then return "\\" .. c end
    return " "
  end)
  return "\"" .. text .. "\""
end

function done(summary, latency, requests)
  local failures, failure = 0, ""
  for _, thread in ipairs(threads) do
    failures = failures + thread:get("non_2xx")
    local seen = thread:get("first_failure")
    if failure == "" and seen ~= "" then failure = seen end
  end
  local e = summary.errors
  io.write("WRK_RESULT ")
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non_2xx": %d, "connect_errors": %d, "read_errors": %d, '
      .. '"write_errors": %d, "timeouts": %d, "mean_us": %.1f, "p50_us": %d, "p90_us": %d, '
      .. '"p99_us": %d, "max_us": %d, "first_failure": %s}\n',
    summary.requests, summary.duration, failures, e.connect, e.read, e.write, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, json_string(failure)))
end
"""


@dataclass(frozen=True)
class Workload:
    """A GET through the gateway, and where its time is spent on the Python side and in Envoy."""

    name: str
    path: str
    # (grpc_service, grpc_method) as the Python process's RPC metrics label it; None: Envoy alone.
    rpc: tuple[str, str] | None = None
    # The Envoy cluster of the service leg.
    cluster: str | None = None
    authenticated: bool = False


WORKLOADS: Final = (
    Workload(BASELINE, "/livez"),
    Workload("trivial_rpc", "/v1/models", ("parley.chat.v1.ChatService", "ListModels"), "chat"),
    Workload(
        "authenticated_read",
        "/v1/users/me/sessions",
        ("parley.auth.v1.AuthService", "ListSessions"),
        "auth",
        authenticated=True,
    ),
)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="at most this long per workload (default 10)")
    parser.add_argument(
        "--requests",
        type=int,
        default=200_000,
        help="at most this many requests per workload (default 200,000)",
    )
    parser.add_argument("--warmup-seconds", type=int, default=2, help="warm-up per workload (default 2)")
    parser.add_argument(
        "--postgres", action="store_true", help="a fresh PostgreSQL database instead of SQLite"
    )
    arguments = parser.parse_args(argv)
    if arguments.seconds < 1 or arguments.requests < THREADS or arguments.warmup_seconds < 0:
        parser.error(f"--seconds must be at least 1, --requests at least {THREADS}, --warmup-seconds >= 0")
    # The access token lives 15 minutes and is taken once, just before the authenticated workload.
    if arguments.seconds + arguments.warmup_seconds > 600:
        parser.error("--seconds plus --warmup-seconds must stay within 600")
    return arguments


# ---------------------------------------------------------------------------------- distributions


@dataclass(frozen=True)
class Distribution:
    """A latency histogram in milliseconds: non-overlapping (low, high, count) bins, ascending."""

    bins: tuple[tuple[float, float, float], ...]
    # The exact sum of the observations, when the source keeps one (Prometheus does).
    sum_ms: float | None = None

    @property
    def count(self) -> float:
        return sum(count for _, _, count in self.bins)

    def minus(self, earlier: Distribution) -> Distribution:
        before = {(low, high): count for low, high, count in earlier.bins}
        bins = tuple((low, high, count - before.get((low, high), 0.0)) for low, high, count in self.bins)
        sum_ms = None if self.sum_ms is None or earlier.sum_ms is None else self.sum_ms - earlier.sum_ms
        return Distribution(tuple(b for b in bins if b[2] > 0), sum_ms)

    def mean_ms(self) -> float:
        count = self.count
        if not count:
            return 0.0
        if self.sum_ms is not None:
            return self.sum_ms / count
        # Bin midpoints: Envoy's detailed bins are about 1% wide, so this is close to exact.
        return sum((low + high) / 2 * n for low, high, n in self.bins) / count

    def quantile_ms(self, fraction: float) -> float:
        """Linear interpolation inside the bin holding the quantile; an open top bin gives its floor."""
        target = fraction * self.count
        seen = 0.0
        for low, high, count in self.bins:
            if seen + count >= target:
                if math.isinf(high):
                    return low
                return low + (high - low) * (target - seen) / count
            seen += count
        return self.bins[-1][0] if self.bins else 0.0

    def shares(self) -> dict[str, float]:
        count = self.count
        return {_bin_label(low, high): round(n / count, 4) for low, high, n in self.bins} if count else {}

    def summary(self, *, with_shares: bool = False) -> dict[str, object]:
        described: dict[str, object] = {
            "count": int(self.count),
            "mean_ms": round(self.mean_ms(), 3),
            "p50_ms": round(self.quantile_ms(0.50), 3),
            "p99_ms": round(self.quantile_ms(0.99), 3),
        }
        if with_shares:
            described["bucket_shares"] = self.shares()
        return described


def _bin_label(low: float, high: float) -> str:
    if math.isinf(high):
        return f">{low:g}ms"
    return f"{low:g}-{high:g}ms"


def prometheus_distribution(
    families: Mapping[str, list[Any]], name: str, labels: Mapping[str, str] | None = None
) -> Distribution:
    """A prometheus_client histogram in seconds, restricted to samples carrying `labels`."""
    wanted = dict(labels or {})
    cumulative: dict[float, float] = {}
    sum_s = 0.0
    for sample in families.get(name, []):
        if any(sample.labels.get(key) != value for key, value in wanted.items()):
            continue
        if sample.name == f"{name}_bucket":
            bound = float(sample.labels["le"])
            cumulative[bound] = cumulative.get(bound, 0.0) + sample.value
        elif sample.name == f"{name}_sum":
            sum_s += sample.value
    bins: list[tuple[float, float, float]] = []
    previous_bound, previous_count = 0.0, 0.0
    for bound in sorted(cumulative):
        bins.append((previous_bound * 1000, bound * 1000, cumulative[bound] - previous_count))
        previous_bound, previous_count = bound, cumulative[bound]
    return Distribution(tuple(bins), sum_s * 1000)


def envoy_distribution(histograms: Mapping[str, list[Mapping[str, float]]], name: str) -> Distribution:
    """One of Envoy's histograms (ms) from `/stats?format=json&histogram_buckets=detailed` totals."""
    bins = sorted(
        (float(b["lower_bound"]), float(b["lower_bound"]) + float(b["width"]), float(b["count"]))
        for b in histograms.get(name, [])
    )
    return Distribution(tuple(bins))


# --------------------------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class Snapshot:
    """The parley process's metrics, Envoy's stats and every process's CPU time, at one moment."""

    families: dict[str, list[Any]]
    envoy_counters: dict[str, float]
    envoy_histograms: dict[str, list[Mapping[str, float]]]
    cpu_s: dict[str, float]
    taken_at: float


@dataclass(frozen=True)
class Targets:
    """Where a running `parley up` answers."""

    gateway: str
    envoy_admin: str
    metrics: str
    parley_pid: int
    envoy_pid: int


ENVOY_STATS_FILTER: Final = (
    rf"^(http\.{ENVOY_LISTENER}\.downstream_rq_(time|completed)"
    r"|cluster\.[a-z_]+\.upstream_rq_time"
    r"|cluster\.[a-z_]+\.ratelimit\..+)$"
)


async def take_snapshot(client: httpx.AsyncClient, targets: Targets, *, ending_run: bool) -> Snapshot:
    """Python's metrics and the CPU times right at the run's edge, and Envoy's stats once its
    histograms caught up (before a run: first; after it: last), so the two snapshots frame the run."""
    envoy = None if ending_run else await settled_envoy_stats(client, targets)
    metrics = await client.get(targets.metrics)
    metrics.raise_for_status()
    cpu = {
        "parley (python)": cpu_seconds(targets.parley_pid),
        "envoy": cpu_seconds(targets.envoy_pid),
        "wrk": children_cpu_seconds(),
    }
    taken_at = time.monotonic()
    counters, histograms = envoy or await settled_envoy_stats(client, targets)
    families: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(metrics.text):
        families.setdefault(family.name, []).extend(family.samples)
    return Snapshot(families, counters, histograms, cpu, taken_at)


async def settled_envoy_stats(
    client: httpx.AsyncClient, targets: Targets
) -> tuple[dict[str, float], dict[str, list[Mapping[str, float]]]]:
    """Envoy's counters are live but its histograms only take new values at each stats flush
    (every 5 s): poll until the request-time histogram holds every completed request."""
    deadline = time.monotonic() + ENVOY_FLUSH_WAIT_S
    while True:
        stats = await client.get(
            f"{targets.envoy_admin}/stats",
            params={"format": "json", "histogram_buckets": "detailed", "filter": ENVOY_STATS_FILTER},
        )
        stats.raise_for_status()
        counters: dict[str, float] = {}
        histograms: dict[str, list[Mapping[str, float]]] = {}
        for entry in stats.json()["stats"]:
            if "histograms" in entry:
                for detail in entry["histograms"].get("details", []):
                    histograms[detail["name"]] = detail.get("totals", [])
            elif "name" in entry:
                counters[entry["name"]] = float(entry["value"])
        completed = counters.get(f"http.{ENVOY_LISTENER}.downstream_rq_completed", 0.0)
        recorded = envoy_distribution(histograms, f"http.{ENVOY_LISTENER}.downstream_rq_time").count
        if recorded >= completed:
            return counters, histograms
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"Envoy's histograms hold {recorded:g} of {completed:g} requests after {ENVOY_FLUSH_WAIT_S}s"
            )
        await asyncio.sleep(ENVOY_POLL_INTERVAL_S)


def children_cpu_seconds() -> float:
    """CPU time of this process's finished children: only wrk ends while the bench runs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads), from /proc; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3 of stat, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _counter_deltas(before: Snapshot, after: Snapshot, name: str) -> dict[str, float]:
    """Per label set, how much a Prometheus counter grew (labels joined as `k=v,k=v`)."""

    def totals(snapshot: Snapshot) -> dict[str, float]:
        found: dict[str, float] = {}
        for sample in snapshot.families.get(name, []):
            if sample.name == f"{name}_total":
                key = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())) or "all"
                found[key] = sample.value
        return found

    earlier = totals(before)
    return {
        key: value - earlier.get(key, 0.0)
        for key, value in totals(after).items()
        if value > earlier.get(key, 0.0)
    }


def where_the_time_goes(
    workload: Workload, before: Snapshot, after: Snapshot, measurement: Measurement
) -> dict[str, object]:
    """The measured run's time split: Envoy as a whole, its RLS calls, the service, and CPU."""

    def envoy(name: str) -> Distribution:
        return envoy_distribution(after.envoy_histograms, name).minus(
            envoy_distribution(before.envoy_histograms, name)
        )

    def python(name: str, labels: Mapping[str, str] | None = None) -> Distribution:
        return prometheus_distribution(after.families, name, labels).minus(
            prometheus_distribution(before.families, name, labels)
        )

    wall_s = after.taken_at - before.taken_at
    cpu_s = {name: after.cpu_s[name] - before.cpu_s.get(name, 0.0) for name in after.cpu_s}
    envoy_request = envoy(f"http.{ENVOY_LISTENER}.downstream_rq_time")
    breakdown: dict[str, object] = {
        "envoy_request": envoy_request.summary(),
        "cpu_share_of_one_core": {name: round(seconds / wall_s, 3) for name, seconds in cpu_s.items()},
        "cpu_ms_per_request": {
            name: round(1000 * seconds / measurement.requests, 3) if measurement.requests else 0.0
            for name, seconds in cpu_s.items()
        },
    }
    if workload.rpc is None or workload.cluster is None:
        return breakdown
    service, method = workload.rpc
    edge = envoy(f"cluster.{EDGE_CLUSTER}.upstream_rq_time")
    rls_python = python("parley_ratelimit_decision_seconds")
    service_envoy = envoy(f"cluster.{workload.cluster}.upstream_rq_time")
    service_python = python(
        "parley_rpc_server_handling_seconds", {"grpc_service": service, "grpc_method": method}
    )
    requests = envoy_request.count or 1.0
    envoy_ms = envoy_request.mean_ms()
    service_ms = service_envoy.mean_ms()
    # Envoy times no filter on its own; with sub-millisecond filters (the direct workload shows
    # Envoy's floor), what the service leg leaves of the request is the wait for the RLS.
    rls_leg_ms = max(0.0, envoy_ms - service_ms)
    ratelimit_counters = {
        name: after.envoy_counters[name] - before.envoy_counters.get(name, 0.0)
        for name in sorted(after.envoy_counters)
        if ".ratelimit." in name and after.envoy_counters[name] > before.envoy_counters.get(name, 0.0)
    }
    breakdown.update(
        {
            "service_leg_as_envoy_sees_it": service_envoy.summary(),
            "service_handler_in_python": service_python.summary(),
            "rls_calls_per_request": round(rls_python.count / requests, 3),
            "rls_decision_in_python": rls_python.summary(with_shares=True),
            "edge_cluster_as_envoy_sees_it": {
                **edge.summary(),
                "calls_per_request": round(edge.count / requests, 3),
                "carries": "the RLS calls and Envoy's span exports (both go to the edge server)",
            },
            "split_of_envoy_request_mean_ms": {
                "whole_request": round(envoy_ms, 3),
                "service_leg": round(service_ms, 3),
                "rls_leg_and_envoy_filters": round(rls_leg_ms, 3),
                "of_which_rls_decision_in_python": round(
                    rls_python.mean_ms() * rls_python.count / requests, 3
                ),
            },
            "share_of_envoy_request_time": {
                "service_leg": round(service_ms / envoy_ms, 3) if envoy_ms else 0.0,
                "rls_leg_and_envoy_filters": round(rls_leg_ms / envoy_ms, 3) if envoy_ms else 0.0,
            },
            "rate_limit_decisions": _counter_deltas(before, after, "parley_ratelimit_decisions"),
            "rate_limit_backend_errors": _counter_deltas(before, after, "parley_ratelimit_backend_errors"),
            "envoy_ratelimit_counters": ratelimit_counters,
        }
    )
    return breakdown


# --------------------------------------------------------------------------------------------- wrk


@dataclass(frozen=True)
class WrkResult:
    """What the Lua script's done() hook printed."""

    requests: int
    duration_us: int
    non_2xx: int
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int
    mean_us: float
    p50_us: int
    p90_us: int
    p99_us: int
    max_us: int
    first_failure: str

    @property
    def errors(self) -> int:
        return self.non_2xx + self.connect_errors + self.read_errors + self.write_errors + self.timeouts

    def measurement(self, name: str) -> Measurement:
        seconds = self.duration_us / 1e6
        return Measurement(
            name=name,
            concurrency=CONNECTIONS,
            requests=self.requests,
            errors=self.errors,
            seconds=round(seconds, 3),
            per_second=round(self.requests / seconds, 1) if seconds else 0.0,
            p50_ms=round(self.p50_us / 1000, 2),
            p99_ms=round(self.p99_us / 1000, 2),
            mean_ms=round(self.mean_us / 1000, 2),
        )


@dataclass
class Wrk:
    """Runs wrk with the bounding Lua script against one loopback URL at a time."""

    script: Path

    async def run(self, url: str, *, seconds: int, requests: int, headers: Mapping[str, str]) -> WrkResult:
        if not url.startswith("http://127.0.0.1:"):
            raise ValueError(f"wrk is only aimed at loopback, not {url}")
        header_args = [arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")]
        process = await asyncio.create_subprocess_exec(
            "wrk",
            f"-t{THREADS}",
            f"-c{CONNECTIONS}",
            f"-d{seconds}s",
            "--timeout",
            "5s",
            "-s",
            str(self.script),
            *header_args,
            url,
            "--",
            str(math.ceil(requests / THREADS)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), seconds + WRK_GRACE_S)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise RuntimeError(f"wrk did not finish within {seconds + WRK_GRACE_S}s of {url}") from None
        output = stdout.decode(errors="replace")
        line = next((line for line in output.splitlines() if line.startswith(WRK_RESULT_MARKER)), None)
        if process.returncode != 0 or line is None:
            errors = stderr.decode(errors="replace")
            raise RuntimeError(f"wrk exited with {process.returncode} and no result:\n{output}\n{errors}")
        return WrkResult(**json.loads(line.removeprefix(WRK_RESULT_MARKER)))


# ------------------------------------------------------------------------------------------ parley


@contextlib.asynccontextmanager
async def running_parley(
    directory: Path, *, redis_url: str, database_url: str | None
) -> AsyncIterator[Targets]:
    """`parley up` on free ports with data in `directory`; stopped (and killed if need be) after."""
    ports = EmbeddedPorts()
    env = {
        **ports.env(),
        "PARLEY_DATA_DIR": str(directory / "data"),
        "PARLEY_REDIS_URL": redis_url,
        "PARLEY_RATE_LIMITS_FILE": str(scaled_rate_limits(RATE_LIMIT_SCALE, directory=directory)),
    }
    if database_url is not None:
        env["PARLEY_DATABASE_URL"] = database_url
    process = ParleyProcess(["up"], env=env, log_path=directory / "parley.log")
    process.start()
    try:
        gateway = f"http://127.0.0.1:{ports.http}"
        await process.wait_for_http_status(f"{gateway}/healthz", timeout_s=STARTUP_TIMEOUT_S)
        await process.wait_for_output("Parley is up", timeout_s=STARTUP_TIMEOUT_S)
        envoys = children_of(process.pid)
        if len(envoys) != 1:
            raise RuntimeError(f"expected one Envoy child of parley ({process.pid}), found {envoys}")
        yield Targets(
            gateway=gateway,
            envoy_admin=f"http://127.0.0.1:{ports.admin}",
            metrics=f"http://127.0.0.1:{ports.metrics}/metrics",
            parley_pid=process.pid,
            envoy_pid=envoys[0],
        )
    finally:
        try:
            await process.stop()
        finally:
            process.kill()


async def sign_in(client: httpx.AsyncClient, gateway: str, *, register: bool) -> str:
    """Register (once) and log in through the gateway; returns the access JWT."""
    if register:
        registered = await client.post(
            f"{gateway}/v1/auth/register",
            json={"email": EMAIL, "password": PASSWORD, "display_name": "Bench"},
        )
        _expect_ok(registered, "register")
    signed_in = await client.post(f"{gateway}/v1/auth/login", json={"email": EMAIL, "password": PASSWORD})
    _expect_ok(signed_in, "login")
    token: str = signed_in.json()["tokens"]["access_token"]
    return token


def _expect_ok(response: httpx.Response, what: str) -> None:
    if response.status_code != 200:
        raise RuntimeError(
            f"{what}: {response.request.url} answered {response.status_code}: {response.text[:500]}"
        )


async def check_redis(url: str) -> None:
    client = Redis.from_url(url, socket_connect_timeout=2.0)
    try:
        await client.ping()
    except (OSError, RedisError) as error:
        raise SystemExit(f"Redis at {url} does not answer ({error}): run scripts/ensure-services") from None
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def database_url(*, postgres: bool) -> AsyncIterator[tuple[str | None, str]]:
    """None (embedded SQLite in the data dir), or a fresh PostgreSQL database dropped afterwards."""
    if not postgres:
        yield None, "sqlite (embedded default, file in the temporary data dir)"
        return
    base = os.environ.get("PARLEY_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL
    async with fresh_postgres_database(base) as url:
        yield url, "postgresql (fresh database on the local server)"


# ------------------------------------------------------------------------------------------- runs


async def run(arguments: argparse.Namespace) -> tuple[Report, list[str]]:
    load_at_start = [round(load, 2) for load in os.getloadavg()]
    redis_url = os.environ.get("PARLEY_BENCH_REDIS_URL") or DEFAULT_REDIS_URL
    await check_redis(redis_url)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run this through scripts/bench gateway, which installs it")
    report = Report(benchmark="gateway", baseline=BASELINE)
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="parley-bench-gateway-") as temporary:
        directory = Path(temporary)
        script = directory / "bounded.lua"
        script.write_text(WRK_SCRIPT, encoding="utf-8")
        wrk = Wrk(script)
        async with (
            database_url(postgres=arguments.postgres) as (url, database),
            running_parley(directory, redis_url=redis_url, database_url=url) as targets,
            httpx.AsyncClient(timeout=10.0) as client,
        ):
            await sign_in(client, targets.gateway, register=True)
            breakdowns: dict[str, object] = {}
            first_failures: dict[str, str] = {}
            for workload in WORKLOADS:
                result, breakdown, warmup = await _measure(workload, arguments, wrk, client, targets)
                report.measurements.append(result.measurement(workload.name))
                breakdowns[workload.name] = breakdown
                if warmup is not None and warmup.errors:
                    first_failures[f"{workload.name} (warm-up)"] = _first_failure(warmup)
                if result.errors:
                    failures.append(workload.name)
                    first_failures[workload.name] = _first_failure(result)
            report.notes["where_the_time_goes"] = breakdowns
            if first_failures:
                report.notes["first_failure"] = first_failures
    report.notes.update(_context_notes(arguments, database, redis_url, load_at_start))
    report.notes.update(_checks(report))
    if failures:
        report.notes["failed_workloads"] = failures
    return report, failures


async def _measure(
    workload: Workload, arguments: argparse.Namespace, wrk: Wrk, client: httpx.AsyncClient, targets: Targets
) -> tuple[WrkResult, dict[str, object], WrkResult | None]:
    """Check the path answers, warm it up, then the bounded run framed by two snapshots."""
    headers = {}
    if workload.authenticated:
        # Taken just before the workload: the access token lives 15 minutes.
        headers["Authorization"] = f"Bearer {await sign_in(client, targets.gateway, register=False)}"
    url = f"{targets.gateway}{workload.path}"
    _expect_ok(await client.get(url, headers=headers), workload.name)
    warmup = None
    if arguments.warmup_seconds:
        warmup = await wrk.run(
            url, seconds=arguments.warmup_seconds, requests=arguments.requests, headers=headers
        )
    before = await take_snapshot(client, targets, ending_run=False)
    result = await wrk.run(url, seconds=arguments.seconds, requests=arguments.requests, headers=headers)
    after = await take_snapshot(client, targets, ending_run=True)
    breakdown = {
        "client_latency_ms": {
            "mean": round(result.mean_us / 1000, 3),
            "p50": round(result.p50_us / 1000, 3),
            "p90": round(result.p90_us / 1000, 3),
            "p99": round(result.p99_us / 1000, 3),
            "max": round(result.max_us / 1000, 3),
        },
        **where_the_time_goes(workload, before, after, result.measurement(workload.name)),
    }
    return result, breakdown, warmup


def _first_failure(result: WrkResult) -> str:
    if result.first_failure:
        return result.first_failure
    return (
        f"socket errors: connect {result.connect_errors}, read {result.read_errors}, "
        f"write {result.write_errors}, timeouts {result.timeouts}"
    )


def _context_notes(
    arguments: argparse.Namespace, database: str, redis_url: str, load_at_start: list[float]
) -> dict[str, object]:
    return {
        "setup": (
            "parley up (Envoy + one Python process with every service and the edge server) on loopback; "
            f"wrk {CONNECTIONS} connections on {THREADS} threads, all on this machine's cores"
        ),
        "database": database,
        "rate_limits": {
            "store": f"Redis {redis_url} (the RLS Lua script)",
            "rules": f"envoy/ratelimits.yaml with every rate and burst x{RATE_LIMIT_SCALE}",
        },
        "bounds": {
            "requests": arguments.requests,
            "seconds": arguments.seconds,
            "warmup_seconds": arguments.warmup_seconds,
        },
        "load_average_at_start": load_at_start,
        "load_average_at_end": [round(load, 2) for load in os.getloadavg()],
        "cpus": os.cpu_count(),
        "seed_old_stack": {"per_second": SEED_PER_SECOND, "mean_ms": SEED_MEAN_MS},
    }


def _checks(report: Report) -> dict[str, object]:
    by_name = {m.name: m for m in report.measurements}
    trivial, authenticated = by_name.get("trivial_rpc"), by_name.get("authenticated_read")
    if trivial is None or authenticated is None:
        return {}
    versus_trivial = round(authenticated.per_second / trivial.per_second, 3) if trivial.per_second else 0.0
    return {
        "auth_read_vs_trivial_throughput": versus_trivial,
        "checks": {
            f"auth_read_vs_trivial_throughput >= {AUTH_READ_VS_TRIVIAL_MIN}": {
                "value": versus_trivial,
                "met": versus_trivial >= AUTH_READ_VS_TRIVIAL_MIN,
            },
            f"auth_read_p99_ms < {AUTH_READ_P99_MAX_MS:g}": {
                "value": authenticated.p99_ms,
                "met": authenticated.p99_ms < AUTH_READ_P99_MAX_MS,
            },
        },
        "versus_seed_old_stack": {
            "authenticated_read_throughput_ratio": round(authenticated.per_second / SEED_PER_SECOND, 2),
            "authenticated_read_mean_ms": authenticated.mean_ms,
            "seed_mean_ms": SEED_MEAN_MS,
        },
    }


def _print_details(report: Report, failures: Iterable[str]) -> None:
    lines = [f"{'workload':34} {'mean ms':>8}"]
    lines += [f"{m.name:34} {m.mean_ms:8.2f}" for m in report.measurements]
    if "auth_read_vs_trivial_throughput" in report.notes:
        lines.append(
            f"authenticated_read / trivial_rpc throughput: {report.notes['auth_read_vs_trivial_throughput']}"
        )
    checks = report.notes.get("checks")
    if isinstance(checks, dict):
        lines += [
            f"check {name}: {'met' if c['met'] else 'NOT met'} ({c['value']})" for name, c in checks.items()
        ]
    breakdowns = report.notes.get("where_the_time_goes")
    if isinstance(breakdowns, dict):
        lines += _time_split_rows(breakdowns)
    lines += [f"FAILED: {name} (see notes.first_failure)" for name in failures]
    print("\n".join(lines))  # noqa: T201 - a benchmark's report is for the terminal.


def _time_split_rows(breakdowns: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Mean milliseconds per request, by where they were spent, and CPU milliseconds per request."""
    header = (
        f"{'where the time goes (mean ms)':34} {'client':>7} {'envoy':>7} {'service':>8} {'rls+filt':>8} "
        f"{'rls(py)':>8} {'cpu py':>7} {'cpu envoy':>9}"
    )
    rows = [header]
    for name, breakdown in breakdowns.items():
        split = breakdown.get("split_of_envoy_request_mean_ms", {})
        cpu = breakdown["cpu_ms_per_request"]
        figures = [
            breakdown["client_latency_ms"]["mean"],
            breakdown["envoy_request"]["mean_ms"],
            split.get("service_leg", 0.0),
            split.get("rls_leg_and_envoy_filters", 0.0),
            split.get("of_which_rls_decision_in_python", 0.0),
        ]
        rows.append(
            f"{name:34} {figures[0]:7.2f} {figures[1]:7.2f} {figures[2]:8.2f} {figures[3]:8.2f} "
            f"{figures[4]:8.2f} {cpu['parley (python)']:7.3f} {cpu['envoy']:9.3f}"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    arguments = _arguments(argv)
    report, failures = asyncio.run(run(arguments))
    path = report.write()
    print_report(report, path)
    _print_details(report, failures)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
