"""Mails billing asks the email worker to send (`email.requested`), to the address billing knows.

Billing learns addresses from auth's events (`user.registered`, `user.email_verified`) into
`billing_customers`; it never reads auth's tables. A user billing has no address for yet gets no
mail, and the reason is logged: the billing change itself stands.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from parley.events.v1 import events_pb2
from services.billing.ports import BillingUnitOfWork

logger = logging.getLogger(__name__)


async def request_mail(
    uow: BillingUnitOfWork, user_id: str, template: str, params: Mapping[str, str]
) -> None:
    """Queue the mail in the caller's unit of work, so it is sent exactly when the change commits."""
    customer = await uow.customers.get(user_id)
    if customer is None:
        logger.info("no address for user %s yet; the %s mail is not sent", user_id, template)
        return
    uow.outbox.record(
        subject=user_id,
        payload=events_pb2.EmailRequested(
            template=template,
            recipient=customer.email,
            user_id=user_id,
            params={"display_name": customer.display_name, **params},
        ),
    )
