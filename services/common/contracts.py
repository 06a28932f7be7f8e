"""Where the generated contract artefacts live: the descriptor set and the OpenAPI document."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from google.protobuf import descriptor_pb2


def descriptor_set_path() -> Path:
    """The FileDescriptorSet that Envoy's transcoder and the edge reflection server load."""
    return Path(str(resources.files("parley").joinpath("descriptor_set.binpb")))


def descriptor_set_bytes() -> bytes:
    return descriptor_set_path().read_bytes()


def contract_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """Every file of the descriptor set, comments included (reflection clients print them)."""
    return list(descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_bytes()).file)


def openapi_path() -> Path:
    return Path(str(resources.files("parley").joinpath("openapi.json")))
