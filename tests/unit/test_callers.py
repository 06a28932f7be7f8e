"""Which workloads may call which method: the rules the contracts declare (services/common/callers.py)."""

from __future__ import annotations

import pytest

# Imported for their descriptors: the policy reads the rules of the generated modules a process loads.
from parley.auth.v1 import auth_pb2  # noqa: F401
from parley.billing.v1 import billing_pb2  # noqa: F401
from services.common.callers import DEFAULT_CALLERS, CallerPolicy
from services.common.errors import PermissionDenied

SERVICES = (
    "parley.auth.v1.AuthService",
    "parley.auth.v1.AuthInternalService",
    "parley.billing.v1.BillingService",
    "parley.billing.v1.BillingInternalService",
)
CHECK_API_KEY = "/parley.auth.v1.AuthInternalService/CheckApiKey"
RESERVE_CREDITS = "/parley.billing.v1.BillingInternalService/ReserveCredits"
LOGIN = "/parley.auth.v1.AuthService/Login"
GET_JWKS = "/parley.auth.v1.AuthService/GetJwks"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


@pytest.fixture(scope="module")
def policy() -> CallerPolicy:
    return CallerPolicy.from_contracts(SERVICES)


def test_internal_methods_are_served_to_the_callers_they_name(policy: CallerPolicy) -> None:
    assert policy.allowed_callers(CHECK_API_KEY) == frozenset({"edge"})
    assert policy.allowed_callers(RESERVE_CREDITS) == frozenset({"chat"})


def test_methods_naming_no_callers_are_served_to_the_gateway_and_the_operator(policy: CallerPolicy) -> None:
    assert frozenset({"gateway", "operator"}) == DEFAULT_CALLERS
    assert policy.allowed_callers(LOGIN) == DEFAULT_CALLERS
    assert policy.allowed_callers("/parley.auth.v1.AuthService/NotInTheContract") == DEFAULT_CALLERS


def test_the_jwks_is_served_to_every_process_that_verifies_tokens(policy: CallerPolicy) -> None:
    assert policy.allowed_callers(GET_JWKS) == frozenset(
        {"gateway", "operator", "edge", "chat", "billing", "analytics"}
    )


@pytest.mark.parametrize("method", [HEALTH_CHECK, REFLECTION, "/grpc.reflection.v1alpha.ServerReflection/X"])
def test_health_and_reflection_answer_every_workload(policy: CallerPolicy, method: str) -> None:
    assert policy.allowed_callers(method) is None
    policy.check(frozenset({"chat"}), method)


@pytest.mark.parametrize(
    ("caller", "method"),
    [
        ({"edge"}, CHECK_API_KEY),
        ({"gateway", "edge"}, CHECK_API_KEY),
        ({"chat"}, RESERVE_CREDITS),
        ({"gateway"}, LOGIN),
        ({"operator"}, LOGIN),
        ({"auth", "chat", "billing", "analytics"}, GET_JWKS),
    ],
)
def test_allowed_callers_pass(policy: CallerPolicy, caller: set[str], method: str) -> None:
    policy.check(frozenset(caller), method)


@pytest.mark.parametrize(
    ("caller", "method", "named"),
    [
        ({"chat"}, CHECK_API_KEY, "chat"),
        ({"gateway"}, CHECK_API_KEY, "gateway"),
        ({"operator"}, CHECK_API_KEY, "operator"),
        ({"edge"}, RESERVE_CREDITS, "edge"),
        ({"gateway"}, RESERVE_CREDITS, "gateway"),
        ({"auth", "billing"}, LOGIN, "auth,billing"),
        (set(), HEALTH_CHECK, "none"),
        (set(), LOGIN, "none"),
    ],
)
def test_other_callers_are_refused_with_a_stable_reason(
    policy: CallerPolicy, caller: set[str], method: str, named: str
) -> None:
    with pytest.raises(PermissionDenied) as refused:
        policy.check(frozenset(caller), method)
    assert refused.value.reason == "CALLER_NOT_ALLOWED"
    assert refused.value.metadata == {"caller": named, "method": method.lstrip("/")}


def test_a_policy_without_contract_rules_uses_its_default() -> None:
    edge = CallerPolicy({}, default=frozenset({"gateway"}))
    edge.check(frozenset({"gateway"}), "/envoy.service.auth.v3.Authorization/Check")
    with pytest.raises(PermissionDenied):
        edge.check(frozenset({"operator"}), "/envoy.service.auth.v3.Authorization/Check")
    edge.check(frozenset({"operator"}), HEALTH_CHECK)
