"""Schema migrations (Alembic), configured in code: no alembic.ini.

Each service owns its migrations. `services/common/migrations/versions` is the "common" branch
(the outbox); every `services/<service>/migrations/versions` directory that exists is another
version location whose revisions form the branch labelled `<service>`. `upgrade(url)` applies the
heads of every branch. Revision files are date-named (`2026_11_26_<rev>_<slug>.py`).

Start a service's branch (or add a revision to one) with
`python -m services.common.migrate revision --branch billing -m "plans"`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, MetaData

from services.common.db import create_engine_for

logger = logging.getLogger(__name__)

SERVICES_DIR: Final = Path(__file__).resolve().parent.parent
MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"
COMMON_VERSIONS_DIR: Final = MIGRATIONS_DIR / "versions"
COMMON_BRANCH: Final = "common"

# `Config.attributes` key through which the database URL reaches env.py (attributes, not an ini
# option, so a password containing '%' needs no escaping).
DATABASE_URL_ATTRIBUTE: Final = "parley.database_url"

# Key of the PostgreSQL advisory lock that serializes migration runs (several replicas may start at once).
MIGRATION_ADVISORY_LOCK_KEY: Final = int.from_bytes(
    hashlib.sha256(b"parley.migrations").digest()[:8], "big", signed=True
)

# Alembic installs `alembic.context` and `alembic.op` as module-level proxies for the duration of a
# command, so two commands at once in one process (e.g. two upgrades in worker threads) corrupt each
# other. This lock is process-wide because that state is; across processes the database locks serialize.
_ALEMBIC_COMMAND_LOCK: Final = threading.Lock()

FILE_TEMPLATE: Final = "%(year)d_%(month).2d_%(day).2d_%(rev)s_%(slug)s"


def service_version_locations(services_dir: Path = SERVICES_DIR) -> list[Path]:
    """Every `services/<service>/migrations/versions` directory that exists, common's first."""
    found = sorted(
        path
        for path in services_dir.glob("*/migrations/versions")
        if path.is_dir() and path.resolve() != COMMON_VERSIONS_DIR
    )
    return [COMMON_VERSIONS_DIR, *found]


def _ini_value(value: str) -> str:
    # Config options go through configparser interpolation, where '%' is special.
    return value.replace("%", "%%")


def alembic_config(
    database_url: str | None = None,
    *,
    extra_version_locations: Sequence[Path] = (),
) -> Config:
    """The Alembic configuration, built in code; `extra_version_locations` adds branches (tests use it)."""
    locations = service_version_locations()
    locations += [
        Path(path).resolve() for path in extra_version_locations if Path(path).resolve() not in locations
    ]
    config = Config()
    config.set_main_option("script_location", _ini_value(str(MIGRATIONS_DIR)))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", _ini_value(os.pathsep.join(str(path) for path in locations)))
    config.set_main_option("file_template", _ini_value(FILE_TEMPLATE))
    config.set_main_option("timezone", "UTC")
    config.set_main_option("truncate_slug_length", "40")
    # New revision files come out lint-clean and formatted, like the rest of the tree.
    config.set_section_option("post_write_hooks", "hooks", "ruff_fix ruff_format")
    for hook, options in (("ruff_fix", "check --fix --quiet"), ("ruff_format", "format --quiet")):
        config.set_section_option("post_write_hooks", f"{hook}.type", "module")
        config.set_section_option("post_write_hooks", f"{hook}.module", "ruff")
        config.set_section_option(
            "post_write_hooks", f"{hook}.options", f"{options} REVISION_SCRIPT_FILENAME"
        )
    if database_url is not None:
        config.attributes[DATABASE_URL_ATTRIBUTE] = database_url
    return config


def load_model_metadata() -> MetaData:
    """The metadata of every table: common's, plus each service's `services.<service>.models` module."""
    importlib.import_module("services.common.outbox")
    importlib.import_module("services.common.processed_events")
    importlib.import_module("services.common.dead_letters")
    for versions in service_version_locations()[1:]:
        service = versions.parent.parent.name
        module = f"services.{service}.models"
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
    from services.common.models import Base  # noqa: PLC0415 - after the imports that register tables on it.

    return Base.metadata


def _refuse_inside_event_loop(function: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"{function}() blocks and runs its own event loop; from async code use upgrade_async() "
        "or asyncio.to_thread()"
    )


