"""Contract of the migrations: same result on SQLite and PostgreSQL, idempotent, and a schema that is
the models' in every detail, through which rows round-trip."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.util import CommandError
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    DefaultClause,
    Dialect,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    bindparam,
    delete,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.schema import ScalarElementColumnDefault

from services.common.clock import utc_now
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
from services.common.models import UTCDateTime

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


# ---- the migrated schema, checked against the models ---------------------------------------------
#
# `test_models_match_the_migrations` runs Alembic's `compare_metadata`: it finds missing and extra
# tables, columns, indexes and constraints, and differing types, nullability and foreign-key options.
# It does not compare partial-index predicates, server defaults, primary-key names or SQLite's
# AUTOINCREMENT, and it cannot say whether rows written through the tables read back the same. The
# tests below check the whole shape of every table on both databases, then write and read real rows.


@dataclass
class ColumnShape:
    sql_type: str  # as the dialect spells it in DDL
    nullable: bool
    server_default: str | None  # normalized SQL


@dataclass
class ForeignKeyShape:
    columns: tuple[str, ...]
    referred_table: str
    referred_columns: tuple[str, ...]
    ondelete: str | None


@dataclass
class IndexShape:
    columns: tuple[str, ...]
    unique: bool
    where: str | None  # the normalized predicate of a partial index


@dataclass
class TableShape:
    columns: dict[str, ColumnShape]
    primary_key: tuple[str | None, tuple[str, ...]]  # name, columns
    foreign_keys: dict[str | None, ForeignKeyShape]
    unique_constraints: dict[str | None, tuple[str, ...]]
    indexes: dict[str | None, IndexShape]
    sqlite_autoincrement: bool


def _normalized_sql(sql: object) -> str | None:
    """Lower case, single spaces, no parentheses: PostgreSQL gives back `((a IS NULL) AND (b IS NULL))`
    for the `a IS NULL AND b IS NULL` it was given."""
    if sql is None:
        return None
    return " ".join(str(sql).replace("(", " ").replace(")", " ").split()).lower() or None


def _declared_server_default(column: Column[Any], dialect: Dialect) -> str | None:
    if column is column.table.autoincrement_column and dialect.name == "postgresql":
        # BIGSERIAL: the column's sequence, named by PostgreSQL.
        return _normalized_sql(f"nextval('{column.table.name}_{column.name}_seq'::regclass)")
    default = column.server_default
    if default is None:
        return None
    assert isinstance(default, DefaultClause), f"{column}: only plain server defaults are checked here"
    arg = default.arg
    return _normalized_sql(arg if isinstance(arg, str) else arg.compile(dialect=dialect))


def _name(name: object) -> str | None:
    """A constraint's or index's name; SQLAlchemy's placeholder for "none given" is not a str."""
    return name if isinstance(name, str) else None


def _uses_sqlite_autoincrement(table: Table) -> bool:
    return bool(table.dialect_options["sqlite"]["autoincrement"])


def _declared_shape(table: Table, dialect: Dialect) -> TableShape:
    """What the model says the table is, as `dialect` spells it."""
    # SQLite declares an AUTOINCREMENT key inline (`INTEGER PRIMARY KEY AUTOINCREMENT`): no name.
    inline_key = dialect.name == "sqlite" and _uses_sqlite_autoincrement(table)
    return TableShape(
        columns={
            column.name: ColumnShape(
                sql_type=column.type.compile(dialect=dialect),
                nullable=bool(column.nullable),
                server_default=_declared_server_default(column, dialect),
            )
            for column in table.columns
        },
        primary_key=(
            None if inline_key else _name(table.primary_key.name),
            tuple(column.name for column in table.primary_key.columns),
        ),
        foreign_keys={
            _name(constraint.name): ForeignKeyShape(
                columns=tuple(element.parent.name for element in constraint.elements),
                referred_table=constraint.referred_table.name,
                referred_columns=tuple(element.column.name for element in constraint.elements),
                ondelete=constraint.ondelete.upper() if constraint.ondelete else None,
            )
            for constraint in table.foreign_key_constraints
        },
        unique_constraints={
            _name(constraint.name): tuple(column.name for column in constraint.columns)
            for constraint in table.constraints
            if isinstance(constraint, UniqueConstraint)
        },
        indexes={
            _name(index.name): IndexShape(
                columns=tuple(column.name for column in index.columns),
                unique=bool(index.unique),
                where=_normalized_sql(index.dialect_kwargs.get(f"{dialect.name}_where")),
            )
            for index in table.indexes
        },
        sqlite_autoincrement=dialect.name == "sqlite" and _uses_sqlite_autoincrement(table),
    )


