"""`parley admin create-admin` and `parley admin rotate-signing-key`: the real CLI in a child process,
against a fresh SQLite data dir and a fresh PostgreSQL database, and against a running `parley up`."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import select
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jwt
import pytest
from sqlalchemy import select as sql_select

from services.auth.models import SigningKeyRecord, UserRecord
from services.auth.signing_keys import JWKS_CACHE_S, generate_kek
from services.common.db import Database
from tests.support.auth_accounts import build_world
from tests.support.parley_process import PARLEY, REPO_ROOT, EmbeddedPorts, ParleyProcess
from tests.support.polling import eventually

STRONG_PASSWORD = "violet-harbour-lantern-42"
ADMIN_EMAIL = "root@example.com"
COMMAND_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Target:
    """Where the commands point: the environment they run with and the database it resolves to."""

    env: dict[str, str]
    database_url: str
    data_dir: Path

    def with_env(self, **extra: str) -> dict[str, str]:
        return {**self.env, **extra}


def child_environment(env: dict[str, str]) -> dict[str, str]:
    """The test process's environment without any PARLEY_* variable, plus `env`."""
    inherited = {name: value for name, value in os.environ.items() if not name.startswith("PARLEY_")}
    return {**inherited, **env}


async def parley_admin(*args: str, env: dict[str, str], stdin: str | None = None) -> Completed:
    process = await asyncio.create_subprocess_exec(
        str(PARLEY),
        "admin",
        *args,
        env=child_environment(env),
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(COMMAND_TIMEOUT_S):
        out, err = await process.communicate(stdin.encode() if stdin is not None else None)
    assert process.returncode is not None
    return Completed(process.returncode, out.decode(), err.decode())


def create_admin_args(email: str = ADMIN_EMAIL, name: str = "Root") -> list[str]:
    return ["create-admin", "--email", email, "--display-name", name]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    data_dir = tmp_path / "data"
    if request.param == "sqlite":
        return Target(
            {"PARLEY_DATA_DIR": str(data_dir)}, f"sqlite+aiosqlite:///{data_dir / 'parley.db'}", data_dir
        )
    url: str = request.getfixturevalue("postgres_url")
    env = {
        "PARLEY_DATA_DIR": str(data_dir),
        "PARLEY_DATABASE_URL": url,
        "PARLEY_AUTH_KEY_ENCRYPTION_KEY": generate_kek(),
    }
    return Target(env, url, data_dir)


@dataclass
class OpenDatabase:
    url: str
    _database: Database | None = field(default=None, init=False)

    @property
    def database(self) -> Database:
        if self._database is None:
            self._database = Database(self.url)
        return self._database

    async def users(self) -> list[UserRecord]:
        async with self.database.unit_of_work(read_only=True) as session:
            return list(await session.scalars(sql_select(UserRecord).order_by(UserRecord.email)))

    async def signing_keys(self) -> list[SigningKeyRecord]:
        async with self.database.unit_of_work(read_only=True) as session:
            return list(
                await session.scalars(sql_select(SigningKeyRecord).order_by(SigningKeyRecord.created_at))
            )

    async def close(self) -> None:
        if self._database is not None:
            await self._database.dispose()


@pytest.fixture
async def opened(target: Target) -> AsyncIterator[OpenDatabase]:
    """Opens the target's database (after a command has created it) for reading what it holds."""
    holder = OpenDatabase(target.database_url)
    try:
        yield holder
    finally:
        await holder.close()


# ---- create-admin ----------------------------------------------------------------------------------


async def test_create_admin_creates_a_verified_admin_and_a_rerun_changes_nothing(
    target: Target, opened: OpenDatabase
) -> None:
    first = await parley_admin(
        *create_admin_args(), env=target.with_env(PARLEY_ADMIN_PASSWORD=STRONG_PASSWORD)
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"created admin {ADMIN_EMAIL}")
    [user] = await opened.users()
    assert (user.email, user.display_name, sorted(user.roles)) == (ADMIN_EMAIL, "Root", ["admin", "user"])
    assert user.email_verified_at is not None
    assert user.disabled_at is None
    assert user.password_hash.startswith("$argon2id$")

    again = await parley_admin(
        *create_admin_args(), env=target.with_env(PARLEY_ADMIN_PASSWORD=STRONG_PASSWORD)
    )
    assert again.returncode == 0, again.stderr
    assert "already an enabled admin; nothing changed" in again.stdout
    assert [u.id for u in await opened.users()] == [user.id]


async def test_create_admin_promotes_and_re_enables_an_existing_account(
    target: Target, opened: OpenDatabase
) -> None:
    # A first run migrates the database; then an ordinary account is registered and disabled.
    setup = await parley_admin(
        *create_admin_args(), env=target.with_env(PARLEY_ADMIN_PASSWORD=STRONG_PASSWORD)
    )
    assert setup.returncode == 0, setup.stderr
    world = build_world(opened.database)
    ordinary = await world.register("member@example.com", name="Member")
    admin_id = next(user.id for user in await opened.users() if user.email == ADMIN_EMAIL)
    await world.admin.disable_user(ordinary.id, actor_id=admin_id)

    promoted = await parley_admin(
        *create_admin_args("Member@Example.com", "Ignored"),
        env=target.with_env(PARLEY_ADMIN_PASSWORD="another-password-entirely-9"),
    )
    assert promoted.returncode == 0, promoted.stderr
    assert promoted.stdout.startswith("promoted existing user member@example.com")
    record = next(u for u in await opened.users() if u.id == ordinary.id)
    assert sorted(record.roles) == ["admin", "user"]
    assert record.disabled_at is None
    assert record.display_name == "Member"
    assert world.hasher.verify(record.password_hash, STRONG_PASSWORD)


@pytest.mark.parametrize(
    ("password", "expected"),
    [
        ("short", ["Use at least 12 characters; this password has 5.", "PASSWORD_TOO_SHORT"]),
        ("password123", ["PASSWORD_TOO_SHORT", "PASSWORD_TOO_COMMON"]),
        ("root-at-example-2024", ["PASSWORD_CONTAINS_EMAIL"]),
    ],
)
async def test_a_password_against_the_policy_exits_2_naming_each_violation(
    target: Target, opened: OpenDatabase, password: str, expected: list[str]
) -> None:
    result = await parley_admin(*create_admin_args(), env=target.with_env(PARLEY_ADMIN_PASSWORD=password))
    assert result.returncode == 2
    assert result.stderr.startswith("The password does not meet the password policy:\n")
    for text in expected:
        assert text in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert await opened.users() == []


async def test_bad_email_and_name_are_reported_field_by_field(target: Target) -> None:
    result = await parley_admin(
        *create_admin_args("not-an-address", "  "), env=target.with_env(PARLEY_ADMIN_PASSWORD=STRONG_PASSWORD)
    )
    assert result.returncode == 2
    assert "  - email: " in result.stderr
    assert "  - display_name: " in result.stderr
    assert "Traceback" not in result.stderr


async def test_the_password_can_come_from_a_file_or_stdin_and_is_required(tmp_path: Path) -> None:
    env = {"PARLEY_DATA_DIR": str(tmp_path / "data")}
    password_file = tmp_path / "password"
    password_file.write_text(STRONG_PASSWORD + "\n")
    from_file = await parley_admin(*create_admin_args(), "--password-file", str(password_file), env=env)
    assert from_file.returncode == 0, from_file.stderr

    from_stdin = await parley_admin(
        *create_admin_args("second@example.com"),
        "--password-file",
        "-",
        env=env,
        stdin=STRONG_PASSWORD + "\n",
    )
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout.startswith("created admin second@example.com")

    # No file, no variable and no terminal: nothing to read a password from.
    missing = await parley_admin(*create_admin_args("third@example.com"), env=env)
    assert missing.returncode == 2
    assert "PARLEY_ADMIN_PASSWORD" in missing.stderr
    assert "--password-file" in missing.stderr

    unreadable = await parley_admin(
        *create_admin_args("third@example.com"), "--password-file", str(tmp_path / "absent"), env=env
    )
    assert unreadable.returncode == 2
    assert "Cannot read the password file" in unreadable.stderr
    assert "Traceback" not in unreadable.stderr


def test_in_a_terminal_it_prompts_twice_without_echo(tmp_path: Path) -> None:
    env = child_environment({"PARLEY_DATA_DIR": str(tmp_path / "data")})
    pid, terminal = pty.fork()
    if pid == 0:  # the child: its controlling terminal is the pty, as in an operator's shell
        try:
            os.chdir(REPO_ROOT)
            os.execve(str(PARLEY), [str(PARLEY), "admin", *create_admin_args()], env)
        finally:
            os._exit(127)  # never return into pytest from the forked child
    transcript = ""
    try:
        transcript += read_until(terminal, "Password for the admin account: ")
        os.write(terminal, (STRONG_PASSWORD + "\n").encode())
        transcript += read_until(terminal, "Repeat the password: ")
        os.write(terminal, (STRONG_PASSWORD + "\n").encode())
        transcript += read_until(terminal, "roles user+admin")
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(terminal)
    assert os.waitstatus_to_exitcode(status) == 0, transcript
    assert STRONG_PASSWORD not in transcript  # getpass turned echo off
    assert f"created admin {ADMIN_EMAIL}" in transcript


def read_until(descriptor: int, text: str, *, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
    seen = ""
    deadline = time.monotonic() + timeout_s
    while text not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {text!r} on the terminal; saw {seen!r}")
        ready, _, _ = select.select([descriptor], [], [], remaining)
        if ready:
            try:
                chunk = os.read(descriptor, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the terminal closed before {text!r}; saw {seen!r}")
            seen += chunk.decode(errors="replace")
    return seen


# ---- rotate-signing-key ----------------------------------------------------------------------------

NEW_KID = re.compile(r"new kid:\s+(\S+)")
PREVIOUS_KID = re.compile(r"previous kid:\s+(\S+)")


async def test_rotation_adds_a_key_and_retires_the_previous_one(target: Target, opened: OpenDatabase) -> None:
    first = await parley_admin("rotate-signing-key", env=target.env)
    assert first.returncode == 0, first.stderr
    assert "previous kid: none" in first.stdout
    [only] = await opened.signing_keys()
    assert NEW_KID.search(first.stdout)[1] == only.kid  # type: ignore[index]

    second = await parley_admin("rotate-signing-key", env=target.env)
    assert second.returncode == 0, second.stderr
    new_kid = NEW_KID.search(second.stdout)[1]  # type: ignore[index]
    assert PREVIOUS_KID.search(second.stdout)[1] == only.kid  # type: ignore[index]
    assert "stays in the JWKS until about " in second.stdout
    assert "930s" in second.stdout  # the default 900 s access-token TTL + 30 s key refresh
    old, new = await opened.signing_keys()
    assert (old.kid, new.kid) == (only.kid, new_kid)
    assert old.retired_at is not None
    assert new.retired_at is None


@pytest.mark.postgres
async def test_without_a_kek_outside_embedded_mode_it_refuses(postgres_url: str, tmp_path: Path) -> None:
    env = {"PARLEY_DATA_DIR": str(tmp_path / "data"), "PARLEY_DATABASE_URL": postgres_url}
    result = await parley_admin("rotate-signing-key", env=env)
    assert result.returncode == 2
    assert "PARLEY_AUTH_KEY_ENCRYPTION_KEY" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_different_kek_is_refused_before_anything_is_stored(
    target: Target, opened: OpenDatabase
) -> None:
    assert (await parley_admin("rotate-signing-key", env=target.env)).returncode == 0
    before = [key.kid for key in await opened.signing_keys()]

    wrong = await parley_admin(
        "rotate-signing-key", env=target.with_env(PARLEY_AUTH_KEY_ENCRYPTION_KEY=generate_kek())
    )
    assert wrong.returncode == 2
    assert "cannot decrypt signing key" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    assert [key.kid for key in await opened.signing_keys()] == before


# ---- against a running `parley up` -----------------------------------------------------------------


@pytest.mark.envoy
async def test_a_rotation_under_a_running_parley_up_keeps_old_tokens_valid(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {"PARLEY_DATA_DIR": str(data_dir)}
    ports = EmbeddedPorts()
    up = ParleyProcess(["up"], env={**child_environment(env), **ports.env()}, log_path=tmp_path / "up.log")
    up.start()
    try:
        base = f"http://127.0.0.1:{ports.http}"
        await up.wait_for_http_status(f"{base}/healthz", timeout_s=60)
        async with httpx.AsyncClient(base_url=base, timeout=10.0) as gateway:
            # The admin made by the CLI while the server runs can sign in and use the admin API.
            created = await parley_admin(
                *create_admin_args(), env={**env, "PARLEY_ADMIN_PASSWORD": STRONG_PASSWORD}
            )
            assert created.returncode == 0, created.stderr
            before = await sign_in(gateway)
            old_kid = jwt.get_unverified_header(before)["kid"]
            listed = await gateway.get("/v1/admin/users", headers=bearer(before))
            assert listed.status_code == 200, listed.text
            assert [key["kid"] for key in (await gateway.get("/.well-known/jwks.json")).json()["keys"]] == [
                old_kid
            ]

            rotated = await parley_admin("rotate-signing-key", env=env)
            assert rotated.returncode == 0, rotated.stderr
            new_kid = NEW_KID.search(rotated.stdout)[1]  # type: ignore[index]
            assert PREVIOUS_KID.search(rotated.stdout)[1] == old_kid  # type: ignore[index]

            # GetJwks answers from memory for up to JWKS_CACHE_S, so the new key shows within that.
            async def published_kids() -> list[str] | None:
                kids = [key["kid"] for key in (await gateway.get("/.well-known/jwks.json")).json()["keys"]]
                return kids if len(kids) > 1 else None

            kids = await eventually(
                published_kids, what="a second key in the JWKS", timeout_s=JWKS_CACHE_S + 5, interval_s=0.25
            )
            assert kids == [new_kid, old_kid]  # active first
            me = await gateway.get("/v1/users/me", headers=bearer(before))
            assert me.status_code == 200, me.text
            assert me.json()["user"]["email"] == ADMIN_EMAIL

            # The server re-reads the active key at most every 30 s; from then on it signs with the new one.
            after = await signed_in_with_kid(gateway, new_kid, timeout_s=45)
            await until_ok(gateway, "/v1/users/me", after)
            assert (await gateway.get("/v1/users/me", headers=bearer(before))).status_code == 200
    finally:
        stopped = await up.stop()
        up.kill()
    assert stopped == 0, up.output()[-4000:]


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def sign_in(gateway: httpx.AsyncClient) -> str:
    response = await gateway.post("/v1/auth/login", json={"email": ADMIN_EMAIL, "password": STRONG_PASSWORD})
    assert response.status_code == 200, response.text
    token: str = response.json()["tokens"]["access_token"]
    return token


async def signed_in_with_kid(gateway: httpx.AsyncClient, kid: str, *, timeout_s: float) -> str:
    async def token_with_kid() -> str | None:
        token = await sign_in(gateway)
        return token if jwt.get_unverified_header(token)["kid"] == kid else None

    return await eventually(
        token_with_kid, what=f"a sign-in whose token carries kid {kid}", timeout_s=timeout_s, interval_s=1.0
    )


async def until_ok(gateway: httpx.AsyncClient, path: str, token: str, *, timeout_s: float = 15.0) -> None:
    """The verifier refetches the JWKS for an unknown kid at most every 5 s, so allow a few tries."""
    last_answer = ""

    async def answered_ok() -> bool:
        nonlocal last_answer
        response = await gateway.get(path, headers=bearer(token))
        last_answer = f"{response.status_code} {response.text}"
        return response.status_code == 200

    await eventually(
        answered_ok,
        what=f"GET {path} answering 200",
        timeout_s=timeout_s,
        interval_s=0.5,
        details=lambda: f"last answer: {last_answer}",
    )
