"""`parley up`: every servicer in one process on SQLite, the workers as tasks, Envoy as a child."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from gateway.envoy_process import EnvoyProcess
from gateway.settings import load_gateway_settings
from gateway.topology import embedded_topology
from runtime.edge_process import EdgeChild
from runtime.process import (
    connectable_host,
    host_services,
    install_stop_signals,
    run_background,
    set_up_observability,
    settle_heap,
    subscriptions_of,
    until_stopped_or_exited,
)
from runtime.topologies import with_edge_settings
from runtime.workers import EmbeddedWorkers
from services.common.contracts import descriptor_set_path
from services.common.data_dir import prepare_data_dir
from services.common.db import Database
from services.common.listeners import ensure_free
from services.common.metrics import serve_metrics
from services.common.migrate import upgrade_async
from services.common.pki import (
    EDGE,
    EMBEDDED_CERTIFICATES,
    EMBEDDED_SERVICES,
    GATEWAY,
    PkiReport,
    TlsFiles,
    ensure_pki,
)
from services.common.ratelimit import DEFAULT_RATE_LIMITS_FILE, load_rate_limit_config
from services.common.settings import DEFAULT_DATA_DIR, PKI_DIR_NAME, SERVICE_NAMES, Settings
from services.email.sending import MAIL_DIR_NAME

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedAddresses:
    """Where a running embedded Parley listens."""

    gateway_url: str
    grpc_target: str
    edge_target: str
    metrics_url: str | None
    edge_metrics_url: str | None
    envoy_admin_url: str
    data_dir: Path
    database_url: str
    # Where mails go when no SMTP server is configured; None when they go to SMTP.
    mail_dir: Path | None
    # The CA and every workload's certificate, the operator's (for grpcurl) included.
    pki_dir: Path


async def run_embedded(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set (or SIGINT/SIGTERM arrives), then shut everything down in order."""
    # The gateway's data files first: a bad one stops `parley up` before anything is started.
    gateway_settings = load_gateway_settings()
    # The edge process reads the rate limits itself; read here too, a bad file stops us first.
    load_rate_limit_config(settings.rate_limits_file or DEFAULT_RATE_LIMITS_FILE)
    observability = set_up_observability(settings, process_name="embedded")
    stop = stop or asyncio.Event()
    install_stop_signals(stop)

    data_dir = prepare_data_dir(settings.data_dir)
    pki = embedded_pki(data_dir / PKI_DIR_NAME)
    database_url = settings.resolved_database_url
    await upgrade_async(database_url)
    database = Database(database_url)

    services = host_services(
        settings, SERVICE_NAMES, database, pki.files(EMBEDDED_SERVICES), observability, embedded=True
    )
    workers = EmbeddedWorkers(
        settings,
        database,
        registry=observability.registry,
        tracer_provider=observability.tracer_provider,
        subscriptions=subscriptions_of(services.bundles),
    )
    grpc_host = connectable_host(settings.grpc_host)
    edge = edge_child(settings, pki, auth_target=f"{grpc_host}:{services.port}", data_dir=data_dir)
    topology = with_edge_settings(
        embedded_topology(
            services.port,
            edge.port,
            settings.http_port,
            settings.envoy_admin_port,
            gateway_tls=pki.files(GATEWAY),
            descriptor_set_path=descriptor_set_path(),
            listen_address=settings.http_host,
            grpc_host=grpc_host,
            max_request_bytes=settings.max_request_bytes,
            settings=gateway_settings,
        ),
        settings,
    )
    envoy = EnvoyProcess(topology, config_dir=data_dir / "envoy")

    metrics = (
        serve_metrics(observability.registry, settings.metrics_host, settings.metrics_port)
        if (settings.metrics_port)
        else None
    )
    workers.start(stop)
    background = asyncio.create_task(run_background(services.bundles, stop), name="service-background")
    try:
        await services.start()
        await edge.start()
        await envoy.start()
        addresses = EmbeddedAddresses(
            gateway_url=f"http://{settings.http_host}:{topology.http_port}",
            grpc_target=f"{settings.grpc_host}:{services.port}",
            edge_target=edge.target,
            metrics_url=f"http://{settings.metrics_host}:{metrics.port}/metrics" if metrics else None,
            edge_metrics_url=(
                f"http://{settings.metrics_host}:{settings.edge_metrics_port}/metrics"
                if settings.edge_metrics_port
                else None
            ),
            envoy_admin_url=f"http://127.0.0.1:{topology.admin_port}",
            data_dir=data_dir,
            database_url=database_url,
            mail_dir=None if settings.smtp_host else data_dir / MAIL_DIR_NAME,
            pki_dir=pki.directory,
        )
        announce(addresses)
        settle_heap()
        await until_stopped_or_exited(stop, {"envoy": envoy.wait, "the edge process": edge.wait})
    finally:
        stop.set()
        await envoy.stop()
        # Before the server: the edge's credential-change stream, which never ends on its own, then
        # ends with it instead of holding the server's grace period.
        await edge.stop()
        await services.stop()
        await workers.stop(settings.shutdown_grace_s)
        await background
        if metrics is not None:
            metrics.close()
        await database.dispose()
        observability.tracer_provider.shutdown()
        logger.info("parley stopped")


