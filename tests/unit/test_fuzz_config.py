"""The gateway fuzz run's configuration (tests/fuzz/): every operation it names exists in the OpenAPI
document, the not-built operations it lets answer 501 are exactly the RPCs nobody implemented, its
summary counts what the reports hold, and Parley's own checks tell a Parley error from others."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
from schemathesis import Response

from gateway.descriptors import DescriptorIndex
from services.common.contracts import descriptor_set_bytes, openapi_path
from tests.fuzz import hooks
from tests.fuzz.gateway import (
    CONFIG_FILE,
    NOT_BUILT_STATUSES,
    effective_config,
    operation_labels,
    summarize,
)
from tests.fuzz.not_built import is_built, not_built_operations, operation_ids, registered_servicers

# The operations that would end the fuzz pass's own credential (see tests/fuzz/schemathesis.toml).
CREDENTIAL_ENDING = {
    "AuthService_Logout",
    "AuthService_RevokeSession",
    "AuthService_RevokeApiKey",
    "AuthService_ChangePassword",
    "AuthAdminService_DisableUser",
    "AuthAdminService_SetUserRoles",
}


def openapi_operation_ids() -> set[str]:
    document = json.loads(openapi_path().read_text(encoding="utf-8"))
    return set(operation_labels(document).values())


def named_operation_ids(config: dict[str, Any]) -> list[str]:
    """Every operationId an `[[operations]]` table of a schemathesis config selects."""
    named: list[str] = []
    for table in config.get("operations", []):
        for key in ("include-operation-id", "exclude-operation-id"):
            value = table.get(key, [])
            named.extend([value] if isinstance(value, str) else value)
    return named


@pytest.fixture(scope="module")
def not_built(tmp_path_factory: pytest.TempPathFactory) -> frozenset[str]:
    return not_built_operations(tmp_path_factory.mktemp("wiring"))


def test_every_operation_the_config_names_exists() -> None:
    config = tomllib.loads(CONFIG_FILE.read_text(encoding="utf-8"))
    named = named_operation_ids(config)
    assert named
    assert set(named) <= openapi_operation_ids()


def test_the_excluded_operations_are_the_credential_ending_ones() -> None:
    config = tomllib.loads(CONFIG_FILE.read_text(encoding="utf-8"))
    excluded = [
        table["include-operation-id"] for table in config["operations"] if table.get("enabled") is False
    ]
    assert [set(ids) for ids in excluded] == [CREDENTIAL_ENDING]


def test_the_operation_ids_follow_the_openapi_generator() -> None:
    derived = {
        operation_id
        for _, _, operation_id in operation_ids(DescriptorIndex.from_bytes(descriptor_set_bytes()))
    }
    assert derived == openapi_operation_ids()


def test_not_built_operations_exist_and_exclude_what_is_built(not_built: frozenset[str]) -> None:
    assert not_built <= openapi_operation_ids()
    # Built today (README, "What is built so far"): auth, billing's public API, models.
    for built in (
        "AuthService_Login",
        "AuthService_GetCurrentUser",
        "BillingService_ListPlans",
        "BillingService_GetSubscription",
        "ChatService_ListModels",
    ):
        assert built not in not_built
    # Contract only today: every analytics RPC and the conversations.
    assert {"AnalyticsService_ListUsage", "ChatService_ListConversations"} <= not_built


class RecordingContext:
    """What a generated placeholder method does to its context: sets UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


def test_each_not_built_operation_reaches_the_unimplemented_placeholder(
    not_built: frozenset[str], tmp_path: Path
) -> None:
    """The marker means what it says: the registered servicer's method is the generated one, which
    raises NotImplementedError (the interceptor's UNIMPLEMENTED / NOT_IMPLEMENTED, HTTP 501)."""
    servicers = registered_servicers(tmp_path)
    index = DescriptorIndex.from_bytes(descriptor_set_bytes())
    checked = set()
    for service_name, method_name, operation_id in operation_ids(index):
        servicer = servicers[service_name]
        assert is_built(servicer, method_name) == (operation_id not in not_built)
        if operation_id in not_built:
            context = RecordingContext()
            with pytest.raises(NotImplementedError):
                getattr(servicer, method_name)(None, context)
            assert context.code == grpc.StatusCode.UNIMPLEMENTED
            checked.add(operation_id)
    assert checked == not_built


def test_the_effective_config_lets_only_not_built_operations_answer_501() -> None:
    text = effective_config(["BillingService_GetSubscription", "ChatService_ListConversations"])
    config = tomllib.loads(text)
    allowances = [
        table
        for table in config["operations"]
        if "expected-statuses" in table.get("checks", {}).get("not_a_server_error", {})
    ]
    assert len(allowances) == 1
    assert allowances[0]["include-operation-id"] == [
        "BillingService_GetSubscription",
        "ChatService_ListConversations",
    ]
    assert allowances[0]["checks"]["not_a_server_error"]["expected-statuses"] == NOT_BUILT_STATUSES


def scenario(label: str, exchanges: list[tuple[str, int, list[tuple[str, str]]]]) -> str:
    """One NDJSON ScenarioFinished event: (case id, response status, [(check, outcome)]) per case."""
    method, path = label.split(" ", 1)
    recorder = {
        "label": label,
        "interactions": {
            case_id: {
                "request": {"method": method, "uri": f"http://gateway{path}"},
                "response": {"status_code": status, "content": "{}"},
            }
            for case_id, status, _ in exchanges
        },
        "checks": {
            case_id: [{"name": name, "status": outcome} for name, outcome in checks]
            for case_id, _, checks in exchanges
        },
    }
    return json.dumps({"ScenarioFinished": {"recorder": recorder}})


