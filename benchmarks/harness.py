"""What every benchmark shares: bounded closed-loop load, latency percentiles, JSON results.

Loads are closed loops of `concurrency` workers, each bounded by a request count AND a time limit,
and only ever aimed at loopback. Results carry ratios to a baseline measured in the same run.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

RESULTS_DIR = Path("bench-results")


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

    def ratios(self) -> dict[str, float]:
        by_name = {m.name: m for m in self.measurements}
        base = by_name[self.baseline].per_second
        return {m.name: round(m.per_second / base, 4) if base else 0.0 for m in self.measurements}

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
            "ratios_to_baseline": self.ratios(),
            "measurements": [asdict(m) for m in self.measurements],
            "notes": self.notes,
        }
        path.write_text(json.dumps(document, indent=2) + "\n")
        return path


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


def print_report(report: Report, path: Path) -> None:
    rows = [f"{'workload':34} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'x baseline':>10}"]
    ratios = report.ratios()
    for m in report.measurements:
        figures = f"{m.per_second:9.1f} {m.p50_ms:8.2f} {m.p99_ms:8.2f} {m.errors:6d}"
        rows.append(f"{m.name:34} {figures} {ratios[m.name]:10.3f}")
    print("\n".join(rows))  # noqa: T201 - a benchmark's report is for the terminal.
    print(f"results: {path}")  # noqa: T201
