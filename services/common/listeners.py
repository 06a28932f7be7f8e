"""The ports a Parley process listens on, and the one error each gives when its port is taken.

A port in use is a setting to change, not a crash: `parley` prints one line that names the address,
what listens there and the flag or variable that moves it, and exits 2 like any bad setting.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
from typing import Final

from services.common.settings import SettingsError

# Each listener's setting (a `Settings` field, PARLEY_<FIELD>) and what it is.
LISTENERS: Final[dict[str, str]] = {
    "grpc_port": "the gRPC port",
    "http_port": "the gateway's HTTP port",
    "https_port": "the gateway's HTTPS port",
    "envoy_admin_port": "Envoy's admin port",
    "edge_port": "the edge server's gRPC port",
    "metrics_port": "the Prometheus /metrics port",
    "edge_metrics_port": "the edge process's Prometheus /metrics port",
}

# The command-line flags that set a listener's port, by command.
FLAGS: Final[dict[tuple[str, str], str]] = {
    ("up", "grpc_port"): "--grpc-port",
    ("up", "http_port"): "--http-port",
    ("serve", "grpc_port"): "--port",
    ("edge", "edge_port"): "--port",
}


class PortInUseError(SettingsError):
    """Another process listens on the address one of ours needs."""

    def __init__(self, setting: str, host: str, port: int) -> None:
        self.setting = setting
        self.host = host
        self.port = port
        super().__init__(self.describe(None))

    def describe(self, command: str | None) -> str:
        """One line for the person at the terminal; `command` (e.g. "up") adds its flag, if any."""
        variable = f"PARLEY_{self.setting.upper()}"
        flag = FLAGS.get((command or "", self.setting))
        moved_by = f"{flag} or {variable}" if flag else variable
        what = LISTENERS.get(self.setting, self.setting)
        return (
            f"parley: cannot listen on {_address(self.host, self.port)} ({what}): another process is "
            f"using it. Choose another port with {moved_by}, or stop that process."
        )


def is_address_in_use(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno == errno.EADDRINUSE


def ensure_free(setting: str, host: str, port: int) -> None:
    """Raise `PortInUseError` if something listens on host:port (port 0 is always free).

    For listeners another program opens (Envoy) or that report a failed bind without a reason (gRPC):
    binding a probe socket, as a server would, tells a taken port from any other failure.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if _is_ipv6(host) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as error:
            if is_address_in_use(error):
                raise PortInUseError(setting, host, port) from None
            # Any other failure (an address this host does not have) is the listener's own to report.


def _is_ipv6(host: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]")).version == 6
    return False


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if _is_ipv6(host) else f"{host}:{port}"
