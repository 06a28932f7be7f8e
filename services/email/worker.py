"""The email worker's handler: one `email.requested` event in, one mail out, one outcome event recorded.

The consumer framework (`services.common.consumers.Consumer`) runs this handler with
`handler_records_processing=True`: a sent mail's `EmailSent` event and the idempotency record of the
request are written in one transaction, so a redelivered request is skipped and its outcome is
recorded exactly once.

What "once" means for the mail itself: the effect is the SMTP server's `250` reply. A worker that
dies after that reply and before the commit sends the mail again when the request is redelivered,
with the same Message-ID (derived from the event id), which receivers use to spot the copy. That
window is one commit long; a worker killed anywhere else sends each mail once.

Failures: a `PermanentDeliveryError` (SMTP 5xx, a bad template or address) is not retryable, so the
consumer dead-letters it at once; a temporary one is retried with backoff (honouring the server's or
the domain limit's `retry_after_s`) and dead-lettered after the consumer's last attempt. Either way,
before the job goes to the dead-letter stream the handler records an `EmailFailed`. No idempotency
record is written for a failure, so a `parley events dlq replay` runs the job again.
"""

from __future__ import annotations

import logging
from typing import Final

from parley.events.v1 import events_pb2
from services.common.consumers import current_delivery, is_retryable
from services.common.db import Database
from services.common.outbox import add_event
from services.common.processed_events import record_processed
from services.email.delivery import EmailDelivery, email_failed

logger = logging.getLogger(__name__)

EMAIL_CONSUMER: Final = "email"
# `Event.source` of the worker's own events (`email.sent`, `email.failed`).
EMAIL_EVENT_SOURCE: Final = "email"
# The event sources whose streams carry `email.requested`: auth (verification, reset, new login) and
# billing (receipts, failed payments, quota warnings).
EMAIL_REQUEST_SOURCES: Final = ("auth", "billing")


class EmailJobHandler:
    """Sends the mail an `email.requested` event asks for and records the outcome in the outbox."""

    def __init__(self, delivery: EmailDelivery, db: Database, *, max_attempts: int) -> None:
        self._delivery = delivery
        self._db = db
        self._max_attempts = max_attempts

    async def __call__(self, event: events_pb2.Event) -> None:
        delivery = current_delivery()
        try:
            sent = await self._delivery.deliver(event, attempts=delivery.attempt)
        except Exception as error:
            if not is_retryable(error) or delivery.attempt >= self._max_attempts:
                await self._record_failure(event, error, delivery.attempt)
            raise
        async with self._db.unit_of_work() as session:
            add_event(session, source=EMAIL_EVENT_SOURCE, subject=event.subject, payload=sent)
            record_processed(session, delivery.consumer, event.id)

    async def _record_failure(self, event: events_pb2.Event, error: BaseException, attempts: int) -> None:
        failed = email_failed(event, error, attempts=attempts)
        async with self._db.unit_of_work() as session:
            add_event(session, source=EMAIL_EVENT_SOURCE, subject=event.subject, payload=failed)
        logger.error(
            "email job %s failed for good after %d attempt(s): %s",
            event.id,
            attempts,
            failed.error,
            extra={"event_id": event.id, "template": event.email_requested.template},
        )
