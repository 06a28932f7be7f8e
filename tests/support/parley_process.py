"""Run the real `parley` CLI as a child process for end-to-end tests, on free ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from parley.events.v1 import events_pb2
from services.common.db import Database
from tests.support.domain import outbox
from tests.support.gateway import free_port
from tests.support.polling import eventually, eventually_sync
from tests.support.rate_limits import generous_rate_limits

REPO_ROOT = Path(__file__).resolve().parents[2]
PARLEY = Path(sys.executable).parent / "parley"


@dataclass
class EmbeddedPorts:
    http: int = field(default_factory=free_port)
    grpc: int = field(default_factory=free_port)
    edge: int = field(default_factory=free_port)
    admin: int = field(default_factory=free_port)
    metrics: int = field(default_factory=free_port)
    edge_metrics: int = field(default_factory=free_port)

    def env(self) -> dict[str, str]:
        """The ports, and rate limits generous enough that no functional test meets one."""
        return {
            "PARLEY_RATE_LIMITS_FILE": str(generous_rate_limits()),
            "PARLEY_HTTP_PORT": str(self.http),
            "PARLEY_GRPC_PORT": str(self.grpc),
            "PARLEY_EDGE_PORT": str(self.edge),
            "PARLEY_ENVOY_ADMIN_PORT": str(self.admin),
            "PARLEY_METRICS_PORT": str(self.metrics),
            "PARLEY_EDGE_METRICS_PORT": str(self.edge_metrics),
        }


class ParleyProcess:
    """`parley <args>` in its own process group, with its output captured to a log file."""

    def __init__(self, args: list[str], *, env: Mapping[str, str], log_path: Path) -> None:
        self.args = args
        self._env = {**os.environ, **env}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(PARLEY), *self.args],
                env=self._env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_http_ok(self, url: str, *, timeout_s: float = 60.0) -> None:
        eventually_sync(
            lambda: httpx.get(url, timeout=1.0).status_code == 200,
            what=f"{url} answering 200",
            timeout_s=timeout_s,
            interval_s=0.2,
            retrying_on=(httpx.HTTPError,),
            alive=self.check_alive,
            details=self._output_tail,
        )

    def terminate(self, *, signum: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        """Send `signum` (SIGTERM, or SIGINT as Ctrl-C does) and wait; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            tail = self.output()[-4000:]
            raise AssertionError(f"parley did not stop within {timeout_s}s of the signal:\n{tail}") from None

    # Async variants, for tests whose event loop also runs servers or proxies the child talks to:
    # the sync helpers above would block that loop while they wait.

    @property
    def pid(self) -> int:
        assert self.process is not None, "start() first"
        return self.process.pid

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def check_alive(self) -> None:
        """Raise when the process has exited: a wait on it fails at once instead of at its deadline."""
        assert self.process is not None, "start() first"
        if self.process.poll() is not None:
            raise AssertionError(
                f"parley {' '.join(self.args)} exited with {self.process.returncode}:\n{self._output_tail()}"
            )

    def _output_tail(self) -> str:
        return f"parley {' '.join(self.args)} output:\n{self.output()[-4000:]}"

    async def wait_for_output(self, text: str, *, timeout_s: float = 20.0) -> None:
        """Wait until `text` appears in the process's output; fail early if the process exits."""

        def printed() -> bool:
            # Read before the liveness check, so output printed just before exiting still counts.
            if text in self.output():
                return True
            self.check_alive()
            return False

        await eventually(printed, what=f"{text!r} printed", timeout_s=timeout_s, details=self._output_tail)

    async def wait_for_http_status(
        self, url: str, expected_status: int = 200, *, timeout_s: float = 20.0
    ) -> httpx.Response:
        """Poll GET `url` until it answers `expected_status`; returns that response."""
        last_answer = "none"
        async with httpx.AsyncClient(timeout=2.0) as client:

            async def answered() -> httpx.Response | None:
                nonlocal last_answer
                response = await client.get(url)
                if response.status_code == expected_status:
                    return response
                last_answer = f"{response.status_code} {response.text[:500]}"
                return None

            return await eventually(
                answered,
                what=f"{url} answering {expected_status}",
                timeout_s=timeout_s,
                interval_s=0.1,
                retrying_on=(httpx.HTTPError,),
                alive=self.check_alive,
                details=lambda: f"last answer: {last_answer}\n{self._output_tail()}",
            )

    async def wait_for_exit(self, *, timeout_s: float = 20.0) -> int:
        """Wait for the process to exit on its own; returns the exit code."""
        assert self.process is not None
        process = self.process
        # A returncode of 0 is falsy, hence the wrapping tuple.
        (code,) = await eventually(
            lambda: None if process.poll() is None else (process.returncode,),
            what=f"parley {' '.join(self.args)} exited",
            timeout_s=timeout_s,
            details=self._output_tail,
        )
        return code

    async def stop(self, *, signum: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        """`terminate` without blocking the event loop: send `signum`, wait, return the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return await self.wait_for_exit(timeout_s=timeout_s)

    def kill(self) -> None:
        """SIGKILL if still running (cleanup after a failure); Envoy children die with it (pdeathsig)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextmanager
def parley_up_serving(
    data_dir: Path, *, log_path: Path, env: Mapping[str, str] | None = None
) -> Iterator[tuple[ParleyProcess, EmbeddedPorts]]:
    """`parley up` on free ports with `data_dir` (and `env`, e.g. another database), from its gateway
    answering /healthz until the block ends."""
    ports = EmbeddedPorts()
    process = ParleyProcess(
        ["up"], env={**ports.env(), "PARLEY_DATA_DIR": str(data_dir), **(env or {})}, log_path=log_path
    )
    process.start()
    try:
        process.wait_until_http_ok(f"http://127.0.0.1:{ports.http}/healthz")
        yield process, ports
    finally:
        process.terminate()


def children_of(pid: int) -> list[int]:
    """Direct child pids, read from /proc (Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces; the ppid follows the state field.
        after_name = stat.rsplit(")", 1)[1].split()
        if int(after_name[1]) == pid:
            found.append(int(entry.name))
    return found


def command_of(pid: int) -> str:
    """The command line of a process, its arguments joined by spaces ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent's wait() is missing.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def create_admin(email: str, password: str, *, env: Mapping[str, str]) -> None:
    """`parley admin create-admin` against the database `env` names (as an operator bootstraps one)."""
    created = subprocess.run(
        [str(PARLEY), "admin", "create-admin", "--email", email, "--display-name", "Root"],
        env={**os.environ, **env, "PARLEY_ADMIN_PASSWORD": password},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert created.returncode == 0, created.stdout + created.stderr


@dataclass
class Up:
    """`parley up` on one database, with its gateway client and its outbox."""

    process: ParleyProcess
    client: httpx.Client
    data_dir: Path
    database_url: str

    async def events(self, event_type: str, subject: str) -> list[events_pb2.Event]:
        database = Database(self.database_url)
        try:
            return [item.event for item in await outbox(database, event_type) if item.subject == subject]
        finally:
            await database.dispose()
