"""What the billing service hosts."""

from __future__ import annotations

from pathlib import Path
from secrets import token_urlsafe
from typing import Final

from pydantic import SecretStr

from parley.billing.v1 import billing_pb2, billing_pb2_grpc
from services.billing.checkout import Checkout
from services.billing.collections import Collections
from services.billing.customer_admin import CustomerAdmin
from services.billing.event_handlers import billing_subscription, reservation_sweeper
from services.billing.invoices import InvoiceBook
from services.billing.ledger import CreditLedger
from services.billing.payments import PaymentProvider, SandboxPaymentProvider
from services.billing.plan_admin import PlanAdmin, plan_rate_limit_tiers
from services.billing.plans import PlanCatalog
from services.billing.repository import billing_units_of_work, credit_fast_path
from services.billing.servicer import BillingAdminServicer, BillingInternalServicer, BillingServicer
from services.billing.stripe_provider import StripePaymentProvider
from services.billing.subscriptions import SubscriptionManager
from services.common.cache import read_cache_invalidation
from services.common.context import ServiceBundle, ServiceContext
from services.common.data_dir import secret_file
from services.common.model_catalog import load_model_catalog
from services.common.ratelimit import load_rate_limit_config
from services.common.server import ServiceRegistration, contract_only_services


def build(context: ServiceContext) -> ServiceBundle:
    units = billing_units_of_work(context.database)
    units.after_commit(read_cache_invalidation(context.read_cache))
    plans = PlanCatalog(units, context.read_cache)
    subscriptions = SubscriptionManager(units, plans)
    models = load_model_catalog()
    ledger = CreditLedger(units, subscriptions, models, fast_path=credit_fast_path(context.database))
    provider, unconfigured = payment_provider(context)
    checkout = Checkout(units, subscriptions, ledger, provider, unconfigured_reason=unconfigured)
    invoices = InvoiceBook(units)
    public = ServiceRegistration(
        full_name=billing_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name,
        servicer=BillingServicer(plans, subscriptions, ledger, checkout, invoices),
        add_to_server=billing_pb2_grpc.add_BillingServiceServicer_to_server,
    )
    internal = ServiceRegistration(
        full_name=billing_pb2.DESCRIPTOR.services_by_name["BillingInternalService"].full_name,
        servicer=BillingInternalServicer(ledger),
        add_to_server=billing_pb2_grpc.add_BillingInternalServiceServicer_to_server,
    )
    rate_limit_tiers = plan_rate_limit_tiers(load_rate_limit_config(context.settings.rate_limits_file))
    admin = ServiceRegistration(
        full_name=billing_pb2.DESCRIPTOR.services_by_name["BillingAdminService"].full_name,
        servicer=BillingAdminServicer(
            PlanAdmin(units, models, rate_limit_tiers),
            CustomerAdmin(units, subscriptions, invoices, provider, unconfigured_reason=unconfigured),
        ),
        add_to_server=billing_pb2_grpc.add_BillingAdminServiceServicer_to_server,
    )
    others = contract_only_services(
        billing_pb2,
        billing_pb2_grpc,
        except_services=["BillingService", "BillingInternalService", "BillingAdminService"],
    )
    return ServiceBundle(
        registrations=[public, internal, admin, *others],
        subscriptions=[
            billing_subscription(units, subscriptions, Collections(units, subscriptions, provider))
        ],
        background=[reservation_sweeper(ledger)],
        on_stop=[provider.aclose] if isinstance(provider, StripePaymentProvider) else [],
    )


# Where embedded mode keeps the sandbox's webhook signing secret, under the data dir.
EMBEDDED_WEBHOOK_SECRET_PATH: Final = Path("secrets") / "billing-webhook"


def payment_provider(context: ServiceContext) -> tuple[PaymentProvider | None, str]:
    """The configured provider, or None with the reason payments are off (a deployment without webhook
    secrets still serves everything else; its payment RPCs answer PAYMENT_PROVIDER_UNAVAILABLE)."""
    settings = context.settings
    configured = settings.billing_webhook_secrets
    if configured is not None:
        secrets = [secret.strip() for secret in configured.get_secret_value().split(",") if secret.strip()]
    elif context.embedded and settings.billing_payment_provider == "sandbox":
        # Stripe issues its signing secret; one made here would verify nothing Stripe sends.
        secrets = [secret_file(settings.data_dir / EMBEDDED_WEBHOOK_SECRET_PATH, _new_webhook_secret)]
    else:
        secrets = []
    if not secrets:
        return None, "set PARLEY_BILLING_WEBHOOK_SECRETS to the payment provider's webhook signing secrets"
    if settings.billing_payment_provider == "sandbox":
        return SandboxPaymentProvider(secrets), ""
    api_key = (settings.billing_stripe_api_key or SecretStr("")).get_secret_value().strip()
    if not api_key:
        return None, "set PARLEY_BILLING_STRIPE_API_KEY to the Stripe account's secret API key"
    return StripePaymentProvider(SecretStr(api_key), secrets, api_base=settings.billing_stripe_api_base), ""


def _new_webhook_secret() -> str:
    return "whsec_" + token_urlsafe(32)
