"""Which calls are safe, i.e. only read (RFC 9110 section 9.2.1): the one definition behind the CSRF
checks (the gateway's, the services' and the auth service's session check) and the gateway's retry
policy.

- An HTTP request is safe when its method is GET, HEAD or OPTIONS.
- A gRPC method is safe when its `google.api.http` rule binds it to a safe HTTP method; for the rules
  Parley writes, that is GET. A method with no rule (internal RPCs) or unknown to the descriptor pool
  counts as state-changing.
"""

from __future__ import annotations

from typing import Final

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pool

SAFE_HTTP_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})


def is_safe_http_method(method: str) -> bool:
    return method.upper() in SAFE_HTTP_METHODS


def http_rule_verb(rule: http_pb2.HttpRule) -> str:
    """The upper-case HTTP method of a `google.api.http` rule's own binding; "" when it binds none."""
    pattern = rule.WhichOneof("pattern")
    if pattern is None:
        return ""
    verb: str = rule.custom.kind if pattern == "custom" else pattern
    return verb.upper()


def is_safe_http_rule(rule: http_pb2.HttpRule | None) -> bool:
    """Whether a gRPC method with this rule (None: it has none) is safe."""
    return rule is not None and is_safe_http_method(http_rule_verb(rule))


class SafeMethods:
    """Whether a gRPC method (`/package.Service/Method`) is safe, from its rule in a descriptor pool.

    Answers are remembered per method; a malformed name or a method the pool does not know is not safe.
    """

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool or descriptor_pool.Default()
        self._answers: dict[str, bool] = {}

    def __call__(self, full_method: str) -> bool:
        answer = self._answers.get(full_method)
        if answer is None:
            answer = self._is_safe(full_method)
            self._answers[full_method] = answer
        return answer

    def _is_safe(self, full_method: str) -> bool:
        _, service, method = full_method.split("/", 2) if full_method.count("/") == 2 else ("", "", "")
        if not service or not method:
            return False
        try:
            descriptor = self._pool.FindMethodByName(f"{service}.{method}")
        except KeyError:
            return False
        options = descriptor.GetOptions()
        if not options.HasExtension(annotations_pb2.http):
            return False
        return is_safe_http_rule(options.Extensions[annotations_pb2.http])
