"""The access rules the contracts declare, as the services and the edge read them."""

from __future__ import annotations

from parley.auth.v1 import auth_pb2
from parley.billing.v1 import billing_pb2
from services.common.method_access import access_by_path, access_of, method_path, sensitive_paths


def test_internal_methods_name_their_callers() -> None:
    rules = access_by_path(
        [
            auth_pb2.DESCRIPTOR.services_by_name["AuthInternalService"],
            billing_pb2.DESCRIPTOR.services_by_name["BillingInternalService"],
        ]
    )
    assert list(rules["/parley.auth.v1.AuthInternalService/CheckApiKey"].callers) == ["edge"]
    assert list(rules["/parley.billing.v1.BillingInternalService/ReserveCredits"].callers) == ["chat"]
    assert all(access.callers for access in rules.values())


def test_credential_changing_methods_are_sensitive_and_others_are_not() -> None:
    service = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]
    assert sensitive_paths(access_by_path([service])) == {
        "/parley.auth.v1.AuthService/ChangePassword",
        "/parley.auth.v1.AuthService/CreateApiKey",
        "/parley.auth.v1.AuthService/UpdateCurrentUser",
    }


def test_a_method_without_the_option_gets_the_defaults() -> None:
    login = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].methods_by_name["Login"]
    assert method_path(login) == "/parley.auth.v1.AuthService/Login"
    assert list(access_of(login).callers) == []
    assert access_of(login).sensitive is False
