"""The model catalog: which models exist, what they cost and accept, and how the catalog is listed.

The catalog is data (`data/model-catalog.yaml`), read once at start. It is shared because two
services read it: chat routes and lists models with it, and billing prices usage with it. No I/O
types here beyond the loader; the chat servicers encode these values for chat v1 and v2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Final

from pydantic import Field, StrictStr, field_validator

from services.common.config_files import (
    ConfigFileError,
    ConfigSection,
    NonEmptyText,
    PositiveInt,
    load_yaml_model,
)
from services.common.money import Money
from services.common.pagination import BY_INTEGER, Page, keyset_page

SHIPPED_CATALOG: Final = Path(__file__).resolve().parent / "data" / "model-catalog.yaml"

# The kinds of content a chat v2 message part can be, as the catalog names them.
CONTENT_PART_KINDS: Final = ("text", "image_url", "tool_call", "tool_result")
# Chat v1 messages are plain text, so a model that refused text could not be used through v1.
REQUIRED_PART_KIND: Final = "text"

NANOS_PER_MINOR: Final = 1_000_000_000


class ModelCatalogError(ConfigFileError):
    """The model catalog file is missing or malformed; the one-line message names the file and the problem."""


@dataclass(frozen=True)
class UnitPrice:
    """A price per unit (e.g. per 1,000 tokens): whole minor units plus billionths of one (ADR 6)."""

    currency_code: str
    amount_minor: int
    minor_nanos: int = 0

    def __post_init__(self) -> None:
        Money(self.currency_code, self.amount_minor)  # the same currency and integer checks
        if isinstance(self.minor_nanos, bool) or not isinstance(self.minor_nanos, int):
            raise TypeError("minor_nanos must be an int, never a float")
        if not -NANOS_PER_MINOR < self.minor_nanos < NANOS_PER_MINOR:
            raise ValueError("minor_nanos must lie strictly between -1e9 and 1e9")
        if self.amount_minor * self.minor_nanos < 0:
            raise ValueError("amount_minor and minor_nanos must have the same sign")

    @classmethod
    def parse(cls, currency_code: str, minor_units: str) -> UnitPrice:
        """Parse a decimal string of minor units, e.g. "0.015" (cents) -> 0 minor + 15,000,000 nanos."""
        try:
            value = Decimal(minor_units)
        except InvalidOperation:
            raise ValueError(f"{minor_units!r} is not a decimal number") from None
        if not value.is_finite():
            raise ValueError(f"{minor_units!r} is not a finite price")
        nanos_total = value * NANOS_PER_MINOR
        if nanos_total != nanos_total.to_integral_value():
            raise ValueError(f"{minor_units!r} has more than 9 fractional digits")
        whole, nanos = divmod(abs(int(nanos_total)), NANOS_PER_MINOR)
        sign = -1 if value < 0 else 1
        return cls(currency_code, sign * whole, sign * nanos)

    @property
    def total_nanos(self) -> int:
        """The price in billionths of a minor unit."""
        return self.amount_minor * NANOS_PER_MINOR + self.minor_nanos


@dataclass(frozen=True)
class ChatModel:
    """A model users can chat with, with its limits, prices and who may use it."""

    id: str
    display_name: str
    provider: str
    context_window: int
    max_output_tokens: int
    input_price_per_1k_tokens: UnitPrice
    output_price_per_1k_tokens: UnitPrice
    allowed_plans: tuple[str, ...]
    accepted_part_kinds: tuple[str, ...]

    def usage_cost_minor(self, input_tokens: int, output_tokens: int) -> int:
        """What one generation's tokens cost at this model's prices, in whole minor units.

        Rounded half up once, on the sum (ADR 6: rounding happens once, where a cost is charged).
        """
        if input_tokens < 0 or output_tokens < 0:
            raise ValueError("token counts must not be negative")
        nanos_times_1k = (
            input_tokens * self.input_price_per_1k_tokens.total_nanos
            + output_tokens * self.output_price_per_1k_tokens.total_nanos
        )
        per_minor = 1000 * NANOS_PER_MINOR
        return (nanos_times_1k + per_minor // 2) // per_minor


class ModelCatalog:
    """The models in catalog order, listed page by page."""

    def __init__(self, models: Sequence[ChatModel]) -> None:
        ids = [model.id for model in models]
        duplicates = sorted({model_id for model_id in ids if ids.count(model_id) > 1})
        if duplicates:
            raise ModelCatalogError(f"model ids must be unique; repeated: {', '.join(duplicates)}")
        self._models = tuple(models)
        self._by_id = {model.id: model for model in models}

    @property
    def models(self) -> tuple[ChatModel, ...]:
        return self._models

    def get(self, model_id: str) -> ChatModel | None:
        return self._by_id.get(model_id)

    async def list_models(self, *, page_size: int, page_token: str, api_version: str) -> Page[ChatModel]:
        """The models in catalog order, keyed by (position in the file, id) like a SQL keyset, so a
        token stays meaningful across a redeploy that changes the file. Each API version's list
        (`api_version`, e.g. "v1") is its own query: a token from one is refused by the other."""
        positions = {model.id: index for index, model in enumerate(self._models)}

        async def fetch(after: tuple[int, str] | None, limit: int) -> Sequence[ChatModel]:
            found = [
                model
                for index, model in enumerate(self._models)
                if after is None or (index, model.id) > after
            ]
            return found[:limit]

        return await keyset_page(
            page_size=page_size,
            page_token=page_token,
            query=("models", api_version),
            sort_key=BY_INTEGER,
            position=lambda model: (positions[model.id], model.id),
            fetch=fetch,
        )


def load_model_catalog(path: Path = SHIPPED_CATALOG) -> ModelCatalog:
    """Read and validate the catalog file; any problem is a ModelCatalogError naming the file."""
    document = load_yaml_model(path, _CatalogFile, ModelCatalogError)
    try:
        return ModelCatalog([entry.to_model(document.currency_code) for entry in document.models])
    except (ValueError, TypeError, ModelCatalogError) as error:
        raise ModelCatalogError(f"{path}: {error}") from None


# ---- the file's schema --------------------------------------------------------------------------


class _CatalogEntry(ConfigSection):
    id: Annotated[StrictStr, Field(pattern=r"^[a-z0-9][a-z0-9.\-]{0,63}$")]
    display_name: NonEmptyText
    provider: Annotated[StrictStr, Field(pattern=r"^[a-z][a-z0-9_\-]*$")]
    context_window: PositiveInt
    max_output_tokens: PositiveInt
    input_price_per_1k_tokens_minor: StrictStr
    output_price_per_1k_tokens_minor: StrictStr
    allowed_plans: Annotated[tuple[NonEmptyText, ...], Field(min_length=1)]
    accepted_part_kinds: Annotated[tuple[StrictStr, ...], Field(min_length=1)]

    @field_validator("input_price_per_1k_tokens_minor", "output_price_per_1k_tokens_minor", mode="before")
    @classmethod
    def _price_is_quoted(cls, value: object) -> object:
        if isinstance(value, float | int) and not isinstance(value, bool):
            # pydantic reports a ValueError as a validation error of this field; a TypeError escapes it.
            raise ValueError(f'write the price as a quoted decimal string ("{value}"), never a bare number')  # noqa: TRY004
        return value

    @field_validator("accepted_part_kinds")
    @classmethod
    def _known_part_kinds(cls, kinds: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [kind for kind in kinds if kind not in CONTENT_PART_KINDS]
        if unknown:
            raise ValueError(f"unknown part kinds {unknown}; known: {list(CONTENT_PART_KINDS)}")
        if REQUIRED_PART_KIND not in kinds:
            raise ValueError(f"every model must accept {REQUIRED_PART_KIND!r} (chat v1 sends only text)")
        if len(set(kinds)) != len(kinds):
            raise ValueError("part kinds must not repeat")
        return kinds

    def to_model(self, currency_code: str) -> ChatModel:
        if self.max_output_tokens > self.context_window:
            raise ValueError(f"{self.id}: max_output_tokens exceeds context_window")
        prices = {}
        for name in ("input_price_per_1k_tokens_minor", "output_price_per_1k_tokens_minor"):
            price = UnitPrice.parse(currency_code, getattr(self, name))
            if price.amount_minor < 0 or price.minor_nanos < 0:
                raise ValueError(f"{self.id}: {name} must not be negative")
            prices[name] = price
        return ChatModel(
            id=self.id,
            display_name=self.display_name,
            provider=self.provider,
            context_window=self.context_window,
            max_output_tokens=self.max_output_tokens,
            input_price_per_1k_tokens=prices["input_price_per_1k_tokens_minor"],
            output_price_per_1k_tokens=prices["output_price_per_1k_tokens_minor"],
            allowed_plans=self.allowed_plans,
            accepted_part_kinds=self.accepted_part_kinds,
        )


class _CatalogFile(ConfigSection):
    currency_code: Annotated[StrictStr, Field(pattern=r"^[A-Z]{3}$")]
    models: Annotated[tuple[_CatalogEntry, ...], Field(min_length=1)]
