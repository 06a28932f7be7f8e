"""Process settings, read from `PARLEY_*` environment variables and validated at startup."""

from __future__ import annotations

from email.utils import parseaddr
from pathlib import Path
from typing import Annotated, Final, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as EnvParseError

from services.common.pki import TlsFiles
from services.common.token_rules import DEFAULT_AUDIENCE, DEFAULT_ISSUER, MAX_LIFETIME_S

ServiceName = Literal["auth", "chat", "billing", "analytics"]
# The services, which are also the gateway's upstream clusters (one per service, named after it).
SERVICE_NAMES: tuple[ServiceName, ...] = ("auth", "chat", "billing", "analytics")

# Where things listen unless told otherwise: the defaults of the settings below, of `parley` and of
# the gateway's topologies (gateway/topology.py).
DEFAULT_GRPC_PORT: Final = 50051  # every servicer (`parley up`), or one service in its k8s pod
DEFAULT_EDGE_PORT: Final = 50052  # the gateway's own gRPC server
DEFAULT_HTTP_PORT: Final = 8080  # the gateway's public listener
DEFAULT_HTTPS_PORT: Final = 8443  # the same with TLS
DEFAULT_ENVOY_ADMIN_PORT: Final = 9901
DEFAULT_METRICS_PORT: Final = 9464
DEFAULT_EDGE_METRICS_PORT: Final = 9465  # the edge process (`parley edge`, also under `parley up`)
DEFAULT_MAX_REQUEST_BYTES: Final = 1024 * 1024
DEFAULT_DATA_DIR: Final = Path("var")
# The data dir's folder of certificates (services.common.pki's layout).
PKI_DIR_NAME: Final = "pki"

# Ports for microservices mode on one machine; k8s gives every service its own address instead.
DEFAULT_SERVICE_PORTS: dict[ServiceName, int] = {
    "auth": 50061,
    "chat": 50062,
    "billing": 50063,
    "analytics": 50064,
}
DEFAULT_SERVICE_METRICS_PORTS: dict[ServiceName, int] = {
    "auth": 9471,
    "chat": 9472,
    "billing": 9473,
    "analytics": 9474,
}

# `parley worker <name>`: the event pipeline's processes in microservices mode.
WorkerName = Literal["relay", "email"]
WORKER_NAMES: tuple[WorkerName, ...] = ("relay", "email")
DEFAULT_WORKER_METRICS_PORTS: dict[WorkerName, int] = {"relay": 9481, "email": 9482}

Port = int
# Product features that can be reserved for accounts with a verified email address.
VerifiableFeature = Literal["api_keys", "chat", "billing"]
# How the SMTP connection is secured: STARTTLS upgrade, implicit TLS, or (local relays only) plain.
SmtpSecurity = Literal["none", "starttls", "tls"]


