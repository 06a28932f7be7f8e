"""The one `parley` entry point: up, serve, gateway, migrate, admin."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from services.common.settings import (
    DEFAULT_SERVICE_METRICS_PORTS,
    DEFAULT_SERVICE_PORTS,
    SERVICE_NAMES,
    ServiceName,
    SettingsError,
    load_settings,
)

EXIT_BAD_SETTINGS = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description="Parley: AI-chat SaaS backend.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run everything in one process with SQLite and an Envoy gateway")
    up.add_argument("--data-dir", type=Path, help="where to keep data (default: PARLEY_DATA_DIR or ./var)")
    up.add_argument("--http-port", type=int, help="gateway port (default 8080)")
    up.add_argument("--grpc-port", type=int, help="gRPC port for every service (default 50051)")

    serve = commands.add_parser("serve", help="run one service alone (microservices mode)")
    serve.add_argument("service", choices=SERVICE_NAMES)
    serve.add_argument("--port", type=int, help="gRPC port (default: PARLEY_GRPC_PORT or the service's own)")

    gateway = commands.add_parser("gateway", help="render the Envoy config for a topology and run Envoy")
    gateway.add_argument("--topology", choices=("local", "k8s", "embedded"), default="local")
    gateway.add_argument("--render", type=Path, metavar="PATH", help="only write the config to PATH and exit")
    gateway.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="SERVICE=HOST:PORT",
        help="override one upstream address (repeatable)",
    )

    migrate = commands.add_parser("migrate", help="apply database migrations (Alembic) and exit")
    migrate.add_argument("--database-url", help="default: PARLEY_DATABASE_URL or SQLite under the data dir")

    admin = commands.add_parser("admin", help="operator tasks run against the database directly")
    actions = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    create_admin = actions.add_parser(
        "create-admin",
        help="create an admin account (verified), or make an existing account an enabled admin",
        description=(
            "The password comes from --password-file, else $PARLEY_ADMIN_PASSWORD, else a prompt when "
            "run in a terminal. There is no --password flag: it would end up in the shell history."
        ),
    )
    create_admin.add_argument("--email", required=True)
    create_admin.add_argument("--display-name", required=True)
    create_admin.add_argument(
        "--password-file", type=Path, metavar="PATH", help="read the password from PATH (- for stdin)"
    )
    rotate = actions.add_parser(
        "rotate-signing-key",
        help="make a new token-signing key active; the old one stays in the JWKS until its tokens expire",
        description=(
            "Needs the key-encryption key the auth service uses: PARLEY_AUTH_KEY_ENCRYPTION_KEY[_FILE], "
            "or, without PARLEY_DATABASE_URL, the one embedded mode keeps in the data dir."
        ),
    )
    for action in (create_admin, rotate):
        action.add_argument("--data-dir", type=Path, help="default: PARLEY_DATA_DIR or ./var")
        action.add_argument("--database-url", help="default: PARLEY_DATABASE_URL or SQLite in the data dir")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Parley forks only to exec Envoy, never to run Python that uses gRPC; grpc's fork handlers would
    # just log "skipping fork() handlers" noise on every child start.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    arguments = _parser().parse_args(argv)
    try:
        return _dispatch(arguments)
    except SettingsError as error:
        sys.stderr.write(f"{error}\n")
        return EXIT_BAD_SETTINGS
    except KeyboardInterrupt:
        return 130


def _dispatch(arguments: argparse.Namespace) -> int:
    if arguments.command == "up":
        settings = load_settings(
            **_given(
                data_dir=arguments.data_dir, http_port=arguments.http_port, grpc_port=arguments.grpc_port
            )
        )
        from services.runtime.embedded import run_embedded

        return _run(run_embedded(settings))
    if arguments.command == "serve":
        return _serve(arguments.service, arguments.port)
    if arguments.command == "gateway":
        return _gateway(arguments.topology, arguments.render, arguments.upstream)
    if arguments.command == "admin":
        return _admin(arguments)
    settings = load_settings(**_given(database_url=arguments.database_url))
    from services.common.migrate import upgrade

    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    sys.stdout.write(f"migrated {_redacted(settings.resolved_database_url)}\n")
    return 0


def _serve(service: ServiceName, port: int | None) -> int:
    settings = load_settings()
    overrides: dict[str, object] = {}
    if port is not None:
        overrides["grpc_port"] = port
    elif "grpc_port" not in settings.model_fields_set:
        overrides["grpc_port"] = DEFAULT_SERVICE_PORTS[service]
    if "metrics_port" not in settings.model_fields_set:
        overrides["metrics_port"] = DEFAULT_SERVICE_METRICS_PORTS[service]
    if service != "auth" and "auth_target" not in settings.model_fields_set:
        # Where `parley serve auth` listens by default; its JWKS verifies this service's callers.
        overrides["auth_target"] = f"127.0.0.1:{DEFAULT_SERVICE_PORTS['auth']}"
    settings = load_settings(**overrides) if overrides else settings
    from services.runtime.standalone import serve_service

    return _run(serve_service(service, settings))


def _gateway(topology_name: str, render_to: Path | None, upstream_overrides: list[str]) -> int:
    settings = load_settings()
    from services.runtime.topologies import topology_from_settings

    topology = topology_from_settings(topology_name, settings, upstream_overrides)
    if render_to is not None:
        from gateway.render import write_envoy_config

        write_envoy_config(topology, render_to)
        sys.stdout.write(f"wrote {render_to}\n")
        return 0
    from services.runtime.standalone import run_gateway

    return _run(run_gateway(topology, settings))


def _admin(arguments: argparse.Namespace) -> int:
    settings = load_settings(**_given(data_dir=arguments.data_dir, database_url=arguments.database_url))
    from services.runtime.admin_commands import (
        AdminCommandError,
        Terminal,
        create_admin,
        read_admin_password,
        rotate_signing_key,
    )

    terminal = Terminal(stdin=sys.stdin, stdout=sys.stdout, environ=os.environ)
    try:
        if arguments.admin_command == "create-admin":
            password = read_admin_password(arguments.password_file, terminal)
            return create_admin(
                settings,
                email=arguments.email,
                display_name=arguments.display_name,
                password=password,
                terminal=terminal,
            )
        return rotate_signing_key(settings, terminal=terminal)
    except AdminCommandError as error:
        sys.stderr.write(f"{error.message}\n")
        return error.exit_code


def _given(**values: object) -> dict[str, object]:
    """Only the flags the user actually passed, so env and defaults fill the rest."""
    return {key: value for key, value in values.items() if value is not None}


def _redacted(url: str) -> str:
    scheme, _, rest = url.partition("://")
    _, at, host = rest.rpartition("@")
    return f"{scheme}://{'***@' if at else ''}{host}"


def _run(coroutine: Coroutine[Any, Any, None]) -> int:
    import uvloop

    uvloop.run(coroutine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