def _reflected_shape(connection: Connection, table_name: str) -> TableShape:
    """What the database says the table is."""
    inspector = inspect(connection)
    dialect = connection.dialect
    primary_key = inspector.get_pk_constraint(table_name)
    create_sql = ""
    if dialect.name == "sqlite":
        create_sql = connection.execute(
            text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = :name"), {"name": table_name}
        ).scalar_one()
    return TableShape(
        columns={
            column["name"]: ColumnShape(
                sql_type=column["type"].compile(dialect=dialect),
                nullable=column["nullable"],
                server_default=_normalized_sql(column.get("default")),
            )
            for column in inspector.get_columns(table_name)
        },
        primary_key=(primary_key["name"], tuple(primary_key["constrained_columns"])),
        foreign_keys={
            foreign_key["name"]: ForeignKeyShape(
                columns=tuple(foreign_key["constrained_columns"]),
                referred_table=foreign_key["referred_table"],
                referred_columns=tuple(foreign_key["referred_columns"]),
                ondelete=(foreign_key.get("options", {}).get("ondelete") or "").upper() or None,
            )
            for foreign_key in inspector.get_foreign_keys(table_name)
        },
        unique_constraints={
            unique["name"]: tuple(unique["column_names"])
            for unique in inspector.get_unique_constraints(table_name)
        },
        indexes={
            index["name"]: IndexShape(
                columns=tuple(str(name) for name in index["column_names"]),
                unique=bool(index["unique"]),
                where=_normalized_sql(index.get("dialect_options", {}).get(f"{dialect.name}_where")),
            )
            for index in inspector.get_indexes(table_name)
            # PostgreSQL lists the index behind each unique constraint too; those are checked above.
            if "duplicates_constraint" not in index
        },
        sqlite_autoincrement="AUTOINCREMENT" in create_sql.upper(),
    )


async def test_every_table_has_the_columns_keys_constraints_and_indexes_of_its_model(
    database_url: str,
) -> None:
    await upgrade_async(database_url)
    metadata = load_model_metadata()

    def shapes(connection: Connection) -> tuple[set[str], dict[str, TableShape], dict[str, TableShape]]:
        present = set(inspect(connection).get_table_names()) - {"alembic_version"}
        declared = {
            table.name: _declared_shape(table, connection.dialect) for table in metadata.sorted_tables
        }
        reflected = {name: _reflected_shape(connection, name) for name in declared.keys() & present}
        return present, declared, reflected

    present, declared, reflected = await _inspect(database_url, shapes)
    assert present == set(declared)
    for name, shape in declared.items():
        assert reflected[name] == shape, f"table {name} is not what its model says"


async def test_the_outbox_indexes_hold_only_unrelayed_rows(database_url: str) -> None:
    await upgrade_async(database_url)
    shape: TableShape = await _inspect(
        database_url, lambda connection: _reflected_shape(connection, "outbox_events")
    )
    assert shape.indexes == {
        "ix_outbox_events_unrelayed_immediate": IndexShape(
            ("sequence",), unique=False, where="relayed_at is null and deliver_after is null"
        ),
        "ix_outbox_events_unrelayed_delayed": IndexShape(
            ("deliver_after",), unique=False, where="relayed_at is null and deliver_after is not null"
        ),
    }


