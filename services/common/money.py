"""Money as every service handles it: integer minor units plus an ISO 4217 currency, never a float."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Money:
    """An amount in the minor units (e.g. cents) of `currency_code`."""

    currency_code: str
    amount_minor: int

    def __post_init__(self) -> None:
        if (
            len(self.currency_code) != 3
            or not self.currency_code.isascii()
            or not self.currency_code.isupper()
        ):
            raise ValueError(f"currency_code must be an upper-case ISO 4217 code, got {self.currency_code!r}")
        if isinstance(self.amount_minor, bool) or not isinstance(self.amount_minor, int):
            raise TypeError("amount_minor must be an int (minor units), never a float")
