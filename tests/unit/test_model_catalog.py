"""The model catalog file, its loader, unit prices and listing; the v2 part-kind mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from parley.chat.v2 import chat_pb2 as chat_v2_pb2
from services.chat.servicer import PART_KINDS_V2
from services.common.errors import InvalidArgument
from services.common.model_catalog import (
    CONTENT_PART_KINDS,
    SHIPPED_CATALOG,
    ChatModel,
    ModelCatalog,
    ModelCatalogError,
    UnitPrice,
    load_model_catalog,
)


def entry(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": "m-1",
        "display_name": "Model One",
        "provider": "local",
        "context_window": 4096,
        "max_output_tokens": 1024,
        "input_price_per_1k_tokens_minor": "0.015",
        "output_price_per_1k_tokens_minor": "2",
        "allowed_plans": ["free"],
        "accepted_part_kinds": ["text"],
    }
    return {**base, **overrides}


def write_catalog(tmp_path: Path, *models: dict[str, object], currency_code: object = "USD") -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(
        yaml.safe_dump({"currency_code": currency_code, "models": list(models)}), encoding="utf-8"
    )
    return path


def model(model_id: str) -> ChatModel:
    free = UnitPrice("USD", 0)
    return ChatModel(model_id, model_id, "local", 10, 5, free, free, ("free",), ("text",))


# ---- the shipped catalog ------------------------------------------------------------------------


def test_the_shipped_catalog_loads_with_exact_prices() -> None:
    catalog = load_model_catalog()
    ids = [m.id for m in catalog.models]
    assert ids == ["parley-local", "gpt-4o-mini", "gpt-4o", "claude-sonnet", "claude-opus"]
    mini = catalog.get("gpt-4o-mini")
    assert mini is not None
    # $0.00015 and $0.0006 per 1k tokens: fractions of a cent, exact in nanos (ADR 6).
    assert mini.input_price_per_1k_tokens == UnitPrice("USD", 0, 15_000_000)
    assert mini.output_price_per_1k_tokens == UnitPrice("USD", 0, 60_000_000)
    opus = catalog.get("claude-opus")
    assert opus is not None
    assert opus.output_price_per_1k_tokens == UnitPrice("USD", 7, 500_000_000)
    assert opus.allowed_plans == ("team",)
    assert catalog.get("no-such-model") is None


def test_every_shipped_model_accepts_text_and_fits_its_window() -> None:
    for chat_model in load_model_catalog().models:
        assert "text" in chat_model.accepted_part_kinds
        assert 0 < chat_model.max_output_tokens <= chat_model.context_window
        assert chat_model.allowed_plans


def test_the_shipped_file_is_the_default() -> None:
    assert SHIPPED_CATALOG.is_file()
    assert load_model_catalog(SHIPPED_CATALOG).models == load_model_catalog().models


# ---- unit prices --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "minor", "nanos"),
    [
        ("0", 0, 0),
        ("7", 7, 0),
        ("0.015", 0, 15_000_000),
        ("1.5", 1, 500_000_000),
        ("0.000000001", 0, 1),
        ("12.345678912", 12, 345_678_912),
        ("-0.5", 0, -500_000_000),
        ("-2.25", -2, -250_000_000),
    ],
)
def test_unit_prices_parse_exactly(text: str, minor: int, nanos: int) -> None:
    assert UnitPrice.parse("USD", text) == UnitPrice("USD", minor, nanos)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.0000000001", "more than 9 fractional digits"),
        ("abc", "not a decimal"),
        ("NaN", "not a finite"),
        ("Infinity", "not a finite"),
    ],
)
def test_unparseable_unit_prices_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UnitPrice.parse("USD", text)


def test_unit_price_invariants() -> None:
    with pytest.raises(ValueError, match="same sign"):
        UnitPrice("USD", 1, -1)
    with pytest.raises(ValueError, match="between"):
        UnitPrice("USD", 0, 1_000_000_000)
    with pytest.raises(TypeError, match="never a float"):
        UnitPrice("USD", 0, 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ISO 4217"):
        UnitPrice("usd", 0)


# ---- loader errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"input_price_per_1k_tokens_minor": 0.015}, "quoted decimal string"),
        ({"output_price_per_1k_tokens_minor": 2}, "quoted decimal string"),
        ({"input_price_per_1k_tokens_minor": "0.0000000001"}, "9 fractional digits"),
        ({"input_price_per_1k_tokens_minor": "-1"}, "must not be negative"),
        ({"accepted_part_kinds": ["text", "video"]}, "unknown part kinds"),
        ({"accepted_part_kinds": ["image_url"]}, "must accept 'text'"),
        ({"accepted_part_kinds": ["text", "text"]}, "must not repeat"),
        ({"accepted_part_kinds": []}, "accepted_part_kinds"),
        ({"allowed_plans": []}, "allowed_plans"),
        ({"context_window": "4096"}, "context_window"),
        ({"context_window": 0}, "context_window"),
        ({"context_window": True}, "context_window"),
        ({"max_output_tokens": 8192}, "exceeds context_window"),
        ({"id": "Bad Id"}, "id"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_a_malformed_entry_is_refused_with_the_file_and_the_field(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    path = write_catalog(tmp_path, entry(**overrides))
    with pytest.raises(ModelCatalogError, match=message) as error:
        load_model_catalog(path)
    assert str(path) in str(error.value)


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    path = write_catalog(tmp_path, entry(), entry(display_name="Again"))
    with pytest.raises(ModelCatalogError, match="repeated: m-1") as error:
        load_model_catalog(path)
    assert str(error.value).startswith(f"{path}: ")


def test_a_bad_currency_or_an_empty_catalog_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelCatalogError, match="currency_code"):
        load_model_catalog(write_catalog(tmp_path, entry(), currency_code="usd"))
    with pytest.raises(ModelCatalogError, match="models"):
        load_model_catalog(write_catalog(tmp_path))


def test_a_missing_or_unparseable_file_is_a_catalog_error(tmp_path: Path) -> None:
    with pytest.raises(ModelCatalogError, match=r"absent\.yaml: cannot be read"):
        load_model_catalog(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [unclosed", encoding="utf-8")
    with pytest.raises(ModelCatalogError, match=r"broken\.yaml: is not valid YAML"):
        load_model_catalog(broken)


def test_a_valid_custom_catalog_loads(tmp_path: Path) -> None:
    path = write_catalog(tmp_path, entry(), entry(id="m-2", accepted_part_kinds=list(CONTENT_PART_KINDS)))
    catalog = load_model_catalog(path)
    assert [m.id for m in catalog.models] == ["m-1", "m-2"]
    assert catalog.models[0].input_price_per_1k_tokens == UnitPrice("USD", 0, 15_000_000)
    assert catalog.models[1].accepted_part_kinds == CONTENT_PART_KINDS


# ---- listing ------------------------------------------------------------------------------------


async def test_pages_walk_every_model_once_in_catalog_order() -> None:
    catalog = ModelCatalog([model(name) for name in ("c", "a", "b", "e", "d")])
    seen: list[str] = []
    token = ""
    for _ in range(10):
        page = await catalog.list_models(page_size=2, page_token=token, api_version="v1")
        seen.extend(m.id for m in page.items)
        token = page.next_page_token
        if not token:
            break
    assert seen == ["c", "a", "b", "e", "d"]


async def test_page_size_defaults_and_negative_is_refused() -> None:
    catalog = ModelCatalog([model("a"), model("b")])
    page = await catalog.list_models(page_size=0, page_token="", api_version="v1")
    assert [m.id for m in page.items] == ["a", "b"]
    assert page.next_page_token == ""
    with pytest.raises(InvalidArgument) as error:
        await catalog.list_models(page_size=-1, page_token="", api_version="v1")
    assert error.value.reason == "INVALID_PAGE_SIZE"


async def test_a_forged_page_token_is_refused() -> None:
    with pytest.raises(InvalidArgument) as error:
        await ModelCatalog([model("a")]).list_models(page_size=1, page_token="forged", api_version="v1")
    assert error.value.reason == "INVALID_PAGE_TOKEN"


def test_a_catalog_refuses_duplicate_ids() -> None:
    with pytest.raises(ModelCatalogError, match="repeated: a"):
        ModelCatalog([model("a"), model("b"), model("a")])


# ---- the v2 enum --------------------------------------------------------------------------------


def test_every_part_kind_maps_onto_the_v2_enum_and_back() -> None:
    declared = {
        value.number
        for value in chat_v2_pb2.ContentPartKind.DESCRIPTOR.values
        if value.name != "CONTENT_PART_KIND_UNSPECIFIED"
    }
    assert set(PART_KINDS_V2) == set(CONTENT_PART_KINDS)
    assert set(PART_KINDS_V2.values()) == declared
    # And the oneof in ContentPart has one field per kind, named like it.
    oneof_fields = {field.name for field in chat_v2_pb2.ContentPart.DESCRIPTOR.oneofs_by_name["part"].fields}
    assert oneof_fields == set(CONTENT_PART_KINDS)
