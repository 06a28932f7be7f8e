"""The reflection symbol index, the answers built from it, and the files a server describes."""

from __future__ import annotations

import re

import pytest
from google.protobuf import descriptor_pb2, text_format
from grpc_reflection.v1alpha import reflection_pb2

from gateway.descriptors import read_descriptor_set
from gateway.edge import public_files
from services.common.reflection import (
    REFLECTION_V1_FILE,
    MissingDescriptorError,
    ReflectionServicer,
    described_files,
    index_files,
    reflection_v1_file,
)
from tests.support.gateway import DESCRIPTOR_SET_PATH, internal_service_names
from tests.support.protos import pool_of

BASE_FILE = "demo/v1/base.proto"
LIBRARY_FILE = "demo/v1/library.proto"


def file_from_text(text: str) -> descriptor_pb2.FileDescriptorProto:
    return text_format.Parse(text, descriptor_pb2.FileDescriptorProto())


BASE = file_from_text(f"""
    name: "{BASE_FILE}"
    package: "demo.v1"
    message_type {{ name: "Base" extension_range {{ start: 1000 end: 2000 }} }}
    message_type {{ name: "Plain" }}
""")

LIBRARY = file_from_text(f"""
    name: "{LIBRARY_FILE}"
    package: "demo.v1"
    dependency: "{BASE_FILE}"
    message_type {{
      name: "Shelf"
      field {{ name: "name" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL }}
      field {{ name: "book_id" number: 2 type: TYPE_STRING label: LABEL_OPTIONAL oneof_index: 0 }}
      oneof_decl {{ name: "choice" }}
      nested_type {{
        name: "Book"
        field {{ name: "title" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL }}
        nested_type {{ name: "Page" }}
        enum_type {{
          name: "Binding"
          value {{ name: "BINDING_UNSPECIFIED" number: 0 }}
          value {{ name: "BINDING_HARD" number: 1 }}
        }}
      }}
      extension {{
        name: "shelf_note" number: 1001 extendee: ".demo.v1.Base" type: TYPE_STRING label: LABEL_OPTIONAL
      }}
    }}
    enum_type {{
      name: "Color"
      value {{ name: "COLOR_UNSPECIFIED" number: 0 }}
      value {{ name: "COLOR_RED" number: 1 }}
    }}
    extension {{
      name: "colour" number: 1000 extendee: ".demo.v1.Base" type: TYPE_STRING label: LABEL_OPTIONAL
    }}
    service {{
      name: "LibraryService"
      method {{ name: "GetShelf" input_type: ".demo.v1.Shelf" output_type: ".demo.v1.Shelf" }}
    }}
""")

SYMBOLS_OF_LIBRARY = [
    "demo.v1.LibraryService",
    "demo.v1.LibraryService.GetShelf",
    "demo.v1.Shelf",
    "demo.v1.Shelf.name",
    "demo.v1.Shelf.choice",
    "demo.v1.Shelf.Book",
    "demo.v1.Shelf.Book.title",
    "demo.v1.Shelf.Book.Page",
    "demo.v1.Shelf.Book.Binding",
    "demo.v1.Shelf.Book.BINDING_HARD",
    "demo.v1.Shelf.Book.Binding.BINDING_HARD",
    "demo.v1.Color",
    "demo.v1.COLOR_RED",
    "demo.v1.Color.COLOR_RED",
    "demo.v1.colour",
    "demo.v1.Shelf.shelf_note",
]


@pytest.mark.parametrize("symbol", SYMBOLS_OF_LIBRARY)
def test_every_kind_of_symbol_maps_to_the_file_defining_it(symbol: str) -> None:
    index = index_files([BASE, LIBRARY])

    assert index.file_of_symbol[symbol] == LIBRARY_FILE


@pytest.mark.parametrize(
    "name",
    [
        "demo.v1",
        "demo.v1.Shelf.nothing",
        "demo.v1.LibraryService/GetShelf",
        ".demo.v1.Shelf",
        "demo.v1.Color.COLOR_RED.more",
        "Shelf",
        "",
    ],
)
def test_names_that_are_no_symbol_are_not_found(name: str) -> None:
    assert name not in index_files([BASE, LIBRARY]).file_of_symbol


def test_extensions_are_found_by_extended_message_and_number() -> None:
    index = index_files([BASE, LIBRARY])

    assert index.file_of_extension["demo.v1.Base"] == {1000: LIBRARY_FILE, 1001: LIBRARY_FILE}
    assert index.extension_numbers("demo.v1.Base") == [1000, 1001]
    assert index.extension_numbers("demo.v1.Plain") == []
    assert index.extension_numbers("demo.v1.Shelf.Book.Page") == []
    assert index.extension_numbers("demo.v1.Nope") is None
    assert index.extension_numbers("demo.v1.Color") is None


