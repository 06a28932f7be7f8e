"""The rate-limit data file: what envoy/ratelimits.yaml says, how descriptors find their rule, and
every way a file is refused."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.ratelimit import (
    DEFAULT_RATE_LIMITS_FILE,
    LimitDecision,
    RateLimitConfig,
    RateLimitConfigError,
    RateLimitRule,
    load_rate_limit_config,
    parse_rate_limit_config,
    rate_limited_error,
)
from services.common.settings import SettingsError


@pytest.fixture(scope="module")
def config() -> RateLimitConfig:
    return load_rate_limit_config()


def minimal_document() -> dict[str, Any]:
    return {
        "domain": "parley",
        "limits": [
            {
                "name": "per_user",
                "descriptor": {"limit": "user_plan"},
                "key": ["user"],
                "rate": {"requests": 60, "per_s": 60},
                "burst": 20,
            },
            {
                "name": "login_ip",
                "descriptor": {"limit": "login"},
                "key": ["remote_address"],
                "rate": {"requests": 30, "per_s": 60},
                "burst": 10,
            },
        ],
        "routes": {
            "default": {"on_failure": "allow", "descriptors": [{"limit": "user_plan", "entries": ["user"]}]},
            "methods": {
                "parley.auth.v1.AuthService/Login": {
                    "on_failure": "deny",
                    "descriptors": [{"limit": "login", "entries": ["remote_address"]}],
                }
            },
        },
    }


# --- the shipped file ----------------------------------------------------------------------------


def test_the_shipped_file_loads(config: RateLimitConfig) -> None:
    assert config.domain == "parley"
    assert config.source == str(DEFAULT_RATE_LIMITS_FILE)
    names = [rule.name for rule in config.rules]
    assert len(names) == len(set(names))
    assert {
        "plan_free",
        "plan_pro",
        "plan_team",
        "plan_other",
        "anonymous",
        "login_ip",
        "login_email",
    } <= set(names)
    pro = config.rule("plan_pro")
    assert (pro.requests, pro.per_s, pro.burst, pro.shadow) == (600, 60.0, 100, False)
    assert pro.emission_interval_s == pytest.approx(0.1)
    assert pro.burst_window_s == pytest.approx(10.0)
    assert dict(pro.descriptor) == {"limit": "user_plan", "plan": "pro"}
    assert pro.key == ("user",)


def test_the_shipped_routes(config: RateLimitConfig) -> None:
    default = config.routes.default
    assert default.on_failure == "allow"
    assert [(d.limit, d.entries, d.only_anonymous) for d in default.descriptors] == [
        ("user_plan", ("plan", "user"), False),
        ("anonymous", ("remote_address",), True),
    ]
    login = config.routes.methods["parley.auth.v1.AuthService/Login"]
    assert login.on_failure == "deny"
    assert [(d.limit, d.entries) for d in login.descriptors] == [("login", ("remote_address",))]
    assert config.routes.methods["parley.chat.v1.ChatService/SendMessage"].on_failure == "allow"
    for method, route in config.routes.methods.items():
        assert "/" in method
        assert route.descriptors


# --- matching ------------------------------------------------------------------------------------


def test_the_most_specific_rule_wins(config: RateLimitConfig) -> None:
    pro = config.match([("limit", "user_plan"), ("plan", "pro"), ("user", "u-1")])
    assert pro == (config.rule("plan_pro"), "rl:plan_pro:u-1")
    unknown_plan = config.match([("limit", "user_plan"), ("plan", "platinum"), ("user", "u-1")])
    assert unknown_plan == (config.rule("plan_other"), "rl:plan_other:u-1")
    no_plan = config.match([("limit", "user_plan"), ("user", "u-1")])
    assert no_plan == (config.rule("plan_other"), "rl:plan_other:u-1")


def test_specificity_does_not_depend_on_file_order() -> None:
    document = minimal_document()
    document["limits"].append(
        {
            "name": "per_user_pro",
            "descriptor": {"limit": "user_plan", "plan": "pro"},
            "key": ["user"],
            "rate": {"requests": 600, "per_s": 60},
            "burst": 100,
        }
    )
    config = parse_rate_limit_config(document)
    found = config.match([("limit", "user_plan"), ("user", "u"), ("plan", "pro")])
    assert found is not None
    assert found[0].name == "per_user_pro"


def test_a_descriptor_without_the_key_entries_matches_nothing(config: RateLimitConfig) -> None:
    assert config.match([("limit", "user_plan"), ("plan", "pro")]) is None
    assert config.match([("limit", "login")]) is None


def test_unknown_descriptors_match_nothing(config: RateLimitConfig) -> None:
    assert config.match([("limit", "no_such_limit"), ("user", "u-1")]) is None
    assert config.match([("user", "u-1")]) is None
    assert config.match([]) is None


def test_extra_entries_do_not_prevent_a_match(config: RateLimitConfig) -> None:
    found = config.match([("limit", "login"), ("remote_address", "203.0.113.9"), ("user", "u-1")])
    assert found == (config.rule("login_ip"), "rl:login_ip:203.0.113.9")


def test_email_keys_are_hashed(config: RateLimitConfig) -> None:
    found = config.match([("limit", "login_email"), ("email", "alice@example.com")])
    assert found is not None
    rule, key = found
    assert rule.name == "login_email"
    digest = hashlib.sha256(b"alice@example.com").hexdigest()[:32]
    assert key == f"rl:login_email:{digest}"
    assert "alice" not in key


def test_key_values_cannot_collide_through_separators() -> None:
    document = minimal_document()
    document["limits"][0]["key"] = ["user", "remote_address"]
    document["routes"]["default"]["descriptors"][0]["entries"] = ["user", "remote_address"]
    config = parse_rate_limit_config(document)
    first = config.match([("limit", "user_plan"), ("user", "a:b"), ("remote_address", "c")])
    second = config.match([("limit", "user_plan"), ("user", "a"), ("remote_address", "b:c")])
    assert first is not None
    assert second is not None
    assert first[1] != second[1]
    ipv6 = config.match([("limit", "user_plan"), ("user", "u"), ("remote_address", "2001:db8::1")])
    assert ipv6 is not None
    assert ipv6[1] == "rl:per_user:u:2001%3Adb8%3A%3A1"


# --- validation ----------------------------------------------------------------------------------


def _set(path: tuple[Any, ...], value: Any) -> Any:
    def mutate(document: dict[str, Any]) -> None:
        target: Any = document
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return mutate


def _delete(path: tuple[Any, ...]) -> Any:
    def mutate(document: dict[str, Any]) -> None:
        target: Any = document
        for part in path[:-1]:
            target = target[part]
        del target[path[-1]]

    return mutate


def _append_limit(**overrides: Any) -> Any:
    def mutate(document: dict[str, Any]) -> None:
        limit = copy.deepcopy(document["limits"][0])
        limit.update(overrides)
        document["limits"].append(limit)

    return mutate


LOGIN = "parley.auth.v1.AuthService/Login"
INVALID_DOCUMENTS = [
    pytest.param(
        _set(("surprise",), 1),
        "surprise: unknown key (allowed here: domain, limits, routes)",
        id="unknown-top-key",
    ),
    pytest.param(_delete(("domain",)), "domain: required key is missing", id="missing-domain"),
    pytest.param(_set(("limits",), []), "limits: Tuple should have at least 1 item", id="no-limits"),
    pytest.param(
        _set(("limits", 0, "burst_size"), 3),
        "limits[0].burst_size: unknown key; did you mean 'burst'? "
        "(allowed here: burst, descriptor, key, name, rate, shadow)",
        id="unknown-limit-key",
    ),
    pytest.param(
        _set(("limits", 0, "rate", "per"), "1m"),
        "limits[0].rate.per: unknown key; did you mean 'per_s'? (allowed here: per_s, requests)",
        id="unknown-rate-key",
    ),
    pytest.param(
        _set(("limits", 0, "rate", "requests"), 0),
        "limits[0].rate.requests: Input should be greater than 0 (got 0)",
        id="zero-rate",
    ),
    pytest.param(
        _set(("limits", 0, "rate", "requests"), 1.5),
        "limits[0].rate.requests: Input should be a valid integer (got 1.5)",
        id="float-req",
    ),
    pytest.param(
        _set(("limits", 0, "rate", "per_s"), -60),
        "limits[0].rate.per_s: Input should be greater than 0",
        id="negative-per",
    ),
    pytest.param(
        _set(("limits", 0, "rate", "per_s"), True),
        "limits[0].rate.per_s: Input should be a valid number (got True)",
        id="bool-per",
    ),
    pytest.param(
        _set(("limits", 0, "rate", "per_s"), "60"),
        "limits[0].rate.per_s: Input should be a valid number (got '60')",
        id="text-per",
    ),
    pytest.param(
        _set(("limits", 0, "rate", "per_s"), 1e-9),
        "limits[0].rate: is faster than one request per microsecond",
        id="too-fast",
    ),
    pytest.param(
        _set(("limits", 0, "burst"), 0), "limits[0].burst: Input should be greater than 0", id="zero-burst"
    ),
    pytest.param(
        _set(("limits", 0, "shadow"), "yes"),
        "limits[0].shadow: Input should be a valid boolean",
        id="shadow-text",
    ),
    pytest.param(
        _set(("limits", 0, "name"), "Per-User"),
        "limits[0].name: 'Per-User' must be lower_snake_case",
        id="bad-name",
    ),
    pytest.param(
        _set(("limits", 0, "descriptor"), {"plan": "pro"}),
        "limits[0].descriptor: needs a 'limit' entry",
        id="no-limit",
    ),
    pytest.param(
        _set(("limits", 0, "descriptor", "plan"), 3),
        "limits[0].descriptor.plan: Input should be a valid string (got 3)",
        id="int-val",
    ),
    pytest.param(
        _set(("limits", 0, "key"), []), "limits[0].key: Tuple should have at least 1 item", id="empty-key"
    ),
    pytest.param(
        _set(("limits", 0, "key"), ["limit"]), "limits[0]: key repeats descriptor entries", id="key-overlap"
    ),
    pytest.param(
        _append_limit(descriptor={"limit": "other"}), "duplicate limit name 'per_user'", id="dup-name"
    ),
    pytest.param(_append_limit(name="per_user_again"), "have the same descriptor", id="dup-descriptor"),
    pytest.param(
        _delete(("routes", "default")), "routes.default: required key is missing", id="no-default-route"
    ),
    pytest.param(
        _set(("routes", "extra"), {}),
        "routes.extra: unknown key (allowed here: default, exempt, methods)",
        id="unknown-routes-key",
    ),
    pytest.param(
        _set(("routes", "default", "on_failure"), "open"),
        "routes.default.on_failure: Input should be 'allow' or 'deny' (got 'open')",
        id="on-failure",
    ),
    pytest.param(
        _set(("routes", "default", "descriptors"), []),
        "routes.default.descriptors: Tuple should have at least 1 item",
        id="no-desc",
    ),
    pytest.param(
        _set(("routes", "default", "descriptors", 0, "entries"), ["user", "header"]),
        "routes.default.descriptors[0].entries[1]: Input should be 'remote_address', 'user' or 'plan'",
        id="unknown-source",
    ),
    pytest.param(
        _set(("routes", "default", "descriptors", 0, "entries"), ["user", "user"]),
        "routes.default.descriptors[0].entries: names a source twice",
        id="repeated-source",
    ),
    pytest.param(
        _set(("routes", "default", "descriptors", 0, "only_anonymous"), 1),
        "routes.default.descriptors[0].only_anonymous: Input should be a valid boolean (got 1)",
        id="only-anonymous-int",
    ),
    pytest.param(
        _set(("routes", "default", "descriptors", 0, "shadow"), True),
        "routes.default.descriptors[0].shadow: unknown key (allowed here: entries, limit, only_anonymous)",
        id="unknown-desc-key",
    ),
    pytest.param(
        _set(("routes", "default", "descriptors", 0, "limit"), "nobody"),
        "routes.default.descriptors[0]: no limit has descriptor limit 'nobody'",
        id="uncovered-limit",
    ),
    pytest.param(
        _set(("routes", "default", "descriptors", 0, "entries"), ["plan"]),
        "can never match a 'user_plan' limit (per_user)",
        id="missing-key-entry",
    ),
    pytest.param(
        _set(("routes", "default", "descriptors"), [{"limit": "login", "entries": ["remote_address"]}] * 2),
        "routes.default.descriptors: sends limit 'login' twice",
        id="repeated-limit",
    ),
    pytest.param(
        _set(("routes", "methods", "AuthService.Login"), {"on_failure": "deny", "descriptors": []}),
        "routes.methods['AuthService.Login']: the key 'AuthService.Login' is not a gRPC method",
        id="bad-method-name",
    ),
    pytest.param(
        _set(("routes", "methods"), ["x"]), "routes.methods must be a mapping, got list", id="methods-list"
    ),
    pytest.param(
        _set(("routes", "exempt"), [LOGIN]),
        f"exempt: '{LOGIN}' also has limits under routes.methods",
        id="exempt-and-limited",
    ),
    pytest.param(
        _set(("routes", "methods", LOGIN, "descriptors", 0, "limit"), "register"),
        f"routes.methods['{LOGIN}'].descriptors[0]: no limit has descriptor limit 'register'",
        id="uncovered-method-limit",
    ),
]


@pytest.mark.parametrize(("mutate", "problem"), INVALID_DOCUMENTS)
def test_an_invalid_file_is_refused_in_one_line(mutate: Any, problem: str, tmp_path: Path) -> None:
    document = minimal_document()
    parse_rate_limit_config(document)  # the baseline is valid
    mutate(document)
    path = tmp_path / "ratelimits.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    with pytest.raises(RateLimitConfigError) as raised:
        load_rate_limit_config(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ")
    assert problem in message
    assert "\n" not in message
    # A bad rate-limit file is a settings error: `parley` prints it in one line and exits 2.
    assert isinstance(raised.value, SettingsError)


def test_a_file_that_is_not_yaml_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "ratelimits.yaml"
    path.write_text("limits: [\n  {name: a\n", encoding="utf-8")
    with pytest.raises(RateLimitConfigError) as raised:
        load_rate_limit_config(path)
    assert str(raised.value).startswith(f"{path}: is not valid YAML")
    assert "\n" not in str(raised.value)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(RateLimitConfigError, match="cannot be read"):
        load_rate_limit_config(path)


def test_a_document_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(RateLimitConfigError, match="the document must be a mapping, got list"):
        parse_rate_limit_config(["limits"], source="inline")


@pytest.mark.parametrize(
    "overrides",
    [{"requests": 0}, {"per_s": 0.0}, {"burst": 0}, {"descriptor": {"plan": "pro"}}],
    ids=["requests", "per_s", "burst", "no-limit-entry"],
)
def test_rules_built_in_code_are_checked_too(overrides: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "name": "coded",
        "descriptor": {"limit": "coded"},
        "key": ("user",),
        "requests": 1,
        "per_s": 1.0,
        "burst": 1,
        **overrides,
    }
    with pytest.raises(ValueError, match="coded"):
        RateLimitRule(**fields)


# --- the error a refused request gets ------------------------------------------------------------


def _decision(rule: RateLimitRule, *, allowed: bool, retry_after_s: float) -> LimitDecision:
    return LimitDecision(
        rule=rule,
        allowed=allowed,
        limit=rule.burst,
        remaining=0,
        reset_after_s=9.0,
        retry_after_s=retry_after_s,
    )


def test_the_error_names_the_binding_limit_and_never_the_key(config: RateLimitConfig) -> None:
    login_ip, login_email, shadowed = (
        config.rule("login_ip"),
        config.rule("login_email"),
        config.rule("plan_pro"),
    )
    shadow = RateLimitRule(**{**vars(shadowed), "name": "shadowed", "shadow": True})
    error = rate_limited_error(
        [
            _decision(login_ip, allowed=False, retry_after_s=1.2),
            _decision(login_email, allowed=False, retry_after_s=5.5),
            _decision(shadow, allowed=False, retry_after_s=60.0),
        ]
    )
    assert error.reason == "RATE_LIMITED"
    assert error.metadata == {"limit": "login_email", "retry_after_s": "6"}
    assert (
        error.message
        == "Rate limit login_email exceeded (10 requests per minute with bursts of 5); retry in 6 s."
    )
    assert [v.subject for v in error.quota_violations] == ["login_ip:remote_address", "login_email:email"]
    assert "retry in 2 s" in error.quota_violations[0].description


def test_an_allowed_request_has_no_error(config: RateLimitConfig) -> None:
    with pytest.raises(ValueError, match="allowed"):
        rate_limited_error([_decision(config.rule("login_ip"), allowed=True, retry_after_s=0)])
