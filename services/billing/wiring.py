"""What the billing service hosts."""

from __future__ import annotations

from parley.billing.v1 import billing_pb2, billing_pb2_grpc
from services.billing.event_handlers import billing_subscription, reservation_sweeper
from services.billing.ledger import CreditLedger
from services.billing.plans import PlanCatalog
from services.billing.repository import billing_units_of_work
from services.billing.servicer import BillingInternalServicer, BillingServicer
from services.billing.subscriptions import SubscriptionManager
from services.common.cache import read_cache_invalidation
from services.common.context import ServiceBundle, ServiceContext
from services.common.model_catalog import load_model_catalog
from services.common.server import ServiceRegistration, contract_only_services


def build(context: ServiceContext) -> ServiceBundle:
    units = billing_units_of_work(context.database)
    units.after_commit(read_cache_invalidation(context.read_cache))
    plans = PlanCatalog(units, context.read_cache)
    subscriptions = SubscriptionManager(units, plans)
    ledger = CreditLedger(units, subscriptions, load_model_catalog())
    public = ServiceRegistration(
        full_name=billing_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name,
        # The RPCs BillingServicer does not override yet answer UNIMPLEMENTED (see contract_only).
        servicer=BillingServicer(plans, subscriptions, ledger),  # type: ignore[abstract]
        add_to_server=billing_pb2_grpc.add_BillingServiceServicer_to_server,
    )
    internal = ServiceRegistration(
        full_name=billing_pb2.DESCRIPTOR.services_by_name["BillingInternalService"].full_name,
        servicer=BillingInternalServicer(ledger),
        add_to_server=billing_pb2_grpc.add_BillingInternalServiceServicer_to_server,
    )
    others = contract_only_services(
        billing_pb2, billing_pb2_grpc, except_services=["BillingService", "BillingInternalService"]
    )
    return ServiceBundle(
        registrations=[public, internal, *others],
        subscriptions=[billing_subscription(units, subscriptions)],
        background=[reservation_sweeper(ledger)],
    )
