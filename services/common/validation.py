"""Request validation: generic contract rules plus per-message rules registered by services."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from google.protobuf.message import Message

from services.common.errors import FieldViolation, InvalidArgument

MessageRule = Callable[[Message], Iterable[FieldViolation]]


def _page_size_not_negative(request: Message) -> Iterable[FieldViolation]:
    # HOUSE-STYLE: an oversize page_size is capped by the server; a negative one is a client bug.
    page_size: int = (
        getattr(request, "page_size", 0) if "page_size" in request.DESCRIPTOR.fields_by_name else 0
    )
    if page_size < 0:
        yield FieldViolation("page_size", "must be zero (server default) or positive", "INVALID_PAGE_SIZE")


GENERIC_RULES: tuple[MessageRule, ...] = (_page_size_not_negative,)


class RequestValidator:
    """Runs the generic rules and the rules registered for the request's message type."""

    def __init__(self, rules: Mapping[str, Sequence[MessageRule]] | None = None) -> None:
        self._rules: dict[str, list[MessageRule]] = {name: list(r) for name, r in (rules or {}).items()}

    def register(self, message_full_name: str, *rules: MessageRule) -> None:
        self._rules.setdefault(message_full_name, []).extend(rules)

    def violations(self, request: Message) -> list[FieldViolation]:
        found: list[FieldViolation] = []
        for rule in (*GENERIC_RULES, *self._rules.get(request.DESCRIPTOR.full_name, ())):
            found.extend(rule(request))
        return found

    def check(self, request: Message) -> None:
        found = self.violations(request)
        if found:
            raise InvalidArgument(
                "The request has invalid fields: " + ", ".join(v.field for v in found) + ".",
                field_violations=found,
            )
