"""Every ErrorInfo reason the code can send is declared in the contract (parley.common.v1.ErrorReason)."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.settings import load_gateway_settings
from parley.common.v1 import common_pb2
from services.common import errors

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFIX = "ERROR_REASON_"
REASON_ARGUMENT = re.compile(r"""reason\s*=\s*["']([A-Z][A-Z0-9_]+)["']""")


def declared_reasons() -> set[str]:
    return {
        name.removeprefix(PREFIX)
        for name in common_pb2.ErrorReason.DESCRIPTOR.values_by_name
        if name != f"{PREFIX}UNSPECIFIED"
    }


def reasons_used_in_code() -> dict[str, str]:
    """reason -> where it is used, from `reason="..."` arguments in services/ and gateway/."""
    used: dict[str, str] = {}
    for package in ("services", "gateway"):
        for source in sorted((REPO_ROOT / package).rglob("*.py")):
            for reason in REASON_ARGUMENT.findall(source.read_text()):
                used.setdefault(reason, str(source.relative_to(REPO_ROOT)))
    return used


def test_domain_error_defaults_are_declared() -> None:
    defaults = {
        cls.default_reason
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.ParleyError) and cls.default_reason is not None
    }
    assert defaults - declared_reasons() == set()


def test_reasons_raised_by_services_and_gateway_code_are_declared() -> None:
    used = reasons_used_in_code()
    assert used, "the scan found no reasons at all; the pattern is broken"
    undeclared = {reason: where for reason, where in used.items() if reason not in declared_reasons()}
    assert undeclared == {}


def test_gateway_local_reply_reasons_are_declared() -> None:
    reasons = {reply.reason for reply in load_gateway_settings().local_replies}
    assert reasons - declared_reasons() == set()