def announce(addresses: EmbeddedAddresses) -> None:
    """Tell the person at the terminal where everything listens (stdout, not the JSON log)."""
    gateway, grpc_target = addresses.gateway_url, addresses.grpc_target
    database_kind = addresses.database_url.split("://", 1)[0]
    data_dir_flag = (
        "" if addresses.data_dir == DEFAULT_DATA_DIR.resolve() else f"--data-dir {addresses.data_dir} "
    )
    lines = [
        "Parley is up (embedded mode).",
        f"  Gateway: JSON/REST, gRPC, SSE   {gateway}      try: curl {gateway}/v1/billing/plans",
        f"  gRPC, every service, mTLS       {grpc_target}  try: parley grpcurl {data_dir_flag}"
        f"{grpc_target} list",
        f"  Certificates (mTLS, operator's) {addresses.pki_dir}",
        f"  Health                          {gateway}/healthz",
        f"  Metrics (Prometheus)            {addresses.metrics_url or 'off'}",
        f"  Edge metrics (rate limits)      {addresses.edge_metrics_url or 'off'}",
        f"  Envoy admin (loopback only)     {addresses.envoy_admin_url}",
        f"  Data                            {addresses.data_dir} ({database_kind})",
        f"  Mail (no SMTP configured)       {addresses.mail_dir}/*.eml"
        if addresses.mail_dir
        else "  Mail                            sent by SMTP",
        "Press Ctrl-C to stop.",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def embedded_pki(directory: Path) -> PkiReport:
    """The CA and the certificates of `parley up`'s processes and of its operator, made on the first
    start and renewed near their end (every start checks)."""
    report = ensure_pki(directory, EMBEDDED_CERTIFICATES)
    for status in (report.ca, *report.certificates):
        if status.action != "kept":
            logger.info(
                "certificate %s",
                status.action,
                extra={"certificate": status.name, "directory": str(directory)},
            )
    return report


def edge_child(settings: Settings, pki: PkiReport, *, auth_target: str, data_dir: Path) -> EdgeChild:
    """The `parley edge` child (not started): it proves to be the edge with its own certificate, and
    is asked for its health with the services process's."""
    # The child would report a taken port in its own output; checked here, it is one line from us.
    ensure_free("edge_port", "127.0.0.1", settings.edge_port)
    ensure_free("edge_metrics_port", settings.metrics_host, settings.edge_metrics_port)
    return EdgeChild(
        port=settings.edge_port or free_loopback_port(),
        env=edge_child_env(settings, auth_target=auth_target, data_dir=data_dir, tls=pki.files(EDGE)),
        tls=pki.files(EMBEDDED_SERVICES),
        stop_grace_s=settings.shutdown_grace_s,
    )


def edge_child_env(settings: Settings, *, auth_target: str, data_dir: Path, tls: TlsFiles) -> dict[str, str]:
    """What `parley edge` must be told besides the environment it inherits: the settings `parley up`
    took from its flags or worked out itself, and its certificate."""
    env = {
        "PARLEY_AUTH_TARGET": auth_target,
        "PARLEY_DATA_DIR": str(data_dir),
        "PARLEY_SERVICE_CA_FILE": str(tls.ca_file),
        "PARLEY_SERVICE_CERT_FILE": str(tls.cert_file),
        "PARLEY_SERVICE_KEY_FILE": str(tls.key_file),
        "PARLEY_METRICS_HOST": settings.metrics_host,
        "PARLEY_EDGE_METRICS_PORT": str(settings.edge_metrics_port),
        "PARLEY_RATE_LIMITS_FILE": str(settings.rate_limits_file or DEFAULT_RATE_LIMITS_FILE),
        "PARLEY_JWT_ISSUER": settings.jwt_issuer,
        "PARLEY_JWT_AUDIENCE": settings.jwt_audience,
        "PARLEY_LOG_LEVEL": settings.log_level,
        "PARLEY_LOG_FORMAT": settings.log_format,
    }
    # Its own settings check would refuse a metrics port that `parley up` itself uses.
    env["PARLEY_METRICS_PORT"] = "0"
    return env


def free_loopback_port() -> int:
    """A port nothing listens on right now (for `PARLEY_EDGE_PORT=0`: the child is told the port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
