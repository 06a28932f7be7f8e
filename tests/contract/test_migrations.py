"""Contract of the migrations: same result on SQLite and PostgreSQL, idempotent, and matching the models."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.util import CommandError
from sqlalchemy import Connection, String, inspect, text

from services.common.db import Database, create_engine_for
from services.common.migrate import (
    COMMON_VERSIONS_DIR,
    create_revision,
    current_heads,
    load_model_metadata,
    script_heads,
    upgrade,
    upgrade_async,
)

# A branch of its own in a temporary version location, as a service's `migrations/versions` is.
# Revision 2 rebuilds a table other rows point at, which SQLite can only do in batch mode with
# foreign keys off for the duration.
EXTRA_BRANCH_REVISIONS = {
    "2026_01_01_aaaa00000001_gizmos.py": '''
"""gizmos"""
import sqlalchemy as sa
from alembic import op

revision = "aaaa00000001"
down_revision = None
branch_labels = ("extra",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "extra_gizmos",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(20), nullable=False),
    )
    op.create_table(
        "extra_parts",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "gizmo_id",
            sa.String(36),
            sa.ForeignKey("extra_gizmos.id", name="fk_extra_parts_gizmo_id_extra_gizmos", ondelete="CASCADE"),
            nullable=False,
        ),
    )
    op.execute("INSERT INTO extra_gizmos (id, name) VALUES ('g1', 'first')")
    op.execute("INSERT INTO extra_parts (id, gizmo_id) VALUES ('p1', 'g1')")


def downgrade() -> None:
    op.drop_table("extra_parts")
    op.drop_table("extra_gizmos")
''',
    "2026_01_02_aaaa00000002_longer_gizmo_names.py": '''
"""longer gizmo names"""
import sqlalchemy as sa
from alembic import op

revision = "aaaa00000002"
down_revision = "aaaa00000001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("extra_gizmos") as batch:
        batch.alter_column("name", type_=sa.String(200), existing_type=sa.String(20), existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("extra_gizmos") as batch:
        batch.alter_column("name", type_=sa.String(20), existing_type=sa.String(200), existing_nullable=False)
''',
}


async def _inspect(url: str, function: Any) -> Any:
    engine = create_engine_for(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(function)
    finally:
        await engine.dispose()


def _table_names(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


def _schema_diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, load_model_metadata()))


async def test_upgrade_creates_the_schema_and_is_idempotent(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="alembic")
    assert await asyncio.to_thread(current_heads, database_url) == set()

    await upgrade_async(database_url)
    assert "Running upgrade" in caplog.text
    tables = await _inspect(database_url, _table_names)
    assert {"alembic_version", "outbox_events"} <= tables
    heads = await asyncio.to_thread(current_heads, database_url)
    assert heads == script_heads()

    caplog.clear()
    await upgrade_async(database_url)
    assert "Running upgrade" not in caplog.text
    assert await asyncio.to_thread(current_heads, database_url) == heads
    assert await _inspect(database_url, _table_names) == tables


async def test_models_match_the_migrations(database_url: str) -> None:
    await upgrade_async(database_url)
    diff = await _inspect(database_url, _schema_diff)
    assert diff == [], "models and migrations disagree; write a migration for:\n" + "\n".join(map(str, diff))


async def test_an_additional_version_location_is_its_own_branch(database_url: str, tmp_path: Path) -> None:
    versions = tmp_path / "extra" / "migrations" / "versions"
    versions.mkdir(parents=True)
    for name, source in EXTRA_BRANCH_REVISIONS.items():
        (versions / name).write_text(source.lstrip())

    await upgrade_async(database_url, extra_version_locations=[versions])

    heads = await asyncio.to_thread(current_heads, database_url)
    assert heads == script_heads(extra_version_locations=[versions])
    assert "aaaa00000002" in heads
    assert len(heads) >= 2  # common's head and the extra branch's

    def gizmo_name_length_and_parts(connection: Connection) -> tuple[int, list[tuple[str, str]]]:
        columns = {column["name"]: column for column in inspect(connection).get_columns("extra_gizmos")}
        parts = connection.execute(text("SELECT id, gizmo_id FROM extra_parts")).all()
        name_type = columns["name"]["type"]
        assert isinstance(name_type, String)
        return name_type.length or 0, [(str(row[0]), str(row[1])) for row in parts]

    length, parts = await _inspect(database_url, gizmo_name_length_and_parts)
    assert length == 200
    assert parts == [("p1", "g1")]  # the rebuild neither failed on nor cascaded into the children

    # Code that does not know a revision the database is at refuses to touch it.
    with pytest.raises(CommandError, match="aaaa00000002"):
        await upgrade_async(database_url)


def test_upgrade_refuses_to_block_an_event_loop(tmp_path: Path) -> None:
    async def call_from_async_code() -> None:
        upgrade(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}")

    with pytest.raises(RuntimeError, match="upgrade_async"):
        asyncio.run(call_from_async_code())


async def test_simultaneous_upgrades_in_one_process_all_succeed(database_url: str) -> None:
    await asyncio.gather(*(upgrade_async(database_url) for _ in range(3)))
    assert await asyncio.to_thread(current_heads, database_url) == script_heads()


async def test_simultaneous_upgrades_from_several_processes_all_succeed(database_url: str) -> None:
    # What replicas starting together do: each process migrates, the database lock orders them.
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.common.migrate",
            "--url",
            database_url,
            "upgrade",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        for _ in range(3)
    ]
    outputs = [await process.communicate() for process in processes]
    for process, (output, _) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output.decode()
    assert await asyncio.to_thread(current_heads, database_url) == script_heads()


async def test_the_migrated_schema_serves_the_database(database_url: str) -> None:
    await upgrade_async(database_url)
    db = Database(database_url)
    try:
        await db.ping()
    finally:
        await db.dispose()


def test_create_revision_starts_a_branch_then_extends_it(tmp_path: Path) -> None:
    versions = tmp_path / "billing_like" / "migrations" / "versions"
    first = create_revision("plans", branch="testbranch", versions_dir=versions)
    second = create_revision("plan prices", branch="testbranch", versions_dir=versions)

    assert first.parent == versions
    assert re.fullmatch(r"\d{4}_\d{2}_\d{2}_[0-9a-f]{12}_plans\.py", first.name)
    assert re.fullmatch(r"\d{4}_\d{2}_\d{2}_[0-9a-f]{12}_plan_prices\.py", second.name)
    first_source = first.read_text()
    second_source = second.read_text()
    assert "down_revision: str | Sequence[str] | None = None" in first_source
    assert "branch_labels: str | Sequence[str] | None = ('testbranch',)" in first_source.replace('"', "'")
    first_id = re.search(r'^revision: str = "([0-9a-f]+)"', first_source, re.MULTILINE)
    assert first_id is not None
    assert f'down_revision: str | Sequence[str] | None = "{first_id.group(1)}"' in second_source
    assert not any(path.parent == COMMON_VERSIONS_DIR for path in (first, second))
