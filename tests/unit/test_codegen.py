"""`scripts/gen --inputs-digest`: stable, tracking every input, and matching the committed gen/."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMITTED_DIGEST = REPO_ROOT / "gen" / ".inputs.sha256"
# The generators whose code shapes gen/: the OpenAPI generator and the descriptor walk it uses.
GENERATORS = (
    "scripts/gen",
    "gateway/openapi.py",
    "gateway/descriptors.py",
    "services/common/safe_methods.py",
)


def _inputs_digest(repo: Path) -> str:
    result = subprocess.run(
        [str(repo / "scripts" / "gen"), "--inputs-digest"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.stdout.strip()


def test_inputs_digest_is_stable() -> None:
    first = _inputs_digest(REPO_ROOT)
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert _inputs_digest(REPO_ROOT) == first


def test_committed_gen_is_fresh() -> None:
    assert COMMITTED_DIGEST.read_text().strip() == _inputs_digest(REPO_ROOT), (
        "protos or the generators changed since gen/ was built: run scripts/gen"
    )


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """The codegen inputs in a fresh directory, sharing this checkout's virtualenv."""
    copy = tmp_path / "repo"
    for name in ("scripts/_bootstrap.sh", *GENERATORS, "pyproject.toml", "constraints.txt"):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, copy / name)
    if (REPO_ROOT / "buf.yaml").exists():
        shutil.copy2(REPO_ROOT / "buf.yaml", copy / "buf.yaml")
    shutil.copytree(REPO_ROOT / "protos", copy / "protos")
    (copy / ".venv").symlink_to(REPO_ROOT / ".venv")
    return copy


def test_digest_does_not_depend_on_the_checkout_location(repo_copy: Path) -> None:
    assert _inputs_digest(repo_copy) == _inputs_digest(REPO_ROOT)


def test_digest_tracks_proto_contents_and_paths(repo_copy: Path) -> None:
    original = _inputs_digest(repo_copy)
    proto = repo_copy / "protos" / "parley" / "common" / "v1" / "common.proto"
    text = proto.read_text()

    proto.write_text(text + "\n// A trailing comment.\n")
    assert _inputs_digest(repo_copy) != original

    proto.write_text(text)
    assert _inputs_digest(repo_copy) == original

    proto.rename(proto.with_name("renamed.proto"))
    assert _inputs_digest(repo_copy) != original


@pytest.mark.parametrize("name", GENERATORS)
def test_digest_tracks_the_generators(repo_copy: Path, name: str) -> None:
    original = _inputs_digest(repo_copy)
    with (repo_copy / name).open("a") as generator:
        generator.write("\n# changed\n")
    assert _inputs_digest(repo_copy) != original


def test_digest_tracks_buf_yaml(repo_copy: Path) -> None:
    original = _inputs_digest(repo_copy)
    buf_yaml = repo_copy / "buf.yaml"
    buf_yaml.write_text((buf_yaml.read_text() if buf_yaml.exists() else "version: v2\n") + "# changed\n")
    assert _inputs_digest(repo_copy) != original
