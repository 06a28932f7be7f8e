"""`parley admin …`: operator commands that act on the database directly, with no server running.

- `create-admin` bootstraps (or re-promotes) an administrator through `AccountAdmin.create_admin`.
- `rotate-signing-key` makes a new token-signing key active through `SigningKeyStore.rotate`.

Both build their pieces with the auth wiring's own builders (`services.auth.wiring`), so the KEK,
password policy and token lifetimes are exactly what the running service uses. Both migrate the
database first, as `parley migrate` would, so they also work on a brand-new data directory.
"""

from __future__ import annotations

import asyncio
import getpass
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, TextIO

from prometheus_client import CollectorRegistry

from runtime.command_errors import EXIT_BAD_INPUT, CommandError
from runtime.process import read_cache_for
from services.auth.signing_keys import (
    DEFAULT_REFRESH_INTERVAL_S,
    EMBEDDED_KEK_PATH,
    SigningKeyDecryptionError,
)
from services.auth.wiring import account_parts, key_encryption_key, signing_key_store
from services.common.clock import utc_now
from services.common.data_dir import prepare_data_dir
from services.common.db import Database, DatabaseUnavailable
from services.common.errors import FieldViolation, InvalidArgument, ParleyError
from services.common.migrate import upgrade_async
from services.common.revocation import InMemoryRevocationList
from services.common.settings import Settings, SettingsError

PASSWORD_ENV: Final = "PARLEY_ADMIN_PASSWORD"  # noqa: S105 - the variable's name, not a password


@dataclass(frozen=True)
class Terminal:
    """Where a command reads a password from and writes its report: the real ones, or a test's."""

    stdin: TextIO
    stdout: TextIO
    environ: Mapping[str, str]
    prompt: Callable[[str], str] = getpass.getpass


# ---- create-admin ----------------------------------------------------------------------------------


def read_admin_password(password_file: Path | None, terminal: Terminal) -> str:
    """The new admin's password: `--password-file` (`-` for stdin), else $PARLEY_ADMIN_PASSWORD,
    else a hidden prompt (asked twice) when stdin is a terminal.

    There is deliberately no `--password` flag: a password on the command line lands in the shell's
    history and in every `ps` listing.
    """
    if password_file is not None:
        return _password_from_file(password_file, terminal)
    from_env = terminal.environ.get(PASSWORD_ENV)
    if from_env is not None:
        if not from_env:
            raise CommandError(f"{PASSWORD_ENV} is set but empty.", exit_code=EXIT_BAD_INPUT)
        return from_env
    if not terminal.stdin.isatty():
        raise CommandError(
            f"No password given: set {PASSWORD_ENV}, pass --password-file PATH (or - for stdin), "
            "or run the command in a terminal to be prompted.",
            exit_code=EXIT_BAD_INPUT,
        )
    password = terminal.prompt("Password for the admin account: ")
    if not password:
        raise CommandError("The password is empty.", exit_code=EXIT_BAD_INPUT)
    if terminal.prompt("Repeat the password: ") != password:
        raise CommandError("The passwords do not match.", exit_code=EXIT_BAD_INPUT)
    return password


def _password_from_file(path: Path, terminal: Terminal) -> str:
    try:
        content = terminal.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CommandError(
            f"Cannot read the password file {path}: {type(error).__name__}: {error}", exit_code=EXIT_BAD_INPUT
        ) from None
    # One trailing line break is how files and `echo` end; any other whitespace is part of the password.
    password = content.removesuffix("\n").removesuffix("\r")
    if not password:
        raise CommandError(f"The password file {path} is empty.", exit_code=EXIT_BAD_INPUT)
    return password


