"""Per-email rate limits for sign-in and password-reset mail.

The gateway limits these endpoints per client address, but it cannot read request bodies, so the
budgets keyed on the email address (`login_email`, `forgot_password_email` in envoy/ratelimits.yaml)
are spent here, with the same rules and the same limiter (Redis, shared by every replica; memory
when embedded). Unknown and existing addresses spend alike, so the limit reveals no account.
"""

from __future__ import annotations

from services.common.ratelimit import (
    LimitRequest,
    RateLimitConfig,
    RateLimiter,
    is_allowed,
    rate_limited_error,
)

LOGIN_EMAIL_LIMIT = "login_email"
FORGOT_PASSWORD_EMAIL_LIMIT = "forgot_password_email"  # noqa: S105 - a limit name


class EmailRateLimits:
    """Spends one request of an email's budget, or refuses with RATE_LIMITED (429, Retry-After).

    A limiter that cannot answer raises RATE_LIMITER_UNAVAILABLE: both endpoints fail closed, as
    they do at the gateway, so an outage never grants unlimited guesses or mails.
    """

    def __init__(self, config: RateLimitConfig, limiter: RateLimiter) -> None:
        self._config = config
        self._limiter = limiter

    async def spend(self, limit: str, address: str) -> None:
        """`address` in its canonical spelling (`emails.normalize_email`), so that every spelling of
        one address spends one budget."""
        matched = self._config.match([("limit", limit), ("email", address)])
        if matched is None:
            return  # the rules file does not limit this endpoint per email
        rule, counter_key = matched
        decisions = await self._limiter.acquire([LimitRequest(counter_key, rule)])
        if not is_allowed(decisions):
            raise rate_limited_error(decisions)
