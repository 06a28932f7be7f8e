"""The one `parley` entry point: up, serve, worker, gateway, migrate, admin, events, pki, grpcurl."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

# Before anything imports grpc, whose core reads it once: Parley forks only to exec a child (Envoy,
# the edge), never to run Python that uses gRPC, so grpc's fork handlers would only log "skipping
# fork() handlers" to stderr when a child starts while a call is in flight.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from services.common.data_dir import prepare_data_dir, restrict_new_files_to_owner
from services.common.listeners import PortInUseError
from services.common.settings import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_SERVICE_METRICS_PORTS,
    DEFAULT_SERVICE_PORTS,
    SERVICE_NAMES,
    WORKER_NAMES,
    ServiceName,
    SettingsError,
    WorkerName,
    load_settings,
)

EXIT_BAD_SETTINGS = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description="Parley: AI-chat SaaS backend.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run everything in one process with SQLite and an Envoy gateway")
    up.add_argument("--data-dir", type=Path, help="where to keep data (default: PARLEY_DATA_DIR or ./var)")
    up.add_argument("--http-port", type=int, help=f"gateway port (default {DEFAULT_HTTP_PORT})")
    up.add_argument(
        "--grpc-port", type=int, help=f"gRPC port for every service (default {DEFAULT_GRPC_PORT})"
    )

    serve = commands.add_parser("serve", help="run one service alone (microservices mode)")
    serve.add_argument("service", choices=SERVICE_NAMES)
    serve.add_argument("--port", type=int, help="gRPC port (default: PARLEY_GRPC_PORT or the service's own)")

    worker = commands.add_parser("worker", help="run one event-pipeline worker (microservices mode)")
    worker.add_argument(
        "worker", choices=WORKER_NAMES, help="relay: outbox to Redis Streams; email: sends the mails"
    )

    edge = commands.add_parser(
        "edge",
        help="run the gateway's edge server alone: rate limits, ext_authz, reflection for an Envoy elsewhere",
    )
    edge.add_argument("--port", type=int, help="gRPC port (default: PARLEY_EDGE_PORT or 50052)")

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
    _add_events_commands(commands)
    _add_pki_commands(commands)
    return parser


def _add_pki_commands(commands: Any) -> None:
    """`parley pki init` and `parley grpcurl` (runtime.pki_commands runs them)."""
    pki = commands.add_parser("pki", help="the certificates every process proves its workload with (mTLS)")
    actions = pki.add_subparsers(dest="pki_command", required=True, metavar="ACTION")
    init = actions.add_parser(
        "init",
        help="create or renew a CA and the workloads' certificates (microservices mode, tests)",
        description=(
            "Creates what is missing, renews what expires within 30 days (or names other workloads, or "
            "was signed by another CA), keeps the rest. Each certificate is NAME.pem and NAME-key.pem; "
            "a process finds its own through PARLEY_SERVICE_CA_FILE / _CERT_FILE / _KEY_FILE, by "
            "default <data dir>/pki/<its workload>.pem. `parley up` keeps its own in its data dir."
        ),
    )
    init.add_argument("--dir", type=Path, help="where to keep them (default: <data dir>/pki)")
    init.add_argument("--data-dir", type=Path, help="default: PARLEY_DATA_DIR or ./var")
    init.add_argument(
        "--workloads",
        nargs="+",
        metavar="SPEC",
        help=(
            "certificates to keep: NAME (for workload NAME) or NAME=W1,W2 (one certificate naming "
            "several); default: auth chat billing analytics gateway=gateway,edge edge operator"
        ),
    )
    grpcurl = commands.add_parser(
        "grpcurl",
        help="grpcurl with the operator's certificate, for a service port",
        description=(
            "Runs grpcurl with -cacert/-cert/-key of the operator's certificate (PARLEY_SERVICE_*_FILE, "
            "else <data dir>/pki/operator.pem) and -servername of the workload it must reach: --server, "
            "else the area of the first parley.<area>.vN symbol given, else auth. Everything after the "
            "options goes to grpcurl, e.g. `parley grpcurl 127.0.0.1:50051 list`."
        ),
    )
    grpcurl.add_argument("--data-dir", type=Path, help="default: PARLEY_DATA_DIR or ./var")
    grpcurl.add_argument(
        "--server", metavar="WORKLOAD", help="the workload listening there, e.g. chat or edge"
    )
    grpcurl.add_argument("arguments", nargs=argparse.REMAINDER, help="grpcurl's own arguments")


GRPCURL_OPTIONS = ("--data-dir", "--server")


def _grpcurl_arguments(argv: Sequence[str]) -> argparse.Namespace:
    """`parley grpcurl`'s own options come first; everything from the first other argument on is
    grpcurl's, flags included (argparse would take a leading `-d` for an option of ours)."""
    options: dict[str, str] = {}
    index = 1
    while index < len(argv):
        name, equals, value = argv[index].partition("=")
        if name not in GRPCURL_OPTIONS:
            break
        if not equals:
            index += 1
            if index == len(argv):
                _parser().parse_args(argv)  # reports the missing value and exits 2
            value = argv[index]
        options[name] = value
        index += 1
    data_dir = options.get("--data-dir")
    return argparse.Namespace(
        command="grpcurl",
        data_dir=Path(data_dir) if data_dir is not None else None,
        server=options.get("--server"),
        arguments=list(argv[index:]),
    )