def test_the_summary_counts_responses_5xx_and_failures_per_check(tmp_path: Path) -> None:
    ndjson = tmp_path / "events.ndjson"
    ndjson.write_text(
        "\n".join(
            [
                json.dumps({"EngineStarted": {}}),
                scenario(
                    "GET /v1/billing/subscription",
                    [
                        ("a", 501, [("not_a_server_error", "success")]),
                        ("b", 400, [("not_a_server_error", "success")]),
                    ],
                ),
                scenario(
                    "GET /v1/billing/plans",
                    [
                        ("c", 501, [("not_a_server_error", "failure")]),
                        ("d", 503, [("not_a_server_error", "failure"), ("parley_error_shape", "failure")]),
                        ("e", 200, [("response_schema_conformance", "success")]),
                    ],
                ),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    report = tmp_path / "report.json"
    report.write_text(
        json.dumps(
            {"operations": {"tested": 2}, "test_cases": {"generated": 5}, "failures": [], "errors": []}
        ),
        encoding="utf-8",
    )
    summary = summarize(
        "jwt",
        exit_code=1,
        elapsed_s=3.0,
        json_report=report,
        ndjson_report=ndjson,
        labels={
            "GET /v1/billing/subscription": "BillingService_GetSubscription",
            "GET /v1/billing/plans": "BillingService_ListPlans",
        },
        not_built=frozenset({"BillingService_GetSubscription"}),
    )
    assert (summary.cases, summary.responses, summary.operations_tested) == (5, 5, 2)
    assert summary.statuses == {"200": 1, "400": 1, "501": 2, "503": 1}
    # The not-built operation's 501 is allowed; the built one's 501 and the 503 are not.
    assert (summary.server_errors, summary.unexpected_server_errors) == (3, 2)
    assert summary.failures_per_check == {
        "not_a_server_error": 2,
        "parley_error_shape": 1,
        "response_schema_conformance": 0,
    }
    assert [example["request"] for example in summary.failure_examples["unexpected_5xx"]] == [
        "GET http://gateway/v1/billing/plans",
        "GET http://gateway/v1/billing/plans",
    ]
    assert not summary.passed


# --- Parley's own checks (tests/fuzz/hooks.py), on responses as the gateway gives them -------------------


def gateway_response(status: int, body: object, *, headers: dict[str, list[str]] | None = None) -> Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Response(
        status_code=status,
        headers=headers or {"content-type": ["application/json"]},
        content=content,
        request=requests.Request("GET", "http://gateway/v1/models").prepare(),
        elapsed=0.01,
        verify=False,
    )


def status_body(code: int, reason: str, message: str = "Something was refused.") -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "details": [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": "parley.dev"},
            {"@type": "type.googleapis.com/google.rpc.RequestInfo", "request_id": "r-1"},
        ],
    }


# The checks never look at the context or the case.
UNUSED: Any = None


def test_parley_error_shape_accepts_a_parley_status_and_ignores_successes() -> None:
    assert hooks.parley_error_shape(UNUSED, gateway_response(400, status_body(3, "INVALID_ARGUMENT")), UNUSED)
    assert hooks.parley_error_shape(UNUSED, gateway_response(200, {"models": []}), UNUSED) is None


@pytest.mark.parametrize(
    "response",
    [
        # What a QUERY request got: a Status with an empty message (and a null request id).
        gateway_response(400, status_body(3, "MALFORMED_REQUEST", message="")),
        gateway_response(404, b"no healthy upstream", headers={"content-type": ["text/plain"]}),
        gateway_response(400, {"code": 3, "message": "bad", "details": []}),
        gateway_response(
            403,
            {
                "code": 7,
                "message": "Refused.",
                "details": [
                    {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "X", "domain": "x.io"}
                ],
            },
        ),
    ],
    ids=["empty-message", "text-plain", "no-error-info", "foreign-domain"],
)
def test_parley_error_shape_refuses_other_errors(response: Response) -> None:
    with pytest.raises(AssertionError):
        hooks.parley_error_shape(UNUSED, response, UNUSED)


def test_no_internals_leak() -> None:
    assert hooks.no_internals_leak(UNUSED, gateway_response(200, {}), UNUSED)
    leaking = gateway_response(200, {}, headers={"content-type": ["application/json"], "grpc-status": ["0"]})
    with pytest.raises(AssertionError, match="grpc-status"):
        hooks.no_internals_leak(UNUSED, leaking, UNUSED)
    with pytest.raises(AssertionError, match="stack trace"):
        hooks.no_internals_leak(
            UNUSED, gateway_response(500, b"Traceback (most recent call last):\n"), UNUSED
        )


def test_a_501_must_be_not_implemented() -> None:
    honest = gateway_response(501, status_body(12, "NOT_IMPLEMENTED"))
    assert hooks.not_implemented_is_declared(UNUSED, honest, UNUSED)
    with pytest.raises(AssertionError):
        hooks.not_implemented_is_declared(
            UNUSED, gateway_response(501, status_body(12, "UNAVAILABLE")), UNUSED
        )
