"""The data dir is owner-only: a new one is made 0700, and an earlier version's is tightened."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.data_dir import prepare_data_dir


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def everyday_umask() -> Iterator[None]:
    """The umask most shells have (022), so files come out world-readable unless told otherwise."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("everyday_umask")
def test_a_new_data_dir_is_made_0700_with_its_parents(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "var"
    assert prepare_data_dir(data_dir) == data_dir.resolve()
    assert mode_of(data_dir) == 0o700


@pytest.mark.usefixtures("everyday_umask")
def test_an_earlier_versions_data_dir_is_tightened_without_following_links(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    (data_dir / "mail").mkdir(parents=True, mode=0o755)
    (data_dir / "envoy" / "nested").mkdir(parents=True, mode=0o775)
    files = {
        data_dir / "parley.db": 0o644,
        data_dir / "parley.db-wal": 0o664,
        data_dir / "mail" / "reset.eml": 0o644,
        data_dir / "envoy" / "nested" / "run.sh": 0o755,
        data_dir / "envoy" / "only-mine": 0o600,
        data_dir / "read-only": 0o444,
    }
    for path, mode in files.items():
        path.write_text("x")
        path.chmod(mode)
    data_dir.chmod(0o755)
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    outside.chmod(0o644)
    (data_dir / "link").symlink_to(outside)
    (data_dir / "linked-dir").symlink_to(tmp_path, target_is_directory=True)
    outside_dir_mode = mode_of(tmp_path)

    prepare_data_dir(data_dir)

    assert {path: mode_of(path) for path in files} == {
        data_dir / "parley.db": 0o600,
        data_dir / "parley.db-wal": 0o600,
        data_dir / "mail" / "reset.eml": 0o600,
        data_dir / "envoy" / "nested" / "run.sh": 0o700,  # only taken away, never given
        data_dir / "envoy" / "only-mine": 0o600,
        data_dir / "read-only": 0o400,
    }
    assert [mode_of(path) for path in (data_dir, data_dir / "mail", data_dir / "envoy" / "nested")] == [
        0o700
    ] * 3
    # What the links point at is outside the data dir and stays as it was.
    assert (mode_of(outside), mode_of(tmp_path)) == (0o644, outside_dir_mode)


@pytest.mark.usefixtures("everyday_umask")
def test_tightening_twice_changes_nothing_more(tmp_path: Path) -> None:
    data_dir = prepare_data_dir(tmp_path / "var")
    (data_dir / "parley.db").write_text("x")
    prepare_data_dir(data_dir)
    prepare_data_dir(data_dir)
    assert (mode_of(data_dir), mode_of(data_dir / "parley.db")) == (0o700, 0o600)