def _add_events_commands(commands: Any) -> None:
    """`parley events tail | dlq list | dlq replay` (runtime.event_commands runs them)."""
    events = commands.add_parser(
        "events", help="inspect the event streams (Redis) and the consumers' dead letters"
    )
    actions = events.add_subparsers(dest="events_command", required=True, metavar="ACTION")
    tail = actions.add_parser(
        "tail",
        help="print the newest events of the streams",
        description=(
            "One line per entry: stream, entry id, time, type, event id, subject, trace id. "
            "EmailRequested params are never printed (they may hold single-use tokens)."
        ),
    )
    tail.add_argument("--source", help="one event source, e.g. auth (default: every parley:events:* stream)")
    tail.add_argument("--count", type=_at_least_one, default=20, help="how many entries (default 20)")
    tail.add_argument("--follow", action="store_true", help="then keep printing new entries until Ctrl-C")
    tail.add_argument("--json", action="store_true", help="print each event as one line of JSON")
    dlq = actions.add_parser(
        "dlq",
        help="a consumer group's dead letters",
        description=(
            "In Redis (PARLEY_REDIS_URL, microservices mode), or in the embedded database of "
            "`parley up` when --data-dir or --database-url is given or PARLEY_REDIS_URL is not set."
        ),
    )
    dlq_actions = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    listing = dlq_actions.add_parser("list", help="print a consumer's dead letters, oldest first")
    listing.add_argument("--json", action="store_true", help="one JSON object per dead letter")
    replay = dlq_actions.add_parser(
        "replay",
        help="put dead letters back on the stream they came from (embedded: in the outbox)",
        description=(
            "The event goes back on the stream it came from as a new entry meant for the consumer's "
            "group only; the other groups on that stream acknowledge it without handling it. "
            "Embedded, it goes back in the outbox, and `parley up` (running, or the next one) "
            "delivers it again; consumers that processed it skip it."
        ),
    )
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("dead_letter_id", nargs="?", help="a dead letter's id, as `dlq list` shows it")
    which.add_argument("--all", action="store_true", help="every dead letter of the consumer")
    for action in (listing, replay):
        action.add_argument("--consumer", default="email", help="the consumer group (default: email)")
        action.add_argument(
            "--data-dir",
            type=Path,
            help="embedded: `parley up`'s data dir (default: PARLEY_DATA_DIR or ./var)",
        )
        action.add_argument(
            "--database-url", help="embedded: default PARLEY_DATABASE_URL or SQLite in the data dir"
        )


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    # Before anything can write a file: whatever any command or child creates is its owner's alone
    # (the data dir holds the database and mails with live reset links; services/common/data_dir.py).
    restrict_new_files_to_owner()
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["grpcurl"] and not {"-h", "--help"} & set(given[1:2]):
        arguments = _grpcurl_arguments(given)
    else:
        arguments = _parser().parse_args(given)
    try:
        return _dispatch(arguments)
    except PortInUseError as error:
        sys.stderr.write(f"{error.describe(arguments.command)}\n")
        return EXIT_BAD_SETTINGS
    except SettingsError as error:
        sys.stderr.write(f"{error}\n")
        return EXIT_BAD_SETTINGS
    except KeyboardInterrupt:
        return 130