def test_every_constraint_and_index_is_named_by_the_naming_convention() -> None:
    for table in load_model_metadata().sorted_tables:
        name = table.name
        assert table.primary_key.name == f"pk_{name}"
        for foreign_key in table.foreign_key_constraints:
            first_column = foreign_key.elements[0].parent.name
            assert foreign_key.name == f"fk_{name}_{first_column}_{foreign_key.referred_table.name}"
        for constraint in table.constraints:
            if isinstance(constraint, UniqueConstraint):
                assert (
                    constraint.name == f"uq_{name}_{'_'.join(column.name for column in constraint.columns)}"
                )
        for index in table.indexes:
            by_columns = f"ix_{name}_{'_'.join(column.name for column in index.columns)}"
            # A partial index is named for the rows it holds, which its columns do not say.
            partial = any(key.endswith("_where") for key in index.dialect_kwargs)
            assert index.name == by_columns or (partial and str(index.name).startswith(f"ix_{name}_")), index


# ---- rows through the migrated schema -----------------------------------------------------------

# A time in another zone, with microseconds: it must come back as the same instant, in UTC.
SAMPLE_TIME = datetime(2026, 3, 29, 2, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
SAMPLE_JSON = {"list": [1, 2.5, "three", None, True], "nested": {"clé": "✓"}}
SAMPLE_BYTES = bytes(range(256))
# Beyond a 32-bit integer and a double's 53-bit mantissa: a narrower or floating column would lose it.
SAMPLE_BIG_INTEGER = 2**53 + 1


class _RollbackError(Exception):
    """Raised to leave a unit of work without committing it."""


def _sample_value(column: Column[Any], serial: int) -> object:
    """A value for `column` that only a faithful round trip returns unchanged."""
    kind = column.type
    if isinstance(kind, UTCDateTime):
        return SAMPLE_TIME + timedelta(minutes=serial)
    if isinstance(kind, JSON):
        return {**SAMPLE_JSON, "serial": serial}
    if isinstance(kind, LargeBinary):
        return SAMPLE_BYTES
    if isinstance(kind, BigInteger):
        return SAMPLE_BIG_INTEGER + serial
    if isinstance(kind, Integer):
        return 2**31 - 1 - serial
    if isinstance(kind, Boolean):
        return True
    if isinstance(kind, String):  # Text too
        value = f"{serial}·{column.name}·✓"
        return value[: kind.length] if kind.length else value
    raise AssertionError(f"no sample value for {column} of type {kind!r}: add one to _sample_value")


def _primary_key_of(table: Table, row: dict[str, object]) -> list[Any]:
    return [column == row[column.name] for column in table.primary_key.columns]


async def _write_a_row_per_table(
    db: Database, metadata: MetaData, *, leave_to_the_database: bool = False
) -> dict[str, dict[str, object]]:
    """One row in every table, parents first, children pointing at them; returns what was written.

    By default through the table (SQLAlchemy Core, every column given). With
    `leave_to_the_database`, as plain SQL leaving out the columns the database defaults, as a
    migration's data step or an operator would write it.
    """
    written: dict[str, dict[str, object]] = {}
    async with db.unit_of_work() as session:
        preparer = session.get_bind().dialect.identifier_preparer
        for serial, table in enumerate(metadata.sorted_tables):
            generated = table.autoincrement_column
            row = {
                column.name: _sample_value(column, serial)
                for column in table.columns
                if column is not generated
                and not (leave_to_the_database and column.server_default is not None)
            }
            for foreign_key in table.foreign_key_constraints:
                for element in foreign_key.elements:
                    row[element.parent.name] = written[element.column.table.name][element.column.name]
            if leave_to_the_database:
                columns = [table.c[name] for name in row]
                returning = f" RETURNING {preparer.quote(generated.name)}" if generated is not None else ""
                plain_sql = text(
                    f"INSERT INTO {preparer.quote(table.name)} "
                    f"({', '.join(preparer.quote(column.name) for column in columns)}) "
                    f"VALUES ({', '.join(f':{column.name}' for column in columns)}){returning}"
                ).bindparams(*(bindparam(column.name, type_=column.type) for column in columns))
                result = await session.execute(plain_sql, row)
            else:
                through_the_table = insert(table).values(row)
                if generated is not None:
                    through_the_table = through_the_table.returning(generated)
                result = await session.execute(through_the_table)
            if generated is not None:
                row[generated.name] = result.scalar_one()
            written[table.name] = row
    return written


async def test_a_row_written_to_every_table_reads_back_the_same(database_url: str) -> None:
    await upgrade_async(database_url)
    metadata = load_model_metadata()
    db = Database(database_url)
    try:
        written = await _write_a_row_per_table(db, metadata)
        async with db.unit_of_work(read_only=True) as session:
            for table in metadata.sorted_tables:
                row = (
                    await session.execute(select(table).where(*_primary_key_of(table, written[table.name])))
                ).one()
                read = dict(row._mapping)
                assert read == written[table.name], f"{table.name} changed on the way"
                times = [value for value in read.values() if isinstance(value, datetime)]
                assert all(value.tzinfo is UTC for value in times), f"{table.name}: {times}"
    finally:
        await db.dispose()


async def test_server_defaults_fill_what_plain_sql_leaves_out(database_url: str) -> None:
    await upgrade_async(database_url)
    metadata = load_model_metadata()
    defaulted = [
        column
        for table in metadata.sorted_tables
        for column in table.columns
        if column.server_default is not None
    ]
    assert defaulted, "no server defaults: this test checks nothing"
    db = Database(database_url)
    try:
        before = utc_now()
        written = await _write_a_row_per_table(db, metadata, leave_to_the_database=True)
        after = utc_now()
        async with db.unit_of_work(read_only=True) as session:
            for column in defaulted:
                table = column.table
                value = await session.scalar(
                    select(column).where(*_primary_key_of(table, written[table.name]))
                )
                python_default = column.default
                # The database's default must agree with the one the model applies in Python.
                if isinstance(value, datetime):
                    assert value.tzinfo is UTC, column
                    # SQLite's CURRENT_TIMESTAMP has whole seconds.
                    assert before - timedelta(seconds=1) <= value <= after, column
                elif isinstance(python_default, ScalarElementColumnDefault):
                    assert value == python_default.arg, column
                else:
                    assert value is not None, column
    finally:
        await db.dispose()


async def test_foreign_keys_do_on_delete_what_their_models_declare(database_url: str) -> None:
    await upgrade_async(database_url)
    metadata = load_model_metadata()
    foreign_keys = [
        constraint for table in metadata.sorted_tables for constraint in table.foreign_key_constraints
    ]
    assert foreign_keys, "no foreign keys: this test checks nothing"
    db = Database(database_url)
    try:
        written = await _write_a_row_per_table(db, metadata)
        for foreign_key in foreign_keys:
            parent, child = foreign_key.referred_table, foreign_key.table
            action = (foreign_key.ondelete or "NO ACTION").upper()
            # Each in a transaction of its own, rolled back, so every check starts from every row.
            with pytest.raises(_RollbackError):
                async with db.unit_of_work() as session:
                    delete_parent = delete(parent).where(*_primary_key_of(parent, written[parent.name]))
                    if action in {"NO ACTION", "RESTRICT"}:
                        with pytest.raises(IntegrityError):
                            await session.execute(delete_parent)
                        raise _RollbackError
                    await session.execute(delete_parent)
                    remaining = (
                        await session.execute(
                            select(child).where(*_primary_key_of(child, written[child.name]))
                        )
                    ).one_or_none()
                    if action == "CASCADE":
                        assert remaining is None, foreign_key
                    elif action == "SET NULL":
                        assert remaining is not None, foreign_key
                        assert all(remaining._mapping[name] is None for name in foreign_key.column_keys)
                    else:
                        raise AssertionError(
                            f"ON DELETE {action} of {foreign_key.name} is not checked here: add it"
                        )
                    raise _RollbackError
    finally:
        await db.dispose()
