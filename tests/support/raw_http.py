"""HTTP/1.1 over a plain socket, for requests a client library would refuse or normalize: unknown
methods (QUERY, PROPFIND), a malformed request line or header, HEAD with its (absent) body.

The helper writes exactly the bytes it is given and reads one response: it parses the status line
and headers itself, and reads the body by Content-Length, chunked framing or until the server
closes. A response to HEAD has no body whatever its headers say (RFC 9110 9.3.2).
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

RECEIVE_CHUNK_BYTES = 65536


@dataclass(frozen=True)
class RawResponse:
    """One parsed HTTP/1.1 response; header names are lower-case, repeated headers keep every value."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of `name`, or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for key, value in self.headers if key == wanted]

    def json(self) -> Any:
        return json.loads(self.body)


def request_bytes(
    method: str, path: str, *, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    """A well-formed HTTP/1.1 request with Host, Connection: close and Content-Length when there is a body."""
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway.test", "Connection: close"]
    lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def send_raw(
    port: int, raw: bytes, *, head: bool = False, host: str = "127.0.0.1", timeout_s: float = 10.0
) -> RawResponse:
    """Send `raw` as is to host:port and read one response (`head`: it answers a HEAD request)."""
    with socket.create_connection((host, port), timeout=timeout_s) as connection:
        connection.sendall(raw)
        return _read_response(connection, head=head)


def send(
    port: int,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout_s: float = 10.0,
) -> RawResponse:
    """One well-formed request (`request_bytes`) with any method, answered over a fresh connection."""
    raw = request_bytes(method, path, headers=headers, body=body)
    return send_raw(port, raw, head=method == "HEAD", timeout_s=timeout_s)


def _read_response(connection: socket.socket, *, head: bool) -> RawResponse:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = connection.recv(RECEIVE_CHUNK_BYTES)
        if not chunk:
            raise ConnectionError(f"the server closed the connection before a full response: {buffer!r}")
        buffer += chunk
    head_block, rest = buffer.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head_block.decode("latin-1").split("\r\n")
    version, status, *_ = status_line.split(" ", 2)
    if not version.startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1 status line: {status_line!r}")
    headers = tuple(
        (name.strip().lower(), value.strip()) for name, value in (line.split(":", 1) for line in header_lines)
    )
    response = RawResponse(status=int(status), headers=headers, body=b"")
    if head or response.status in (204, 304) or 100 <= response.status < 200:
        return response
    if (response.header("transfer-encoding") or "").lower() == "chunked":
        body = _read_chunked(connection, rest)
    elif (length := response.header("content-length")) is not None:
        body = _read_exactly(connection, rest, int(length))
    else:
        body = _read_until_closed(connection, rest)
    return RawResponse(status=response.status, headers=headers, body=body)


def _read_exactly(connection: socket.socket, buffer: bytes, length: int) -> bytes:
    while len(buffer) < length:
        chunk = connection.recv(RECEIVE_CHUNK_BYTES)
        if not chunk:
            raise ConnectionError(f"the body ended after {len(buffer)} of {length} bytes")
        buffer += chunk
    return buffer[:length]


def _read_until_closed(connection: socket.socket, buffer: bytes) -> bytes:
    while chunk := connection.recv(RECEIVE_CHUNK_BYTES):
        buffer += chunk
    return buffer


def _read_chunked(connection: socket.socket, buffer: bytes) -> bytes:
    body = b""
    while True:
        while b"\r\n" not in buffer:
            buffer += _receive(connection)
        size_line, buffer = buffer.split(b"\r\n", 1)
        size = int(size_line.split(b";", 1)[0], 16)
        while len(buffer) < size + 2:
            buffer += _receive(connection)
        if size == 0:
            return body
        body += buffer[:size]
        buffer = buffer[size + 2 :]


def _receive(connection: socket.socket) -> bytes:
    chunk = connection.recv(RECEIVE_CHUNK_BYTES)
    if not chunk:
        raise ConnectionError("the server closed the connection inside a chunked body")
    return chunk
