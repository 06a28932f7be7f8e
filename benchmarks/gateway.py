"""`scripts/bench gateway`: what a request costs through the Envoy gateway.

What runs: a real Parley on free loopback ports in a temporary data dir, with PARLEY_REDIS_URL at the
local Redis, so the rate-limit service decides every request with its Lua script in Redis and the
services check revocations there. The shipped rules are scaled (x10,000) so the bench user never meets
a limit while every request still goes through the RLS. One user is registered and logged in through
the gateway for the JWT. Two setups:
  embedded (default)   `parley up`: Envoy, the services' process (SQLite) and the edge process (the
                       RLS and ext_authz), as the product ships
  --microservices      `parley serve` for each service plus `parley gateway`, on a brand-new
                       PostgreSQL database (as Kubernetes runs it)

Workloads, in order, all only ever aimed at loopback and each bounded by count and time:
  direct              GET /livez, an Envoy direct_response: the machine's ceiling (the baseline)
  trivial_rpc         GET /v1/models, anonymous: transcoder, RLS (anonymous limit), chat.ListModels
                      (an in-memory catalog); closed loop, wrk, 32 connections
  authenticated_read  GET /v1/users/me/sessions with a Bearer JWT: jwt_authn, RLS (plan limit),
                      auth.ListSessions (one database read); closed loop, wrk, 32 connections
  authenticated_read_open_loop
                      the same request at a fixed arrival rate (--open-rate, 521/s: the seed stack's
                      throughput) for --open-seconds, from `benchmarks.openloop`, which measures each
                      request from the moment it was due (coordinated omission corrected)

Where the time goes: every Python process's /metrics and Envoy's admin /stats are read before and
after each measured run, with each process's CPU time. The differences give Envoy's whole-request
time, the service leg as Envoy sees it and the handler time in Python, the RLS decision time, and
each process's CPU per request; "python (all processes)" is the sum over every Parley process.
`--profile` then runs the closed-loop authenticated read once more, with py-spy sampling each Python
process (not during the measured runs: the sampler's own CPU would skew them), and reports where
the samples fall by component and the hottest frames (raw samples are written beside the JSON).

Caveats: the load generator, Envoy, Redis and the Python processes share this machine's cores, and the
machine is shared with whatever else runs (the load average is recorded), so ratios are the
comparable numbers. Logging is as shipped (JSON at INFO, Envoy's access log to a file here).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from redis.exceptions import RedisError

from benchmarks.harness import RESULTS_DIR, Measurement, Report, check_lines, goal_check, print_report
from gateway.topology import EDGE_CLUSTER
from services.common.settings import SERVICE_NAMES
from tests.support.databases import fresh_postgres_database
from tests.support.gateway import free_port
from tests.support.microservices import migrate, running_microservices
from tests.support.parley_process import EmbeddedPorts, ParleyProcess, children_of, command_of
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
OPEN_LOOP_GRACE_S: Final = 10.0
# The seed's old stack under load (GATEWAY-FACTS.md), for comparison; also the open loop's rate.
SEED_PER_SECOND: Final = 521.0
SEED_MEAN_MS: Final = 16.64
# The goals of issue 10 (and its moonshots).
AUTH_READ_VS_TRIVIAL_MIN: Final = 0.5
AUTH_READ_VS_TRIVIAL_MOONSHOT: Final = 0.8
OPEN_LOOP_P99_MAX_MS: Final = 50.0
OPEN_LOOP_P99_MOONSHOT_MS: Final = 20.0
PYTHON_CPU_PER_AUTH_READ_MAX_MS: Final = 1.2
PYTHON_CPU_PER_AUTH_READ_MOONSHOT_MS: Final = 0.8
ENVOY_LISTENER: Final = "parley_http"
PYTHON_TOTAL: Final = "python (all processes)"
PROFILE_TOP_FRAMES: Final = 15

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
    # (grpc_service, grpc_method) as the Python processes' RPC metrics label it; None: Envoy alone.
    rpc: tuple[str, str] | None = None
    # The Envoy cluster of the service leg.
    cluster: str | None = None
    authenticated: bool = False
    # Offered at a fixed rate by the open-loop generator instead of wrk's closed loop.
    open_loop: bool = False


AUTHENTICATED_READ: Final = "authenticated_read"
OPEN_LOOP_READ: Final = "authenticated_read_open_loop"
WORKLOADS: Final = (
    Workload(BASELINE, "/livez"),
    Workload("trivial_rpc", "/v1/models", ("parley.chat.v1.ChatService", "ListModels"), "chat"),
    Workload(
        AUTHENTICATED_READ,
        "/v1/users/me/sessions",
        ("parley.auth.v1.AuthService", "ListSessions"),
        "auth",
        authenticated=True,
    ),
    Workload(
        OPEN_LOOP_READ,
        "/v1/users/me/sessions",
        ("parley.auth.v1.AuthService", "ListSessions"),
        "auth",
        authenticated=True,
        open_loop=True,
    ),
)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=int, default=10, help="at most this long per wrk workload (default 10)"
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=200_000,
        help="at most this many requests per wrk workload (default 200,000)",
    )
    parser.add_argument("--warmup-seconds", type=int, default=2, help="warm-up per workload (default 2)")
    parser.add_argument(
        "--open-rate",
        type=float,
        default=SEED_PER_SECOND,
        help=f"requests per second of the open-loop workload (default {SEED_PER_SECOND:g})",
    )
    parser.add_argument(
        "--open-seconds", type=int, default=60, help="how long the open-loop workload runs (default 60)"
    )
    setup = parser.add_mutually_exclusive_group()
    setup.add_argument(
        "--postgres", action="store_true", help="embedded, on a fresh PostgreSQL database instead of SQLite"
    )
    setup.add_argument(
        "--microservices",
        action="store_true",
        help="`parley serve` per service plus `parley gateway`, on a fresh PostgreSQL database",
    )
    parser.add_argument(
        "--profile", action="store_true", help="sample every Python process with py-spy (closed-loop read)"
    )
    arguments = parser.parse_args(argv)
    if arguments.seconds < 1 or arguments.requests < THREADS or arguments.warmup_seconds < 0:
        parser.error(f"--seconds must be at least 1, --requests at least {THREADS}, --warmup-seconds >= 0")
    if arguments.open_rate <= 0 or not 1 <= arguments.open_seconds <= 600:
        parser.error("--open-rate must be positive and --open-seconds within 1..600")
    # The access token lives 15 minutes and is taken just before each authenticated workload.
    if max(arguments.seconds, arguments.open_seconds) + arguments.warmup_seconds > 600:
        parser.error("a workload plus its warm-up must stay within 600 seconds")
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
    """Every Python process's metrics, Envoy's stats and each process's CPU time, at one moment."""

    families: dict[str, list[Any]]
    envoy_counters: dict[str, float]
    envoy_histograms: dict[str, list[Mapping[str, float]]]
    cpu_s: dict[str, float]
    taken_at: float


