"""Per-call state, set by the interceptors and read by domain code and the log formatter."""

from __future__ import annotations

from contextvars import ContextVar

from services.common.identity import ANONYMOUS, Identity

current_request_id: ContextVar[str | None] = ContextVar("parley_request_id", default=None)
current_identity: ContextVar[Identity] = ContextVar("parley_identity", default=ANONYMOUS)
current_method: ContextVar[str | None] = ContextVar("parley_method", default=None)
# True when the call's peer proved to be the gateway's workload: only then are its forwarding headers trusted.
current_via_gateway: ContextVar[bool] = ContextVar("parley_via_gateway", default=False)
