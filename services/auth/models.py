"""The auth service's tables. Secrets (passwords, refresh tokens, API keys, one-time tokens, signing
keys) are stored only as hashes or encrypted, never in the clear."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, ForeignKey, Index, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from services.auth.emails import EMAIL_MAX
from services.common.models import Base, Timestamps, UuidPrimaryKey

SHA256_HEX = 64


class UserRecord(UuidPrimaryKey, Timestamps, Base):
    """An account; `email` is stored in its canonical spelling (`services.auth.emails`) and is unique."""

    __tablename__ = "users"

    email: Mapped[str] = mapped_column(String(EMAIL_MAX), unique=True)
    display_name: Mapped[str] = mapped_column(String(100))
    password_hash: Mapped[str] = mapped_column(String(255))
    # Role names, e.g. ["user"] or ["user", "admin"].
    roles: Mapped[list[str]] = mapped_column(JSON)
    plan_id: Mapped[str] = mapped_column(String(32), default="free")
    # The effective time of the newest subscription change applied to `plan_id`, and when billing
    # recorded it (its event's time), which orders changes effective at the same moment. Billing's
    # changes may arrive out of order; an older one is ignored. None until billing's first.
    plan_changed_at: Mapped[datetime | None]
    plan_change_recorded_at: Mapped[datetime | None]
    email_verified_at: Mapped[datetime | None]
    last_login_at: Mapped[datetime | None]
    disabled_at: Mapped[datetime | None]


class OneTimeTokenRecord(UuidPrimaryKey, Timestamps, Base):
    """A single-use, expiring token sent by email: email verification or password reset."""

    __tablename__ = "one_time_tokens"
    __table_args__ = (Index(None, "user_id", "purpose"),)

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    # "verify_email" or "reset_password".
    purpose: Mapped[str] = mapped_column(String(32))
    token_hash: Mapped[str] = mapped_column(String(SHA256_HEX), unique=True)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]


class SessionRecord(UuidPrimaryKey, Timestamps, Base):
    """A sign-in: the `sid` of its access tokens and the family its refresh tokens rotate within."""

    __tablename__ = "sessions"
    __table_args__ = (Index(None, "user_id", "revoked_at"),)

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    # "jwt" (tokens in the body) or "cookie" (tokens in __Host- cookies, with a CSRF token).
    auth_method: Mapped[str] = mapped_column(String(16))
    device: Mapped[str] = mapped_column(String(200))
    user_agent: Mapped[str] = mapped_column(String(1000))
    ip_address: Mapped[str] = mapped_column(String(64))
    last_seen_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    csrf_token_hash: Mapped[str | None] = mapped_column(String(SHA256_HEX))
    revoked_at: Mapped[datetime | None]
    # Why it ended: "logout", "revoked", "password_changed", "reuse_detected", "user_disabled", ...
    revoke_reason: Mapped[str | None] = mapped_column(String(32))


class RefreshTokenRecord(UuidPrimaryKey, Timestamps, Base):
    """One refresh token of a session; each use rotates it, and using a rotated one is theft."""

    __tablename__ = "refresh_tokens"

    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(SHA256_HEX), unique=True)
    expires_at: Mapped[datetime]
    # Set when the token is exchanged for its successor; a second exchange is reuse.
    rotated_at: Mapped[datetime | None]


class ApiKeyRecord(UuidPrimaryKey, Timestamps, Base):
    """A programmatic credential `pk_<prefix>_<secret>`; looked up by prefix, checked by hash."""

    __tablename__ = "api_keys"
    __table_args__ = (Index(None, "user_id", "revoked_at"),)

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    last_four: Mapped[str] = mapped_column(String(4))
    secret_hash: Mapped[str] = mapped_column(String(SHA256_HEX))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class LoginThrottleRecord(Base):
    """Failed sign-ins per key ("email:<address>" or "ip:<address>"), for backoff and lockout."""

    __tablename__ = "login_throttles"

    key: Mapped[str] = mapped_column(String(EMAIL_MAX + 8), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer)
    last_failure_at: Mapped[datetime]
    locked_until: Mapped[datetime | None]


class SigningKeyRecord(Base):
    """An Ed25519 key that signs access tokens; the private half is encrypted with the KEK."""

    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    algorithm: Mapped[str] = mapped_column(String(16))
    public_jwk: Mapped[dict[str, str]] = mapped_column(JSON)
    private_key_encrypted: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]
    # Set when a newer key takes over signing; the key stays in the JWKS while its tokens can live.
    retired_at: Mapped[datetime | None]
