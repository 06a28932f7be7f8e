"""Dependency-aware gRPC health: a service is SERVING only while every dependency it needs answers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from services.common.metrics import HealthMetrics

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class DependencyProbe:
    """A named check that raises when the dependency cannot be used."""

    name: str
    check: Callable[[], Awaitable[None]]
    timeout_s: float = 2.0


class HealthMonitor:
    """Probes the dependencies on an interval and publishes the verdict per service name.

    The overall server status ("") follows the same verdict, so probes that name no service
    (kubelet's gRPC probe, Envoy's health check) see the truth too.
    """

    def __init__(
        self,
        servicer: HealthServicer,
        service_names: Sequence[str],
        probes: Sequence[DependencyProbe],
        *,
        interval_s: float,
        metrics: HealthMetrics,
    ) -> None:
        self._servicer = servicer
        self._service_names = ("", *service_names)
        self._probes = tuple(probes)
        self._interval_s = interval_s
        self._metrics = metrics
        self._last_verdict: bool | None = None

    async def probe_once(self) -> bool:
        results = await asyncio.gather(*(self._run_probe(probe) for probe in self._probes))
        healthy = all(results)
        if healthy != self._last_verdict:
            logger.info("health is now %s", "SERVING" if healthy else "NOT_SERVING")
            self._last_verdict = healthy
        for name in self._service_names:
            await self._servicer.set(name, SERVING if healthy else NOT_SERVING)
        return healthy

    async def _run_probe(self, probe: DependencyProbe) -> bool:
        try:
            await asyncio.wait_for(probe.check(), timeout=probe.timeout_s)
        except Exception as error:  # noqa: BLE001 - any failure of a probe means "not usable"
            if self._last_verdict is not False:
                logger.warning("dependency %s is unavailable: %s", probe.name, error or type(error).__name__)
            self._metrics.dependency_up.labels(probe.name).set(0)
            return False
        self._metrics.dependency_up.labels(probe.name).set(1)
        return True

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.probe_once()
            try:
                await asyncio.wait_for(stop.wait(), timeout=self._interval_s)
            except TimeoutError:
                continue

    async def shutting_down(self) -> None:
        """Tell watchers the server is going away, so balancers drain it before it stops."""
        await self._servicer.enter_graceful_shutdown()
