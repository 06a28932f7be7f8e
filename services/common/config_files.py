"""The YAML data files a process reads at start (`envoy/gateway.yaml`, `envoy/ratelimits.yaml`, the
model catalog), parsed one way: a pydantic model per file whose sections forbid unknown keys, and one
readable line when the file is wrong.

The line names the file, then each problem by its key path (`timeouts.unary_sx`,
`limits[0].rate.requests`, `routes.methods['pkg.Service/Method']`); an unknown key also lists the
keys allowed at its level. `parley up`, `parley serve` and `parley gateway` print it like any bad
setting and exit with code 2 (`ConfigFileError` is a `SettingsError`).
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from services.common.settings import SettingsError

ModelT = TypeVar("ModelT", bound=BaseModel)

# Scalars are strict (no "12" for 12, no 1.5 for an integer, no "yes" for true), while YAML lists may
# still fill tuples and quoted timestamps datetimes.
NonEmptyText = Annotated[StrictStr, Field(min_length=1)]
PositiveInt = Annotated[StrictInt, Field(gt=0)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]
Number = StrictFloat  # accepts an integer too, never a bool or a string
Flag = StrictBool
_METHOD_KEY: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+/[A-Za-z_][A-Za-z0-9_]*$")


def _method_key(text: str) -> str:
    if not _METHOD_KEY.match(text):
        raise ValueError(f"{text!r} is not a gRPC method 'package.Service/Method'")
    return text


# How the data files name a gRPC method: `package.Service/Method`.
MethodKey = Annotated[StrictStr, AfterValidator(_method_key)]

_LONGEST_SHOWN_VALUE: Final = 60


class ConfigSection(BaseModel):
    """A mapping of a data file: every key is declared, and values cannot change once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfigFileError(SettingsError):
    """A data file is unusable; the one-line message names the file, the key and the problem."""


def load_yaml_model(path: Path, model: type[ModelT], error: type[ConfigFileError]) -> ModelT:
    """Read `path` and validate it as `model`; any problem raises `error` with one line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as problem:
        raise error(f"{path}: cannot be read ({problem.strerror or problem})") from problem
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as problem:
        raise error(f"{path}: is not valid YAML ({' '.join(str(problem).split())})") from problem
    return validate_document(document, model, source=str(path), error=error)


def validate_document(
    document: object, model: type[ModelT], *, source: str, error: type[ConfigFileError]
) -> ModelT:
    """Validate an already-parsed document; `source` names it in the message."""
    try:
        return model.model_validate(document)
    except ValidationError as problems:
        raise error(f"{source}: {describe_problems(problems, model)}") from None


def describe_problems(problems: ValidationError, model: type[BaseModel]) -> str:
    """Every problem of a validation in one line: unknown keys first (a typo is also why its key
    seems missing), those of one section named together, then the rest in the file's order."""
    unknown_by_section: dict[tuple[int | str, ...], list[int | str]] = {}
    others: list[str] = []
    errors = problems.errors(include_url=False)
    for problem in errors:
        location = tuple(part for part in problem["loc"] if part != "[key]")
        if problem["type"] == "too_short" and _has_problems_inside(problem["loc"], errors):
            continue  # pydantic counts only the valid items, so bad items also make a list "too short"
        if problem["type"] == "extra_forbidden":
            unknown_by_section.setdefault(location[:-1], []).append(location[-1])
        else:
            others.append(_describe(problem, location))
    unknown = [_describe_unknown(model, section, keys) for section, keys in unknown_by_section.items()]
    return "; ".join([*unknown, *others])


def key_path(location: Sequence[int | str]) -> str:
    """`limits[0].rate`, `routes.methods['pkg.Service/Method']`: a location as the file spells it."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.isidentifier():
            text += f".{part}" if text else part
        else:
            text += f"[{part!r}]"
    return text


def _has_problems_inside(location: tuple[int | str, ...], errors: Sequence[Any]) -> bool:
    return any(
        len(other["loc"]) > len(location) and other["loc"][: len(location)] == location for other in errors
    )


def _describe_unknown(model: type[BaseModel], section: Sequence[int | str], keys: Sequence[int | str]) -> str:
    allowed = _allowed_keys(model, section)
    names = ", ".join(key_path([*section, key]) for key in keys)
    if len(keys) > 1:
        return f"{names}: unknown keys (allowed here: {', '.join(allowed)})"
    close = difflib.get_close_matches(str(keys[0]), allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{names}: unknown key{hint} (allowed here: {', '.join(allowed)})"


def _describe(problem: Mapping[str, Any], location: Sequence[int | str]) -> str:
    where = key_path(location)
    kind = problem["type"]
    if kind == "missing":
        return f"{where}: required key is missing"
    message = str(problem["msg"]).removeprefix("Value error, ")
    given = problem.get("input")
    if kind in ("model_type", "model_attributes_type", "dict_type", "mapping_type"):
        return f"{where or 'the document'} must be a mapping, got {type(given).__name__}"
    if "[key]" in problem["loc"]:
        message = f"the key {message[0].lower()}{message[1:]}"
    elif kind not in ("value_error", "assertion_error") and not isinstance(given, (Mapping, list)):
        shown = repr(given)
        if len(shown) > _LONGEST_SHOWN_VALUE:
            shown = shown[: _LONGEST_SHOWN_VALUE - 3] + "..."
        message = f"{message} (got {shown})"
    return f"{where}: {message}" if where else message


def _allowed_keys(model: type[BaseModel], location: Sequence[int | str]) -> list[str]:
    """The keys of the section at `location`, by following the model's field types there."""
    current: Any = model
    for part in location:
        current = _step(current, part)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(field.alias or name for name, field in current.model_fields.items())
    return []


def _step(annotation: Any, part: int | str) -> Any:
    annotation = _unwrapped(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(part))
        return field.annotation if field is not None else None
    arguments = [argument for argument in typing.get_args(annotation) if argument is not Ellipsis]
    if not arguments:
        return None
    # A sequence's items, or a mapping's values.
    return arguments[-1]


def _unwrapped(annotation: Any) -> Any:
    """`X` from `Annotated[X, ...]` and from `X | None`."""
    while True:
        if typing.get_origin(annotation) is Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
            members = [member for member in typing.get_args(annotation) if member is not type(None)]
            if len(members) == 1:
                annotation = members[0]
                continue
        return annotation