class Settings(BaseSettings):
    """Everything a Parley process can be told from its environment.

    Nested names use `__`, e.g. nothing nested exists yet; every field maps to `PARLEY_<FIELD>`.
    """

    model_config = SettingsConfigDict(env_prefix="PARLEY_", extra="ignore", frozen=True)

    data_dir: Path = Field(
        default=DEFAULT_DATA_DIR, description="Where embedded mode keeps SQLite and files."
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy async URL; defaults to SQLite under data_dir.",
    )
    grpc_host: str = Field(default="127.0.0.1", description="Address the gRPC server binds.")
    grpc_port: Port = Field(default=DEFAULT_GRPC_PORT, ge=0, le=65535)
    metrics_host: str = Field(default="127.0.0.1")
    metrics_port: Port = Field(
        default=DEFAULT_METRICS_PORT, ge=0, le=65535, description="Prometheus /metrics; 0 = off."
    )
    http_port: Port = Field(
        default=DEFAULT_HTTP_PORT, ge=0, le=65535, description="The gateway's public HTTP port."
    )
    http_host: str = Field(default="127.0.0.1", description="Address the gateway listener binds.")
    envoy_admin_port: Port = Field(default=DEFAULT_ENVOY_ADMIN_PORT, ge=0, le=65535)
    edge_port: Port = Field(
        default=DEFAULT_EDGE_PORT, ge=0, le=65535, description="The gateway's own gRPC sidecar."
    )
    edge_metrics_port: Port = Field(
        default=DEFAULT_EDGE_METRICS_PORT,
        ge=0,
        le=65535,
        description="The edge process's Prometheus /metrics (`parley edge`, under `parley up` too); 0 = off.",
    )
    service_ca_file: Path | None = Field(
        default=None,
        description="PEM bundle of the CA of every workload's certificate; data_dir/pki/ca.pem if unset.",
    )
    service_cert_file: Path | None = Field(
        default=None,
        description="PEM certificate naming this process's workload; data_dir/pki/<workload>.pem if unset.",
    )
    service_key_file: Path | None = Field(
        default=None,
        description="PEM private key of service_cert_file; data_dir/pki/<workload>-key.pem if unset.",
    )
    max_request_bytes: int = Field(default=DEFAULT_MAX_REQUEST_BYTES, gt=0, le=64 * 1024 * 1024)
    shutdown_grace_s: float = Field(default=5.0, ge=0, le=120)
    health_probe_interval_s: float = Field(default=2.0, gt=0, le=60)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"

    jwt_issuer: str = Field(default=DEFAULT_ISSUER, min_length=1)
    jwt_audience: str = Field(default=DEFAULT_AUDIENCE, min_length=1)
    jwks_path: Path | None = Field(
        default=None,
        description="A JWKS file whose keys verify direct-call JWTs until the auth service serves them.",
    )

    otlp_endpoint: str | None = Field(default=None, description="OTLP/gRPC endpoint; no export when unset.")

    auth_key_encryption_key: SecretStr | None = Field(
        default=None,
        description="32 random bytes, base64url: encrypts the stored token-signing keys (the KEK).",
    )
    auth_key_encryption_key_file: Path | None = Field(
        default=None,
        description="A file holding the KEK instead (a k8s Secret mount); embedded mode makes one if unset.",
    )
    auth_signing_key_file: Path | None = Field(
        default=None,
        description="A PEM Ed25519 private key that becomes the active signing key at start if new.",
    )
    access_token_ttl_s: int = Field(
        default=900, ge=60, le=MAX_LIFETIME_S, description="Access JWT lifetime, up to the token rules' cap."
    )
    refresh_token_ttl_s: int = Field(
        default=30 * 24 * 3600, ge=3600, le=365 * 24 * 3600, description="Refresh token lifetime."
    )
    redis_url: str | None = Field(
        default=None,
        description="redis:// URL for state shared by replicas (token revocations); in-process when unset.",
    )
    # NoDecode: the variable is a comma-separated list, not JSON.
    auth_require_verified_email_for: Annotated[frozenset[VerifiableFeature], NoDecode] = Field(
        default=frozenset(),
        description="Features an unverified account may not use, comma separated, e.g. api_keys,chat.",
    )
    auth_target: str | None = Field(
        default=None,
        description="host:port of the auth gRPC service, where other services fetch the JWKS.",
    )
    cors_allowed_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Browser origins allowed to call the gateway with credentials, comma separated.",
    )
    tls_cert_file: Path | None = Field(default=None, description="PEM certificate chain: turns on HTTPS.")
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file.")
    https_port: Port = Field(
        default=DEFAULT_HTTPS_PORT, ge=0, le=65535, description="The gateway's HTTPS port, with TLS."
    )
    rate_limits_file: Path | None = Field(
        default=None, description="Rate-limit rules for the gateway; envoy/ratelimits.yaml when unset."
    )

    billing_payment_provider: Literal["sandbox", "stripe"] = Field(
        default="sandbox",
        description=(
            "Where payments go: sandbox (offline, test cards decide the outcome) or stripe "
            "(billing_stripe_api_key and billing_webhook_secrets required)."
        ),
    )
    billing_webhook_secrets: SecretStr | None = Field(
        default=None,
        description=(
            "The payment provider's webhook signing secrets, comma-separated (several while one is "
            "rotated); embedded mode makes one in data_dir/secrets for the sandbox when unset."
        ),
    )
    billing_stripe_api_key: SecretStr | None = Field(
        default=None, description="The Stripe account's secret API key (sk_... or a restricted rk_...)."
    )
    billing_stripe_api_base: str | None = Field(
        default=None,
        description="Where the Stripe SDK sends API calls; Stripe's own API when unset (set in tests only).",
    )

    public_base_url: str = Field(
        default=f"http://127.0.0.1:{DEFAULT_HTTP_PORT}",
        description="Where users reach Parley; every link in an email starts with it.",
    )
    smtp_host: str | None = Field(
        default=None,
        description="SMTP server for outgoing mail; unset = .eml files under data_dir/mail instead.",
    )
    smtp_port: Port = Field(default=587, ge=1, le=65535)
    smtp_security: SmtpSecurity = Field(
        default="starttls",
        description="starttls (upgrade a plain connection, required), tls (implicit TLS, port 465) or none.",
    )
    smtp_username: str | None = Field(default=None, description="SMTP AUTH user; no AUTH when unset.")
    smtp_password: SecretStr | None = Field(default=None, description="SMTP AUTH password.")
    smtp_timeout_s: float = Field(default=30.0, gt=0, le=300, description="Per SMTP command and connect.")
    mail_from: str = Field(
        default="Parley <no-reply@localhost>",
        description="The From header and envelope sender of every email.",
    )
    outbox_retention_days: int = Field(
        default=7, ge=1, le=3650, description="How long relayed outbox events are kept before pruning."
    )
    processed_retention_days: int = Field(
        default=30,
        ge=1,
        le=3650,
        description="How long consumers' idempotency records are kept; longer than any redelivery can come.",
    )
    email_max_attempts: int = Field(
        default=10, ge=1, le=100, description="Sending attempts per mail before it is dead-lettered."
    )
    email_retry_base_s: float = Field(
        default=1.0, gt=0, le=600, description="First retry delay of a mail; doubles per attempt, jittered."
    )
    email_retry_cap_s: float = Field(
        default=60.0, gt=0, le=600, description="Longest delay between two sending attempts of a mail."
    )
    smtp_per_domain_per_minute: int = Field(
        default=60,
        ge=1,
        description="Sustained emails per minute to one recipient domain (shared via Redis when set).",
    )
    smtp_per_domain_burst: int = Field(
        default=20, ge=1, description="Emails one recipient domain may get at once after a quiet spell."
    )

    @field_validator("auth_require_verified_email_for", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return frozenset(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("cors_allowed_origins", mode="before")
    @classmethod
    def _origin_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip().rstrip("/") for part in value.split(",") if part.strip())
        return value

    @field_validator("cors_allowed_origins")
    @classmethod
    def _listed_origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            if origin == "*":
                raise ValueError("'*' is refused: credentials are allowed, so every origin must be listed")
            if not origin.startswith(("http://", "https://")):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port])")
        return value

    @field_validator("public_base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{value!r} is not an absolute http(s) URL")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment: links append their own path and query")
        return value.rstrip("/")

    @field_validator("billing_stripe_api_base")
    @classmethod
    def _stripe_api_base(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{value!r} is not an absolute http(s) URL")
        # The SDK appends paths that start with "/v1/".
        return value.rstrip("/")

    @field_validator("mail_from")
    @classmethod
    def _mail_from_address(cls, value: str) -> str:
        _, address = parseaddr(value)
        if "@" not in address or "\r" in value or "\n" in value:
            raise ValueError(f"{value!r} is not an address like 'Parley <no-reply@example.com>'")
        return value

    @model_validator(mode="after")
    def _smtp_credentials_pair(self) -> Settings:
        if (self.smtp_username is None) != (self.smtp_password is None):
            raise ValueError("smtp_username and smtp_password must be set together")
        return self

    @model_validator(mode="after")
    def _service_certificate_pair(self) -> Settings:
        # A certificate from one place and its key from another (a default) would never match.
        if (self.service_cert_file is None) != (self.service_key_file is None):
            raise ValueError("service_cert_file and service_key_file must be set together")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        for path in (self.tls_cert_file, self.tls_key_file):
            if path is not None and not path.is_file():
                raise ValueError(f"{path} does not exist")
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _async_driver_only(cls, value: str | None) -> str | None:
        if value is None:
            return None
        allowed = ("sqlite+aiosqlite://", "postgresql+asyncpg://")
        if not value.startswith(allowed):
            raise ValueError(f"must start with one of {', '.join(allowed)} (an async SQLAlchemy driver)")
        return value

    @model_validator(mode="after")
    def _distinct_ports(self) -> Settings:
        ports = {
            "grpc_port": self.grpc_port,
            "metrics_port": self.metrics_port,
            "http_port": self.http_port,
            "envoy_admin_port": self.envoy_admin_port,
            "edge_port": self.edge_port,
            "edge_metrics_port": self.edge_metrics_port,
            "https_port": self.https_port if self.tls_cert_file else 0,
        }
        used: dict[int, str] = {}
        for name, port in ports.items():
            if port == 0:
                continue
            if port in used:
                raise ValueError(f"{name} and {used[port]} are both {port}; each listener needs its own port")
            used[port] = name
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'parley.db').resolve()}"

    @property
    def pki_dir(self) -> Path:
        """Where `parley up` keeps its PKI, and where `parley pki init` writes one by default."""
        return self.data_dir / PKI_DIR_NAME

    def service_tls_files(self, name: str) -> TlsFiles:
        """This process's certificate files: each one as set, else certificate `name` in `pki_dir`."""
        defaults = TlsFiles.in_directory(self.pki_dir, name)
        return TlsFiles(
            ca_file=self.service_ca_file or defaults.ca_file,
            cert_file=self.service_cert_file or defaults.cert_file,
            key_file=self.service_key_file or defaults.key_file,
        )


class SettingsError(Exception):
    """Settings failed validation; the message lists every bad variable in plain words."""


def load_settings(**overrides: object) -> Settings:
    """Read and validate settings, turning pydantic's error into one readable message."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        lines = ["Invalid Parley settings:"]
        for problem in error.errors():
            field = ".".join(str(part) for part in problem["loc"]) or "settings"
            variable = f"PARLEY_{field.upper()}" if problem["loc"] else "settings"
            given = problem.get("input")
            # Never echo a secret back into logs or terminals.
            hidden = (
                isinstance(given, dict)
                or "secret" in field
                or "encryption_key" in field
                or "password" in field
            )
            shown = "" if hidden else f" (got {given!r})"
            lines.append(f"  {variable}: {problem['msg']}{shown}")
        raise SettingsError("\n".join(lines)) from None
    except EnvParseError as error:
        # A variable that could not even be parsed (e.g. malformed JSON for a structured field).
        raise SettingsError(f"Invalid Parley settings:\n  {error}") from None