@dataclass(frozen=True)
class Targets:
    """Where a running Parley answers, and its processes."""

    gateway: str
    envoy_admin: str
    # Every Python process's Prometheus endpoint.
    metrics: tuple[str, ...]
    # Every Python process, by a name for the report.
    python_pids: Mapping[str, int]
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
    pages = await asyncio.gather(*(client.get(url) for url in targets.metrics))
    cpu = {name: cpu_seconds(pid) for name, pid in targets.python_pids.items()}
    cpu[PYTHON_TOTAL] = sum(cpu.values())
    cpu["envoy"] = cpu_seconds(targets.envoy_pid)
    cpu["load generator"] = children_cpu_seconds()
    taken_at = time.monotonic()
    counters, histograms = envoy or await settled_envoy_stats(client, targets)
    families: dict[str, list[Any]] = {}
    for page in pages:
        page.raise_for_status()
        for family in text_string_to_metric_families(page.text):
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
    """CPU time of this process's finished children: only the load generators (wrk, the open loop)
    end while the bench runs."""
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


# ---------------------------------------------------------------------------------- open loop


async def run_open_loop(url: str, *, rate: float, seconds: int, headers: Mapping[str, str]) -> dict[str, Any]:
    """`benchmarks.openloop` in its own process (so it has a core to itself); its JSON result."""
    header_args = [arg for name, value in headers.items() for arg in ("--header", f"{name}: {value}")]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.openloop",
        "--url",
        url,
        "--rate",
        str(rate),
        "--seconds",
        str(seconds),
        *header_args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), seconds + OPEN_LOOP_GRACE_S + 30)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"the open-loop generator did not finish within {seconds}s of {url}") from None
    if process.returncode != 0:
        raise RuntimeError(f"the open-loop generator failed:\n{stderr.decode(errors='replace')[-3000:]}")
    result: dict[str, Any] = json.loads(stdout.decode())
    return result


