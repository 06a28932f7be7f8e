"""`parley up`'s edge server, run as a child process (`parley edge`) instead of in the services' process.

Every request through the gateway asks the edge for a rate-limit decision before it reaches a
service. On the services' event loop those decisions queued behind the services' own work, so a busy
service made every request wait twice; in a process of its own the edge answers from its own core.
The child dies with `parley up` (see `gateway.envoy_process.dies_with_parent`), writes its log lines
to the same output, and is stopped before the services on the way down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.envoy_process import dies_with_parent, terminate
from services.common.pki import EDGE, TlsFiles
from services.common.service_tls import secure_channel_for

logger = logging.getLogger(__name__)


class EdgeStartError(RuntimeError):
    """The edge process exited, or never said it was serving."""


class EdgeChild:
    """One `parley edge` child, serving on 127.0.0.1:`port`, configured by `env` (PARLEY_*); its health
    is asked with the certificate `tls` (the parent's own)."""

    def __init__(
        self,
        *,
        port: int,
        env: Mapping[str, str],
        tls: TlsFiles,
        startup_timeout_s: float = 30.0,
        stop_grace_s: float = 5.0,
    ) -> None:
        self.port = port
        self._env = dict(env)
        self._tls = tls
        self._startup_timeout_s = startup_timeout_s
        self._stop_grace_s = stop_grace_s
        self._process: asyncio.subprocess.Process | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def start(self) -> None:
        """Start the child and return once its health service says SERVING."""
        if self._process is not None:
            raise RuntimeError("this EdgeChild was already started")
        command = [sys.executable, "-m", "runtime.cli", "edge", "--port", str(self.port)]
        self._process = await asyncio.create_subprocess_exec(
            *dies_with_parent(command),
            env={**os.environ, **self._env},
            stdin=asyncio.subprocess.DEVNULL,
        )
        try:
            await self._wait_until_serving()
        except BaseException:
            await self.stop()
            raise
        logger.info("edge process ready", extra={"pid": self._process.pid, "port": self.port})

    async def _wait_until_serving(self) -> None:
        process = self._process
        assert process is not None
        exited = asyncio.ensure_future(process.wait())
        try:
            async with asyncio.timeout(self._startup_timeout_s):
                async with secure_channel_for(self.target, self._tls, server=EDGE) as channel:
                    health = health_pb2_grpc.HealthStub(channel)
                    while not exited.done():
                        if await _serving(health):
                            return
                        # Ask again shortly, or stop at once if the child exits meanwhile.
                        await asyncio.wait({exited}, timeout=0.05)
        except TimeoutError:
            raise EdgeStartError(
                f"the edge process did not serve on {self.target} within {self._startup_timeout_s:g}s"
            ) from None
        finally:
            exited.cancel()
        raise EdgeStartError(f"the edge process exited with status {process.returncode} while starting")

    async def wait(self) -> int:
        """Wait for the child to exit (for whatever reason) and return its exit code."""
        if self._process is None:
            raise RuntimeError("this EdgeChild was never started")
        return await self._process.wait()

    async def stop(self) -> None:
        """SIGTERM (the child drains its calls), then SIGKILL after the grace; safe to repeat."""
        if self._process is not None:
            await terminate(self._process, grace_s=self._stop_grace_s, name="the edge process")


async def _serving(health: health_pb2_grpc.HealthStub) -> bool:
    try:
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