def create_admin(
    settings: Settings, *, email: str, display_name: str, password: str, terminal: Terminal
) -> int:
    """Create the admin (verified, roles user+admin), or promote and re-enable an existing account."""

    async def operation(database: Database) -> None:
        # The shared read cache, so services sharing it see the promoted roles at once.
        read_cache = read_cache_for(settings, CollectorRegistry())
        parts = account_parts(settings, database, InMemoryRevocationList(), read_cache)
        try:
            outcome = await parts.admin().create_admin(email, password, display_name)
        except InvalidArgument as error:
            raise CommandError(_invalid_input_report(error), exit_code=EXIT_BAD_INPUT) from None
        except ParleyError as error:
            raise CommandError(f"Cannot create the admin: {error.message}") from None
        finally:
            await read_cache.close()
        user = outcome.user
        if outcome.created:
            report = f"created admin {user.email} (user id {user.id}), email verified, roles user+admin\n"
        elif outcome.changed:
            report = (
                f"promoted existing user {user.email} (user id {user.id}) to an enabled admin; "
                "their password and display name are unchanged\n"
            )
        else:
            report = f"{user.email} (user id {user.id}) is already an enabled admin; nothing changed\n"
        terminal.stdout.write(report)

    return _run_against_database(settings, operation)


def _invalid_input_report(error: InvalidArgument) -> str:
    if error.reason == "PASSWORD_POLICY_VIOLATION":
        heading = "The password does not meet the password policy:"
    else:
        heading = "Cannot create the admin; fix these and run the command again:"
    return "\n".join([heading, *(_violation_line(violation) for violation in error.field_violations)])


def _violation_line(violation: FieldViolation) -> str:
    return f"  - {violation.field}: {violation.description} ({violation.reason})"


# ---- rotate-signing-key ----------------------------------------------------------------------------


def rotate_signing_key(settings: Settings, *, terminal: Terminal) -> int:
    """Make a new key active; the previous one stays published until its last token has expired."""
    # Outside embedded mode (PARLEY_DATABASE_URL set) the KEK must be configured: replicas share it.
    embedded = settings.database_url is None
    # Loaded before touching the database, so a missing KEK fails fast with a settings message.
    try:
        key_encryption_key(settings, embedded=embedded)
    except SettingsError as error:
        embedded_kek = settings.data_dir / EMBEDDED_KEK_PATH
        if embedded or not embedded_kek.exists():
            raise
        # `parley up` with PARLEY_DATABASE_URL still keeps its generated KEK in the data dir.
        raise SettingsError(
            f"{error}\n  (`parley up` keeps its key-encryption key in {embedded_kek}; "
            f"to use it, set PARLEY_AUTH_KEY_ENCRYPTION_KEY_FILE={embedded_kek})"
        ) from None

    async def operation(database: Database) -> None:
        store = signing_key_store(settings, database, embedded=embedded)
        previous: str | None = None
        if (await store.jwks())["keys"]:
            # Decrypting the active key proves this KEK is the one the keys are sealed with; rotating
            # under another KEK would store a key that no server could decrypt.
            try:
                previous = (await store.active_signing_key()).kid
            except SigningKeyDecryptionError as error:
                raise CommandError(str(error), exit_code=EXIT_BAD_INPUT) from None
        kid = await store.rotate()
        leaves_at = utc_now() + store.publication_window
        lines = [
            "rotated the token-signing key",
            f"  new kid:      {kid}",
            f"                signs new access tokens; running servers switch to it within "
            f"{DEFAULT_REFRESH_INTERVAL_S:g}s",
        ]
        if previous is None:
            lines.append("  previous kid: none (this is the first signing key)")
        else:
            window = int(store.publication_window.total_seconds())
            lines += [
                f"  previous kid: {previous}",
                f"                stays in the JWKS until about {_utc(leaves_at)} "
                f"({window}s: the access-token TTL plus the servers' key refresh interval)",
            ]
        terminal.stdout.write("\n".join(lines) + "\n")

    return _run_against_database(settings, operation)


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# ---- shared ----------------------------------------------------------------------------------------


def _run_against_database(settings: Settings, operation: Callable[[Database], Awaitable[None]]) -> int:
    """Reach the database, migrate it, run `operation`, close the pool; 0 when it all went well."""
    if settings.database_url is None:
        prepare_data_dir(settings.data_dir)
    url = settings.resolved_database_url

    async def run() -> None:
        database = Database(url)
        try:
            try:
                await database.ping()
            except DatabaseUnavailable as error:
                where = _redacted(database)
                raise CommandError(f"Cannot reach the database at {where}: {error}") from None
            await upgrade_async(url)
            await operation(database)
        finally:
            await database.dispose()

    asyncio.run(run())
    return 0


def _redacted(database: Database) -> str:
    return database.url.render_as_string(hide_password=True)