def open_loop_measurement(name: str, result: Mapping[str, Any]) -> Measurement:
    latency = result["latency_ms"]
    return Measurement(
        name=name,
        concurrency=int(result["peak_connections"]),
        requests=int(result["answered"]),
        errors=int(result["errors"]),
        seconds=float(result["seconds"]),
        per_second=float(result["achieved_per_second"]),
        p50_ms=float(latency["p50"]),
        p99_ms=float(latency["p99"]),
        mean_ms=float(latency["mean"]),
    )


# -------------------------------------------------------------------------------------- profiles


@dataclass
class Profiler:
    """py-spy sampling each Python process for the length of one run (only with --profile)."""

    directory: Path
    targets: Targets
    seconds: int
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.directory / f"profile-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.txt"

    async def start(self) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        for name, pid in self.targets.python_pids.items():
            # --gil: only samples that hold the GIL, i.e. what costs Python CPU; raw: folded stacks.
            self.processes[name] = await asyncio.create_subprocess_exec(
                spy, "record", "--pid", str(pid), "--duration", str(self.seconds), "--rate", "250",
                "--gil", "--nonblocking", "--format", "raw", "--output", str(self.path(name)),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip

    async def finish(self) -> dict[str, object]:
        summaries: dict[str, object] = {}
        for name, process in self.processes.items():
            try:
                await asyncio.wait_for(process.wait(), self.seconds + 30)
            except TimeoutError:
                process.kill()
                await process.wait()
            path = self.path(name)
            summaries[name] = summarize_profile(path) if path.exists() else {"error": "py-spy wrote nothing"}
        return summaries


# Where a sample's time goes: the deepest frame of its stack that belongs to one of these, else
# "other python"; samples whose innermost frame is the event loop itself are native code (grpc's C
# core, uvloop, protobuf), which py-spy cannot see into.
PROFILE_COMPONENTS: Final = (
    ("the ORM unit of work (sqlalchemy, aiosqlite)", ("sqlalchemy/", "aiosqlite/", "services/common/db.py")),
    ("redis-py", ("redis/",)),
    ("hot reads", ("services/common/hot_reads.py",)),
    ("multiplexed Redis", ("services/common/redis_multiplex.py",)),
    (
        "the OpenTelemetry interceptor",
        ("opentelemetry/instrumentation", "grpc/_aio_server.py", "grpc/_server.py"),
    ),
    ("the rate-limit service", ("gateway/rls.py", "services/common/ratelimit.py")),
    ("ext_authz", ("gateway/authz.py",)),
    ("interceptors and identity", ("interceptors.py", "identity.py", "revocation.py", "credentials.py")),
    ("servicers, domain, encoding", ("services/auth/", "services/chat/", "services/billing/", "encoding.py")),
)
NATIVE_COMPONENT: Final = "native: grpc's C core, uvloop, protobuf (the event loop's own samples)"


def summarize_profile(path: Path) -> dict[str, object]:
    """A py-spy raw (folded) profile: the share of samples per component (see PROFILE_COMPONENTS), and
    the hottest frames by own and by inclusive samples (`function (file)`, line numbers dropped)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    components: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        components[_component_of(frames)] += count

    def share(count: int) -> float:
        return round(count / total, 4) if total else 0.0

    def top(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(frame, share(count)) for frame, count in counter.most_common(PROFILE_TOP_FRAMES)]

    return {
        "samples_holding_the_gil": total,
        "raw": str(path),
        "by_component": {name: share(count) for name, count in components.most_common()},
        "own": top(own),
        "inclusive": top(inclusive),
    }


def _component_of(frames: Sequence[str]) -> str:
    if frames[-1].startswith("Runner.run"):
        return NATIVE_COMPONENT
    for frame in reversed(frames):
        for name, markers in PROFILE_COMPONENTS:
            if any(marker in frame for marker in markers):
                return name
    return "other python (asyncio, prometheus_client, ...)"


# ------------------------------------------------------------------------------------------ parley


@contextlib.asynccontextmanager
async def running_embedded(
    directory: Path, *, redis_url: str, rate_limits: Path, database_url: str | None
) -> AsyncIterator[Targets]:
    """`parley up` on free ports with data in `directory`; stopped (and killed if need be) after."""
    ports = EmbeddedPorts()
    env = {
        **ports.env(),
        "PARLEY_DATA_DIR": str(directory / "data"),
        "PARLEY_REDIS_URL": redis_url,
        "PARLEY_RATE_LIMITS_FILE": str(rate_limits),
    }
    if database_url is not None:
        env["PARLEY_DATABASE_URL"] = database_url
    process = ParleyProcess(["up"], env=env, log_path=directory / "parley.log")
    process.start()
    try:
        gateway = f"http://127.0.0.1:{ports.http}"
        await process.wait_for_http_status(f"{gateway}/healthz", timeout_s=STARTUP_TIMEOUT_S)
        await process.wait_for_output("Parley is up", timeout_s=STARTUP_TIMEOUT_S)
        yield Targets(
            gateway=gateway,
            envoy_admin=f"http://127.0.0.1:{ports.admin}",
            metrics=(
                f"http://127.0.0.1:{ports.metrics}/metrics",
                f"http://127.0.0.1:{ports.edge_metrics}/metrics",
            ),
            python_pids={"parley up (services)": process.pid, **_edge_child(process.pid)},
            envoy_pid=_envoy_child(process.pid),
        )
    finally:
        try:
            await process.stop()
        finally:
            process.kill()


@contextlib.asynccontextmanager
async def running_microservices_setup(
    directory: Path, *, redis_url: str, rate_limits: Path, database_url: str
) -> AsyncIterator[Targets]:
    """`parley migrate`, then `parley serve` for each service and `parley gateway`, on free ports."""
    await migrate(database_url)
    metrics_ports: dict[str, int] = {name: free_port() for name in (*SERVICE_NAMES, "gateway")}
    admin_port = free_port()
    shared = {"PARLEY_REDIS_URL": redis_url, "PARLEY_RATE_LIMITS_FILE": str(rate_limits)}
    async with running_microservices(
        directory,
        database_url,
        redis_url,
        service_env={
            name: {**shared, "PARLEY_METRICS_PORT": str(metrics_ports[name])} for name in SERVICE_NAMES
        },
        gateway_env={
            **shared,
            "PARLEY_METRICS_PORT": str(metrics_ports["gateway"]),
            "PARLEY_ENVOY_ADMIN_PORT": str(admin_port),
        },
    ) as running:
        await running.gateway.wait_for_http_status(
            f"{running.gateway_url}/healthz", timeout_s=STARTUP_TIMEOUT_S
        )
        yield Targets(
            gateway=running.gateway_url,
            envoy_admin=f"http://127.0.0.1:{admin_port}",
            metrics=tuple(f"http://127.0.0.1:{port}/metrics" for port in metrics_ports.values()),
            python_pids={
                **{f"parley serve {name}": process.pid for name, process in running.services.items()},
                "parley gateway (edge)": running.gateway.pid,
            },
            envoy_pid=_envoy_child(running.gateway.pid),
        )


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


@contextlib.asynccontextmanager
async def running_setup(
    arguments: argparse.Namespace, directory: Path, redis_url: str
) -> AsyncIterator[tuple[Targets, str]]:
    """The Parley under test, and a description of its setup."""
    rate_limits = scaled_rate_limits(RATE_LIMIT_SCALE, directory=directory)
    async with database_url(postgres=arguments.postgres or arguments.microservices) as (url, database):
        if arguments.microservices:
            assert url is not None
            async with running_microservices_setup(
                directory, redis_url=redis_url, rate_limits=rate_limits, database_url=url
            ) as targets:
                yield targets, f"microservices: parley serve x4 + parley gateway; {database}"
        else:
            async with running_embedded(
                directory, redis_url=redis_url, rate_limits=rate_limits, database_url=url
            ) as targets:
                yield targets, f"embedded: parley up (services process + edge process + Envoy); {database}"


async def run(arguments: argparse.Namespace) -> tuple[Report, list[str]]:
    load_at_start = [round(load, 2) for load in os.getloadavg()]
    redis_url = os.environ.get("PARLEY_BENCH_REDIS_URL") or DEFAULT_REDIS_URL
    await check_redis(redis_url)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run this through scripts/bench gateway, which installs it")
    report = Report(
        benchmark="gateway-microservices" if arguments.microservices else "gateway", baseline=BASELINE
    )
    failures: list[str] = []
    profile_dir = (
        RESULTS_DIR / f"{report.benchmark}-profiles-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    )
    with tempfile.TemporaryDirectory(prefix="parley-bench-gateway-") as temporary:
        directory = Path(temporary)
        script = directory / "bounded.lua"
        script.write_text(WRK_SCRIPT, encoding="utf-8")
        wrk = Wrk(script)
        async with (
            running_setup(arguments, directory, redis_url) as (targets, setup),
            httpx.AsyncClient(timeout=10.0) as client,
        ):
            await sign_in(client, targets.gateway, register=True)
            breakdowns: dict[str, object] = {}
            first_failures: dict[str, str] = {}
            for workload in WORKLOADS:
                measured = await _measure(workload, arguments, wrk, client, targets, profiler=None)
                report.measurements.append(measured.measurement)
                breakdowns[workload.name] = measured.breakdown
                if measured.warmup_failure:
                    first_failures[f"{workload.name} (warm-up)"] = measured.warmup_failure
                if measured.failure:
                    failures.append(workload.name)
                    first_failures[workload.name] = measured.failure
            if arguments.profile:
                # A run of its own after the measured ones: the sampler's CPU would skew their figures.
                profile_dir.mkdir(parents=True, exist_ok=True)
                profiler = Profiler(profile_dir, targets, arguments.seconds)
                read = next(workload for workload in WORKLOADS if workload.name == AUTHENTICATED_READ)
                await _measure(read, arguments, wrk, client, targets, profiler=profiler)
                report.notes["profile_of_authenticated_read"] = await profiler.finish()
            report.notes["where_the_time_goes"] = breakdowns
            if first_failures:
                report.notes["first_failure"] = first_failures
    report.notes.update(_context_notes(arguments, setup, redis_url, load_at_start))
    report.notes.update(_checks(report))
    if failures:
        report.notes["failed_workloads"] = failures
    return report, failures


@dataclass(frozen=True)
class Measured:
    measurement: Measurement
    breakdown: dict[str, object]
    # The first failed answer, when any request failed; "" otherwise.
    failure: str
    warmup_failure: str


async def _measure(
    workload: Workload,
    arguments: argparse.Namespace,
    wrk: Wrk,
    client: httpx.AsyncClient,
    targets: Targets,
    *,
    profiler: Profiler | None,
) -> Measured:
    """Check the path answers, warm it up, then the bounded run framed by two snapshots."""
    headers = {}
    if workload.authenticated:
        # Taken just before the workload: the access token lives 15 minutes.
        headers["Authorization"] = f"Bearer {await sign_in(client, targets.gateway, register=False)}"
    url = f"{targets.gateway}{workload.path}"
    _expect_ok(await client.get(url, headers=headers), workload.name)
    warmup_failure = ""
    if arguments.warmup_seconds:
        warmup = await wrk.run(
            url, seconds=arguments.warmup_seconds, requests=arguments.requests, headers=headers
        )
        warmup_failure = _first_failure(warmup) if warmup.errors else ""
    before = await take_snapshot(client, targets, ending_run=False)
    if profiler is not None:
        await profiler.start()
    if workload.open_loop:
        result = await run_open_loop(
            url, rate=arguments.open_rate, seconds=arguments.open_seconds, headers=headers
        )
        after = await take_snapshot(client, targets, ending_run=True)
        measurement = open_loop_measurement(workload.name, result)
        client_latency = result["latency_ms"]
        failure = (
            json.dumps({"failures": result["failures"], "non_2xx": result["non_2xx"]})
            if result["errors"]
            else ""
        )
        extra: dict[str, object] = {"open_loop": result}
    else:
        wrk_result = await wrk.run(
            url, seconds=arguments.seconds, requests=arguments.requests, headers=headers
        )
        after = await take_snapshot(client, targets, ending_run=True)
        measurement = wrk_result.measurement(workload.name)
        client_latency = {
            "mean": round(wrk_result.mean_us / 1000, 3),
            "p50": round(wrk_result.p50_us / 1000, 3),
            "p90": round(wrk_result.p90_us / 1000, 3),
            "p99": round(wrk_result.p99_us / 1000, 3),
            "max": round(wrk_result.max_us / 1000, 3),
        }
        failure = _first_failure(wrk_result) if wrk_result.errors else ""
        extra = {}
    breakdown = {
        "client_latency_ms": client_latency,
        **where_the_time_goes(workload, before, after, measurement),
        **extra,
    }
    return Measured(measurement, breakdown, failure, warmup_failure)


def _first_failure(result: WrkResult) -> str:
    if result.first_failure:
        return result.first_failure
    return (
        f"socket errors: connect {result.connect_errors}, read {result.read_errors}, "
        f"write {result.write_errors}, timeouts {result.timeouts}"
    )


def _context_notes(
    arguments: argparse.Namespace, setup: str, redis_url: str, load_at_start: list[float]
) -> dict[str, object]:
    return {
        "setup": (
            f"{setup}; on loopback; closed loops: wrk {CONNECTIONS} connections on {THREADS} threads; "
            f"open loop: benchmarks.openloop at {arguments.open_rate:g}/s; all on this machine's cores"
        ),
        "rate_limits": {
            "store": f"Redis {redis_url} (the RLS Lua script)",
            "rules": f"envoy/ratelimits.yaml with every rate and burst x{RATE_LIMIT_SCALE}",
        },
        "bounds": {
            "requests": arguments.requests,
            "seconds": arguments.seconds,
            "warmup_seconds": arguments.warmup_seconds,
            "open_loop": {"rate": arguments.open_rate, "seconds": arguments.open_seconds},
        },
        "load_average_at_start": load_at_start,
        "load_average_at_end": [round(load, 2) for load in os.getloadavg()],
        "cpus": os.cpu_count(),
        "seed_old_stack": {"per_second": SEED_PER_SECOND, "mean_ms": SEED_MEAN_MS},
    }


def _python_cpu_ms(report: Report, workload: str) -> float | None:
    breakdowns = report.notes.get("where_the_time_goes")
    if not isinstance(breakdowns, dict) or workload not in breakdowns:
        return None
    value: float = breakdowns[workload]["cpu_ms_per_request"][PYTHON_TOTAL]
    return value


def _checks(report: Report) -> dict[str, object]:
    by_name = {m.name: m for m in report.measurements}
    trivial, authenticated, open_loop = (
        by_name.get("trivial_rpc"),
        by_name.get(AUTHENTICATED_READ),
        by_name.get(OPEN_LOOP_READ),
    )
    if trivial is None or authenticated is None or open_loop is None:
        return {}
    versus_trivial = round(authenticated.per_second / trivial.per_second, 3) if trivial.per_second else 0.0
    python_cpu = _python_cpu_ms(report, AUTHENTICATED_READ) or 0.0
    open_p99 = goal_check(open_loop.p99_ms, OPEN_LOOP_P99_MAX_MS, OPEN_LOOP_P99_MOONSHOT_MS, at_most=True)
    open_p99["errors"] = open_loop.errors
    open_p99["met"] = bool(open_p99["met"]) and open_loop.errors == 0
    open_p99["moonshot_met"] = bool(open_p99["moonshot_met"]) and open_loop.errors == 0
    return {
        "auth_read_vs_trivial_throughput": versus_trivial,
        "checks": {
            "authenticated read / trivial RPC, req/s at 32 connections": goal_check(
                versus_trivial, AUTH_READ_VS_TRIVIAL_MIN, AUTH_READ_VS_TRIVIAL_MOONSHOT, at_most=False
            ),
            f"authenticated read at {open_loop.name} p99 ms, 0 errors": open_p99,
            "python cpu ms per authenticated read": goal_check(
                python_cpu,
                PYTHON_CPU_PER_AUTH_READ_MAX_MS,
                PYTHON_CPU_PER_AUTH_READ_MOONSHOT_MS,
                at_most=True,
            ),
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
        lines += check_lines(checks)
    breakdowns = report.notes.get("where_the_time_goes")
    if isinstance(breakdowns, dict):
        lines += _time_split_rows(breakdowns)
    profile = report.notes.get("profile_of_authenticated_read")
    if isinstance(profile, dict):
        for process, summary in profile.items():
            if isinstance(summary, dict) and "by_component" in summary:
                parts = ", ".join(f"{name} {share:.0%}" for name, share in summary["by_component"].items())
                lines.append(f"profile {process}: {parts}")
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
            f"{figures[4]:8.2f} {cpu[PYTHON_TOTAL]:7.3f} {cpu['envoy']:9.3f}"
        )
    return rows


# ------------------------------------------------------------------------------------- processes


def _envoy_child(pid: int) -> int:
    envoys = [child for child in children_of(pid) if "envoy" in command_of(child).split(" -c ")[0]]
    if len(envoys) != 1:
        raise RuntimeError(f"expected one Envoy child of {pid}, found {envoys}")
    return envoys[0]


def _edge_child(pid: int) -> dict[str, int]:
    """`parley up`'s edge process (`python -m runtime.cli edge`), by its name for the report."""
    found = [child for child in children_of(pid) if "runtime.cli edge" in command_of(child)]
    if len(found) != 1:
        raise RuntimeError(f"expected one edge child of {pid}, found {found}")
    return {"parley edge (RLS, ext_authz)": found[0]}


def main(argv: list[str] | None = None) -> int:
    arguments = _arguments(argv)
    report, failures = asyncio.run(run(arguments))
    path = report.write()
    print_report(report, path)
    _print_details(report, failures)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