def importing(name: str, *imports: str) -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto(name=name, package="diamond", dependency=imports)


DIAMOND = [
    importing("top.proto", "left.proto", "right.proto"),
    importing("left.proto", "bottom.proto"),
    importing("right.proto", "bottom.proto"),
    importing("bottom.proto"),
    importing("other.proto", "bottom.proto"),
]


def names_of(serialized: list[bytes]) -> list[str]:
    return [descriptor_pb2.FileDescriptorProto.FromString(file).name for file in serialized]


def test_a_stream_gets_each_import_once_and_the_asked_file_always() -> None:
    index = index_files(DIAMOND)
    already_sent: set[str] = set()

    assert names_of(index.file_with_imports("top.proto", already_sent)) == [
        "top.proto",
        "left.proto",
        "right.proto",
        "bottom.proto",
    ]
    assert names_of(index.file_with_imports("left.proto", already_sent)) == ["left.proto"]
    assert names_of(index.file_with_imports("other.proto", already_sent)) == ["other.proto"]
    assert names_of(index.file_with_imports("other.proto", set())) == ["other.proto", "bottom.proto"]


def test_files_must_come_with_their_imports() -> None:
    with pytest.raises(MissingDescriptorError, match=re.escape(f"not given: {BASE_FILE}")):
        index_files([LIBRARY])


def test_the_first_of_two_files_of_one_name_counts() -> None:
    without_service = descriptor_pb2.FileDescriptorProto()
    without_service.CopyFrom(LIBRARY)
    del without_service.service[:]

    index = index_files([BASE, without_service, LIBRARY])

    assert "demo.v1.LibraryService" not in index.file_of_symbol
    assert index.serialized_files[LIBRARY_FILE] == without_service.SerializeToString()


# --- answers -------------------------------------------------------------------------------------


def servicer() -> ReflectionServicer:
    return ReflectionServicer(
        ["demo.v1.LibraryService", "b.Second", "demo.v1.LibraryService"], index_files([BASE, LIBRARY])
    )


def answer(request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
    return servicer().answer(request, set())


def test_services_are_listed_once_each_and_sorted() -> None:
    response = answer(reflection_pb2.ServerReflectionRequest(list_services="*", host="example"))

    assert [service.name for service in response.list_services_response.service] == [
        "b.Second",
        "demo.v1.LibraryService",
    ]
    assert response.valid_host == "example"
    assert response.original_request.list_services == "*"


def test_a_method_is_answered_with_its_file_then_its_imports() -> None:
    response = answer(
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="demo.v1.LibraryService.GetShelf")
    )

    assert names_of(list(response.file_descriptor_response.file_descriptor_proto)) == [
        LIBRARY_FILE,
        BASE_FILE,
    ]


def test_files_and_extensions_are_answered() -> None:
    by_name = answer(reflection_pb2.ServerReflectionRequest(file_by_filename=BASE_FILE))
    by_extension = answer(
        reflection_pb2.ServerReflectionRequest(
            file_containing_extension=reflection_pb2.ExtensionRequest(
                containing_type="demo.v1.Base", extension_number=1001
            )
        )
    )
    numbers = answer(reflection_pb2.ServerReflectionRequest(all_extension_numbers_of_type="demo.v1.Base"))

    assert names_of(list(by_name.file_descriptor_response.file_descriptor_proto)) == [BASE_FILE]
    assert names_of(list(by_extension.file_descriptor_response.file_descriptor_proto))[0] == LIBRARY_FILE
    assert numbers.all_extension_numbers_response.base_type_name == "demo.v1.Base"
    assert list(numbers.all_extension_numbers_response.extension_number) == [1000, 1001]


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="demo.v1.Nope"),
            "Symbol not found: demo.v1.Nope",
        ),
        (reflection_pb2.ServerReflectionRequest(file_by_filename="nope.proto"), "File not found: nope.proto"),
        (
            reflection_pb2.ServerReflectionRequest(
                file_containing_extension=reflection_pb2.ExtensionRequest(
                    containing_type="demo.v1.Base", extension_number=1500
                )
            ),
            "Extension not found: number 1500 of demo.v1.Base",
        ),
        (
            reflection_pb2.ServerReflectionRequest(all_extension_numbers_of_type="demo.v1.Nope"),
            "Type not found: demo.v1.Nope",
        ),
    ],
)
def test_unknown_names_are_not_found(request_: reflection_pb2.ServerReflectionRequest, message: str) -> None:
    response = answer(request_)

    assert response.WhichOneof("message_response") == "error_response"
    assert (response.error_response.error_code, response.error_response.error_message) == (5, message)
    assert response.original_request == request_


