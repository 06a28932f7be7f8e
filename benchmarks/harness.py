"""What every benchmark shares: bounded closed-loop load, latency percentiles, JSON results.

Loads are closed loops of `concurrency` workers, each bounded by a request count AND a time limit,
and only ever aimed at loopback. Results carry ratios to a baseline measured in the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import grpc

from tests.support.databases import fresh_postgres_database

RESULTS_DIR = Path("bench-results")
DEFAULT_POSTGRES_URL: Final = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


@dataclass(frozen=True)
class Measurement:
    """One workload's throughput and latency."""

    name: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    per_second: float
    p50_ms: float
    p99_ms: float
    mean_ms: float


@dataclass
class Report:
    """A benchmark run: its measurements, each one's ratio to the baseline, and the context."""

    benchmark: str
    baseline: str
    measurements: list[Measurement] = field(default_factory=list)
    notes: dict[str, object] = field(default_factory=dict)
    # Measurement name -> the baseline it is compared with, when not `baseline` (e.g. one baseline
    # per concurrency or per database in a run that measures several).
    baseline_of: dict[str, str] = field(default_factory=dict)

    def ratios(self) -> dict[str, float]:
        by_name = {m.name: m for m in self.measurements}
        ratios: dict[str, float] = {}
        for m in self.measurements:
            base = by_name[self.baseline_of.get(m.name, self.baseline)].per_second
            ratios[m.name] = round(m.per_second / base, 4) if base else 0.0
        return ratios

    def write(self) -> Path:
        RESULTS_DIR.mkdir(exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = RESULTS_DIR / f"{self.benchmark}-{stamp}.json"
        document = {
            "benchmark": self.benchmark,
            "time": datetime.now(UTC).isoformat(),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "baseline": self.baseline,
            **({"baseline_of": self.baseline_of} if self.baseline_of else {}),
            "ratios_to_baseline": self.ratios(),
            "measurements": [asdict(m) for m in self.measurements],
            "notes": self.notes,
        }
        path.write_text(json.dumps(document, indent=2) + "\n")
        return path


@dataclass
class Workload:
    """A named operation and the first failure it hit (a benchmark counts errors; this says which)."""

    name: str
    call: Callable[[int], Awaitable[object]]
    first_error: str | None = field(default=None, init=False)

    async def __call__(self, index: int) -> object:
        try:
            return await self.call(index)
        except Exception as error:
            if self.first_error is None:
                self.first_error = describe_error(error)
            raise


def describe_error(error: Exception) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"


@contextlib.asynccontextmanager
async def scratch_database(*, sqlite: bool) -> AsyncIterator[tuple[str, str]]:
    """(URL, dialect) of a brand-new database for one run: a SQLite file in a temporary folder, or a
    PostgreSQL database created on the server of PARLEY_TEST_POSTGRES_URL and dropped after."""
    if sqlite:
        with tempfile.TemporaryDirectory(prefix="parley-bench-") as directory:
            yield f"sqlite+aiosqlite:///{Path(directory) / 'bench.db'}", "sqlite"
        return
    base = os.environ.get("PARLEY_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL
    async with fresh_postgres_database(base) as url:
        yield url, "postgresql"


async def closed_loop(
    name: str,
    operation: Callable[[int], Awaitable[object]],
    *,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    warmup: int = 0,
) -> Measurement:
    """Run `operation(i)` from `concurrency` workers until `max_requests` or `max_seconds`."""
    for i in range(warmup):
        await operation(-1 - i)
    latencies: list[float] = []
    errors = 0
    issued = 0
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal errors, issued
        while issued < max_requests and time.perf_counter() < deadline:
            index = issued
            issued += 1
            started = time.perf_counter()
            try:
                await operation(index)
            except Exception:  # noqa: BLE001 - a benchmark counts failures instead of stopping.
                errors += 1
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    ordered = sorted(latencies) or [0.0]
    return Measurement(
        name=name,
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        seconds=round(elapsed, 3),
        per_second=round(len(latencies) / elapsed, 1) if elapsed else 0.0,
        p50_ms=round(_percentile(ordered, 0.50) * 1000, 2),
        p99_ms=round(_percentile(ordered, 0.99) * 1000, 2),
        mean_ms=round(statistics.fmean(ordered) * 1000, 2),
    )


def _percentile(ordered: list[float], fraction: float) -> float:
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def goal_check(value: float, goal: float, moonshot: float, *, at_most: bool) -> dict[str, object]:
    """A figure against its goal and moonshot (`at_most`: lower is better)."""

    def met(bound: float) -> bool:
        return value <= bound if at_most else value >= bound

    return {
        "value": value,
        "goal": goal,
        "met": met(goal),
        "moonshot": moonshot,
        "moonshot_met": met(moonshot),
    }


def check_lines(checks: Mapping[str, Mapping[str, object]]) -> list[str]:
    """One line per `goal_check`, as the benchmarks print them."""
    return [
        f"check {name}: {c['value']} (goal {c['goal']}: {'met' if c['met'] else 'NOT met'}; "
        f"moonshot {c['moonshot']}: {'met' if c['moonshot_met'] else 'not met'})"
        for name, c in checks.items()
    ]


def print_report(report: Report, path: Path) -> None:
    rows = [f"{'workload':34} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'x baseline':>10}"]
    ratios = report.ratios()
    for m in report.measurements:
        figures = f"{m.per_second:9.1f} {m.p50_ms:8.2f} {m.p99_ms:8.2f} {m.errors:6d}"
        rows.append(f"{m.name:34} {figures} {ratios[m.name]:10.3f}")
    print("\n".join(rows))  # noqa: T201 - a benchmark's report is for the terminal.
    print(f"results: {path}")  # noqa: T201
