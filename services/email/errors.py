"""What can go wrong with one email, split by what the worker should do about it.

`TemporaryDeliveryError`: try again later (SMTP 4xx, the server unreachable or slow, our own
per-domain limit, SMTP misconfiguration an operator can fix). `PermanentDeliveryError`: retrying
cannot help (SMTP 5xx for this message, a template that does not exist or lacks a parameter), so
the job is dead-lettered at once.

Messages never carry template parameters: they may hold single-use tokens.
"""

from __future__ import annotations

from collections.abc import Iterable


class EmailDeliveryError(Exception):
    """One email could not be delivered; `smtp_code` is the server's reply code when there was one."""

    def __init__(self, message: str, *, smtp_code: int | None = None) -> None:
        super().__init__(message)
        self.smtp_code = smtp_code


class TemporaryDeliveryError(EmailDeliveryError):
    """Worth retrying; `retry_after_s` is the earliest sensible retry when known."""

    def __init__(
        self, message: str, *, smtp_code: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, smtp_code=smtp_code)
        self.retry_after_s = retry_after_s


class PermanentDeliveryError(EmailDeliveryError):
    """Retrying cannot help: dead-letter the job and record an `EmailFailed(permanent=True)`."""

    # Read by the consumer framework: dead-letter at once instead of retrying.
    retryable = False


class DomainRateLimitedError(TemporaryDeliveryError):
    """The recipient's domain has had its share of mail for now."""


class NotYetDueError(TemporaryDeliveryError):
    """The job asked to be sent no earlier than a time still in the future."""


class EmailTemplateError(PermanentDeliveryError):
    """The job names a template, or carries parameters, that cannot make an email."""


class UnknownTemplateError(EmailTemplateError):
    """No template has this name."""

    def __init__(self, template: str) -> None:
        super().__init__(f"no email template named {template!r}")
        self.template = template


class MissingTemplateParamError(EmailTemplateError):
    """The job lacks parameters the template needs."""

    def __init__(self, template: str, missing: Iterable[str]) -> None:
        self.missing = tuple(sorted(missing))
        super().__init__(f"email template {template!r} needs parameter(s) {', '.join(self.missing)}")
        self.template = template


class InvalidTemplateParamError(EmailTemplateError):
    """A parameter has a value the template cannot use (named, never shown: it may be a secret)."""

    def __init__(self, template: str, param: str, problem: str) -> None:
        super().__init__(f"email template {template!r}: parameter {param!r} {problem}")
        self.template = template
        self.param = param