def test_a_request_for_nothing_is_an_invalid_argument() -> None:
    response = answer(reflection_pb2.ServerReflectionRequest(host="example"))

    assert response.error_response.error_code == 3
    assert "set one of list_services" in response.error_response.error_message


# --- the files a server describes ------------------------------------------------------------------


def test_a_service_the_files_lack_comes_from_the_pool_with_its_imports() -> None:
    files = described_files(["demo.v1.LibraryService"], pool=pool_of(BASE, LIBRARY))

    assert sorted(file.name for file in files) == sorted([REFLECTION_V1_FILE, LIBRARY_FILE, BASE_FILE])


def test_an_import_the_files_lack_comes_from_the_pool() -> None:
    files = described_files([], [LIBRARY], pool=pool_of(BASE, LIBRARY))

    assert [file.name for file in files] == [LIBRARY_FILE, REFLECTION_V1_FILE, BASE_FILE]


def test_a_given_file_is_never_replaced_by_the_pools() -> None:
    public_library = descriptor_pb2.FileDescriptorProto()
    public_library.CopyFrom(LIBRARY)
    del public_library.service[:]

    files = described_files(["demo.v1.LibraryService"], [public_library], pool=pool_of(BASE, LIBRARY))

    assert "demo.v1.LibraryService" not in index_files(files).file_of_symbol


def test_a_service_nobody_describes_is_refused() -> None:
    with pytest.raises(MissingDescriptorError, match=re.escape("demo.v1.Missing")):
        described_files(["demo.v1.Missing"], pool=pool_of(BASE, LIBRARY))


def test_v1_schema_is_v1alpha_under_the_v1_package() -> None:
    v1 = reflection_v1_file()
    pool = pool_of(v1)

    service = pool.FindServiceByName("grpc.reflection.v1.ServerReflection")
    method = service.methods_by_name["ServerReflectionInfo"]
    assert method.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"
    assert method.output_type.full_name == "grpc.reflection.v1.ServerReflectionResponse"
    assert "v1alpha" not in str(v1)
    for v1alpha_message in reflection_pb2.DESCRIPTOR.message_types_by_name.values():
        v1_message = pool.FindMessageTypeByName(f"grpc.reflection.v1.{v1alpha_message.name}")
        assert [(field.name, field.number, field.type) for field in v1_message.fields] == [
            (field.name, field.number, field.type) for field in v1alpha_message.fields
        ]


def test_v1_schema_matches_the_official_v1_proto() -> None:
    # grpclib (a dependency of envoy-data-plane) ships grpc/reflection/v1/reflection.proto compiled by protoc.
    official = pytest.importorskip("grpclib.reflection.v1.reflection_pb2")
    expected = descriptor_pb2.FileDescriptorProto()
    official.DESCRIPTOR.CopyToProto(expected)
    derived = reflection_v1_file()

    for file in (expected, derived):
        file.ClearField("name")
        file.ClearField("options")
    assert derived == expected


# --- the gateway's public view ---------------------------------------------------------------------


def test_public_files_hold_no_internal_service_and_keep_the_comments_of_the_others() -> None:
    descriptor_set = read_descriptor_set(DESCRIPTOR_SET_PATH.read_bytes())
    originals = {file.name: file for file in descriptor_set.file}

    files = public_files(descriptor_set)

    index = index_files(files)
    for internal in internal_service_names():
        assert internal not in index.file_of_symbol
    billing = next(file for file in files if file.name == "parley/billing/v1/billing.proto")
    original = originals[billing.name]
    assert [service.name for service in billing.service] == ["BillingService", "BillingAdminService"]
    service_field = descriptor_pb2.FileDescriptorProto.SERVICE_FIELD_NUMBER
    for index_in_public, service in enumerate(billing.service):
        index_in_original = [each.name for each in original.service].index(service.name)
        assert comments_at(billing, [service_field, index_in_public]) == comments_at(
            original, [service_field, index_in_original]
        )
        assert comments_at(billing, [service_field, index_in_public])
    assert len(billing.source_code_info.location) < len(original.source_code_info.location)
    assert all(
        location.path[1] < len(billing.service)
        for location in billing.source_code_info.location
        if location.path[:1] == [service_field]
    )
    untouched = next(file for file in files if file.name == "parley/common/v1/common.proto")
    assert untouched == originals[untouched.name]


def comments_at(file: descriptor_pb2.FileDescriptorProto, path: list[int]) -> list[str]:
    """The leading comments of the element at `path` and of everything inside it, in order."""
    return [
        location.leading_comments
        for location in file.source_code_info.location
        if list(location.path[: len(path)]) == path and location.leading_comments
    ]
