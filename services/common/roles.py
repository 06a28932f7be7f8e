"""The roles a user can hold, in one place: their names, their contract values and their order.

Tokens, identity headers, events and replies all carry roles. Tokens and headers use the lower-case
names below; gRPC replies and events use `parley.common.v1.Role`. Every list of roles Parley writes is
in the contract's order (user, then admin), so the same roles always look the same.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from parley.common.v1 import common_pb2

ROLE_USER: Final = "user"
ROLE_ADMIN: Final = "admin"

# `parley.common.v1.Role` values and their names: `ROLE_ADMIN` ↔ "admin".
ROLE_NAMES: Final[dict[common_pb2.Role.ValueType, str]] = {
    value: common_pb2.Role.Name(value).removeprefix("ROLE_").lower()
    for value in common_pb2.Role.values()
    if value != common_pb2.ROLE_UNSPECIFIED
}
ROLE_VALUES: Final[dict[str, common_pb2.Role.ValueType]] = {name: value for value, name in ROLE_NAMES.items()}
# Every role a user may be given.
KNOWN_ROLES: Final = frozenset(ROLE_VALUES)
assert {ROLE_USER, ROLE_ADMIN} == KNOWN_ROLES, "roles.py and parley.common.v1.Role disagree"


def ordered_roles(names: Iterable[str]) -> tuple[str, ...]:
    """Role names without duplicates, in the contract's order; names the contract does not know come
    last, alphabetically (they are kept, never silently dropped)."""
    return tuple(sorted(set(names), key=lambda name: (ROLE_VALUES.get(name, len(ROLE_VALUES) + 1), name)))


def role_values(names: Iterable[str]) -> list[common_pb2.Role.ValueType]:
    """The contract values of the known roles among `names`, in order."""
    return [ROLE_VALUES[name] for name in ordered_roles(names) if name in ROLE_VALUES]


def role_names(values: Iterable[common_pb2.Role.ValueType]) -> tuple[str, ...]:
    """The names of the known `parley.common.v1.Role` values among `values`, in order."""
    return ordered_roles(ROLE_NAMES[value] for value in values if value in ROLE_NAMES)