def upgrade(
    database_url: str,
    target: str = "heads",
    *,
    extra_version_locations: Sequence[Path] = (),
) -> None:
    """Migrate the database to `target` (every branch's head by default); a no-op when already there.

    Blocking, with its own event loop: call it from a thread, or use `upgrade_async`. Safe to run
    from several processes at once (PostgreSQL takes an advisory lock, SQLite its write lock).
    """
    _refuse_inside_event_loop("upgrade")
    config = alembic_config(database_url, extra_version_locations=extra_version_locations)
    with _ALEMBIC_COMMAND_LOCK:
        command.upgrade(config, target)


async def upgrade_async(
    database_url: str,
    target: str = "heads",
    *,
    extra_version_locations: Sequence[Path] = (),
) -> None:
    """`upgrade`, run in a worker thread so the caller's event loop keeps serving."""
    await asyncio.to_thread(upgrade, database_url, target, extra_version_locations=extra_version_locations)


def current_heads(database_url: str) -> set[str]:
    """The revisions the database is at, one per branch (empty for a database never migrated).

    Blocking, with its own event loop, like `upgrade`.
    """
    _refuse_inside_event_loop("current_heads")

    def read(connection: Connection) -> set[str]:
        return set(MigrationContext.configure(connection).get_current_heads())

    async def run() -> set[str]:
        engine = create_engine_for(database_url)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(read)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def script_heads(*, extra_version_locations: Sequence[Path] = ()) -> set[str]:
    """The head revision of every branch in the migration scripts (what `upgrade` brings a database to)."""
    script = ScriptDirectory.from_config(alembic_config(extra_version_locations=extra_version_locations))
    return set(script.get_heads())


def create_revision(
    message: str,
    *,
    branch: str,
    versions_dir: Path | None = None,
    database_url: str | None = None,
    autogenerate: bool = False,
) -> Path:
    """Write a new revision file on `branch` and return its path.

    The branch's first revision starts it (`down_revision = None`, `branch_labels = (branch,)`) in
    `services/<branch>/migrations/versions` unless `versions_dir` says otherwise. `autogenerate`
    compares every model with the database at `database_url` (which must be at the heads), so it
    can propose changes to other services' tables too: keep only this branch's.
    """
    if versions_dir is None:
        versions_dir = (
            COMMON_VERSIONS_DIR
            if branch == COMMON_BRANCH
            else SERVICES_DIR / branch / "migrations" / "versions"
        )
    versions_dir.mkdir(parents=True, exist_ok=True)
    config = alembic_config(database_url, extra_version_locations=[versions_dir])
    script = ScriptDirectory.from_config(config)
    existing_labels = {label for revision in script.walk_revisions() for label in revision.branch_labels}
    starts_branch = branch not in existing_labels
    with _ALEMBIC_COMMAND_LOCK:
        written = command.revision(
            config,
            message=message,
            autogenerate=autogenerate,
            head="base" if starts_branch else f"{branch}@head",
            branch_label=branch if starts_branch else None,
            version_path=str(versions_dir),
        )
    if written is None or isinstance(written, list):
        raise RuntimeError("alembic wrote no single revision")
    return Path(written.path)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m services.common.migrate {upgrade,heads,revision}`; the URL defaults to the settings'."""
    parser = argparse.ArgumentParser(prog="python -m services.common.migrate", description=__doc__)
    parser.add_argument("--url", help="database URL (default: PARLEY_DATABASE_URL or embedded SQLite)")
    commands = parser.add_subparsers(dest="command", required=True)
    upgrade_parser = commands.add_parser("upgrade", help="migrate to the heads of every branch")
    upgrade_parser.add_argument("--target", default="heads")
    commands.add_parser("heads", help="print the database's revisions and the scripts' heads")
    revision_parser = commands.add_parser("revision", help="write a new revision file")
    revision_parser.add_argument("-m", "--message", required=True)
    revision_parser.add_argument("--branch", required=True, help='"common" or a service name')
    revision_parser.add_argument("--autogenerate", action="store_true")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def database_url() -> str:
        if arguments.url:
            return str(arguments.url)
        from services.common.settings import load_settings  # noqa: PLC0415 - only when no --url is given.

        return load_settings().resolved_database_url

    if arguments.command == "upgrade":
        upgrade(database_url(), arguments.target)
    elif arguments.command == "heads":
        logger.info("database at %s", sorted(current_heads(database_url())) or "nothing (never migrated)")
        logger.info("scripts at %s", sorted(script_heads()))
    else:
        path = create_revision(
            arguments.message,
            branch=arguments.branch,
            database_url=database_url() if arguments.autogenerate else None,
            autogenerate=arguments.autogenerate,
        )
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
