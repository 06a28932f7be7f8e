"""Compile purpose-built protos for tests, the way scripts/gen compiles the contracts."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_tools import protoc  # type: ignore[import-untyped]


def compile_descriptor_set(directory: Path, sources: dict[str, str]) -> bytes:
    """A FileDescriptorSet (imports and comments included) of `sources` (path -> text), written under
    `directory`; the googleapis and well-known protos resolve as they do for scripts/gen."""
    for name, text in sources.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    googleapis_root = Path(annotations_pb2.__file__).resolve().parents[2]
    well_known_root = resources.files("grpc_tools") / "_proto"
    out = directory / "set.binpb"
    exit_code = protoc.main(
        [
            "protoc",
            f"-I{directory}",
            f"-I{googleapis_root}",
            f"-I{well_known_root}",
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *sources,
            "google/rpc/status.proto",
            "google/rpc/error_details.proto",
        ]
    )
    assert exit_code == 0
    return out.read_bytes()


def pool_of(*files: descriptor_pb2.FileDescriptorProto) -> descriptor_pool.DescriptorPool:
    """A descriptor pool of its own holding `files` (each after the files it imports)."""
    pool = descriptor_pool.DescriptorPool()
    for file in files:
        pool.Add(file)
    return pool