def _dispatch(arguments: argparse.Namespace) -> int:  # noqa: PLR0911 - one return per subcommand
    if arguments.command == "up":
        settings = load_settings(
            **_given(
                data_dir=arguments.data_dir, http_port=arguments.http_port, grpc_port=arguments.grpc_port
            )
        )
        from runtime.embedded import run_embedded

        return _run(run_embedded(settings))
    if arguments.command == "serve":
        return _serve(arguments.service, arguments.port)
    if arguments.command == "worker":
        return _worker(arguments.worker)
    if arguments.command == "gateway":
        return _gateway(arguments.topology, arguments.render, arguments.upstream)
    if arguments.command == "edge":
        settings = load_settings(**_given(edge_port=arguments.port))
        from runtime.standalone import run_edge

        return _run(run_edge(settings))
    if arguments.command == "admin":
        return _admin(arguments)
    if arguments.command == "events":
        return _events(arguments)
    if arguments.command in ("pki", "grpcurl"):
        return _pki(arguments)
    settings = load_settings(**_given(database_url=arguments.database_url))
    from services.common.migrate import upgrade

    if settings.database_url is None:
        prepare_data_dir(settings.data_dir)
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
    from runtime.standalone import serve_service

    return _run(serve_service(service, settings))


def _worker(worker: WorkerName) -> int:
    from runtime.workers import run_worker, worker_settings

    return _run(run_worker(worker, worker_settings(worker)))


def _gateway(topology_name: str, render_to: Path | None, upstream_overrides: list[str]) -> int:
    settings = load_settings()
    from runtime.topologies import topology_from_settings

    topology = topology_from_settings(topology_name, settings, upstream_overrides)
    if render_to is not None:
        from gateway.render import write_envoy_config

        write_envoy_config(topology, render_to)
        sys.stdout.write(f"wrote {render_to}\n")
        return 0
    from runtime.standalone import run_gateway

    return _run(run_gateway(topology, settings))


def _admin(arguments: argparse.Namespace) -> int:
    settings = load_settings(**_given(data_dir=arguments.data_dir, database_url=arguments.database_url))
    from runtime.admin_commands import (
        Terminal,
        create_admin,
        read_admin_password,
        rotate_signing_key,
    )
    from runtime.command_errors import CommandError

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
    except CommandError as error:
        sys.stderr.write(f"{error.message}\n")
        return error.exit_code


def _events(arguments: argparse.Namespace) -> int:
    embedded = {
        "data_dir": getattr(arguments, "data_dir", None),
        "database_url": getattr(arguments, "database_url", None),
    }
    settings = load_settings(**_given(**embedded))
    from runtime.event_commands import Output, run_events_command

    return run_events_command(arguments, settings, Output(stdout=sys.stdout, stderr=sys.stderr))


def _pki(arguments: argparse.Namespace) -> int:
    settings = load_settings(**_given(data_dir=arguments.data_dir))
    from runtime.command_errors import CommandError
    from runtime.pki_commands import init_pki, run_grpcurl
    from services.common.pki import MICROSERVICES_CERTIFICATES

    try:
        if arguments.command == "grpcurl":
            return run_grpcurl(settings, arguments.server, arguments.arguments)
        specs = arguments.workloads or [
            f"{spec.name}={','.join(spec.workloads)}" for spec in MICROSERVICES_CERTIFICATES
        ]
        return init_pki(arguments.dir or settings.pki_dir, specs, sys.stdout)
    except CommandError as error:
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
