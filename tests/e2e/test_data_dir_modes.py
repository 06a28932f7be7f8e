"""Files under the data dir are their owner's alone (issue 11, finding 2): the real `parley up` and
`parley migrate`, started with the usual 022 umask, leave nothing group- or world-readable, and an
earlier version's data dir (a 0644 database, mails, folders 0755) is tightened at start."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.parley_process import PARLEY, REPO_ROOT, EmbeddedPorts, ParleyProcess
from tests.support.polling import eventually_sync

pytestmark = pytest.mark.envoy

PASSWORD = "violet-harbour-lantern-42"
# The auth revision of the version before owner-only data files (any earlier schema would do).
EARLIER_AUTH_REVISION = "4f0d1e597c9e"
SHELL_UMASK = 0o022


def modes_under(data_dir: Path) -> dict[str, str]:
    """Every path under `data_dir` (itself included, as "."), with its permission bits in octal."""
    found = {".": oct(stat.S_IMODE(data_dir.lstat().st_mode))}
    for directory, subdirectories, files in os.walk(data_dir):
        for name in (*subdirectories, *files):
            path = Path(directory, name)
            found[str(path.relative_to(data_dir))] = oct(stat.S_IMODE(path.lstat().st_mode))
    return found


def owner_only(data_dir: Path) -> dict[str, str]:
    """What `modes_under` must say: 0700 for each directory, 0600 for each file."""
    return {name: oct(0o700 if (data_dir / name).is_dir() else 0o600) for name in modes_under(data_dir)}


def earlier_versions_data_dir(data_dir: Path) -> None:
    """A data dir as an earlier version left it: everything readable by every local user."""
    (data_dir / "mail").mkdir(parents=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "services.common.migrate",
            "--url",
            f"sqlite+aiosqlite:///{data_dir / 'parley.db'}",
            "upgrade",
            "--target",
            EARLIER_AUTH_REVISION,
        ],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=60,
        umask=SHELL_UMASK,
    )
    (data_dir / "mail" / "old-reset.eml").write_text(
        "Subject: reset\n\nhttp://127.0.0.1/reset-password?token=x\n"
    )
    for path, mode in [
        (data_dir, 0o755),
        (data_dir / "mail", 0o755),
        (data_dir / "parley.db", 0o644),
        (data_dir / "mail" / "old-reset.eml", 0o644),
    ]:
        path.chmod(mode)


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, httpx.Client]]:
    """`parley up` on an earlier version's data dir; its log is kept outside the data dir."""
    root = tmp_path_factory.mktemp("owner-only")
    data_dir = root / "var"
    earlier_versions_data_dir(data_dir)
    assert modes_under(data_dir)["parley.db"] == oct(0o644)
    ports = EmbeddedPorts()
    process = ParleyProcess(
        ["up"], env={**ports.env(), "PARLEY_DATA_DIR": str(data_dir)}, log_path=root / "parley.log"
    )
    previous = os.umask(SHELL_UMASK)
    try:
        process.start()
    finally:
        os.umask(previous)
    try:
        process.wait_until_http_ok(f"http://127.0.0.1:{ports.http}/healthz")
        with httpx.Client(base_url=f"http://127.0.0.1:{ports.http}", timeout=15.0) as client:
            yield data_dir, client
    finally:
        process.terminate()


def test_every_file_parley_up_writes_and_every_file_it_found_is_owner_only(
    upgraded: tuple[Path, httpx.Client],
) -> None:
    data_dir, client = upgraded
    email = f"modes-{uuid.uuid4().hex[:8]}@example.com"
    response = client.post(
        "/v1/auth/register", json={"email": email, "password": PASSWORD, "display_name": "Modes"}
    )
    assert response.status_code == 200, response.text

    # The verification mail lands in the mail drop: the file that holds a live link.
    mail = eventually_sync(
        lambda: next((path for path in (data_dir / "mail").glob("*.eml") if email in path.read_text()), None),
        what=f"the verification mail to {email} in {data_dir / 'mail'}",
        timeout_s=30,
    )

    modes = modes_under(data_dir)
    # What this run wrote (the -wal and -shm files exist while SQLite runs in WAL mode) and what the
    # earlier version left behind.
    assert {
        "parley.db",
        "parley.db-wal",
        "parley.db-shm",
        "secrets",
        "secrets/kek",
        "envoy",
        "mail",
        "mail/old-reset.eml",
        str(mail.relative_to(data_dir)),
    } <= modes.keys()
    assert any(name.startswith("envoy/") for name in modes)
    assert modes == owner_only(data_dir)


def test_parley_migrate_creates_an_owner_only_data_dir(tmp_path: Path) -> None:
    """The umask is set for every `parley` command, not only `up`."""
    data_dir = tmp_path / "fresh"
    result = subprocess.run(
        [str(PARLEY), "migrate"],
        env={**os.environ, "PARLEY_DATA_DIR": str(data_dir)},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        umask=SHELL_UMASK,
    )
    assert result.returncode == 0, result.stderr
    modes = modes_under(data_dir)
    assert "parley.db" in modes
    assert modes == owner_only(data_dir)
