"""SPEC 2.10: Stripe Checkout, the customer portal, and subscriptions renewed every cycle.

- Checkout: the offer is checked as an order is (SPEC 2.3, 2.11), the user's one Stripe Customer is
  created once, the Checkout Session is created with the order's id as idempotency key, then the
  order (pending, with its session id) is stored with the key's record in one transaction.
- `invoice.paid` credits one lot per invoice, expiring at the end of the period it pays, in one
  transaction with the invoice's record (`INVOICE#<id>`, which a second credit fails on), the
  subscription's state and, for the first invoice, the order becoming paid. Duplicate, concurrent and
  out-of-order deliveries: the invoice's record makes the credit happen once, whatever came first.
- The subscription's status follows `customer.subscription.updated` / `.deleted` and
  `invoice.payment_failed`, each applied only if it is not older (Stripe's `created`) than the state
  it would replace, since Stripe does not deliver in order. A canceled subscription credits nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final

from pynamodb.transactions import TransactWrite

from user_credits.domain.changes import Event
from user_credits.domain.clock import to_iso, utc_now
from user_credits.domain.crediting import purchase_terms
from user_credits.domain.durations import stripe_interval
from user_credits.domain.lots import NewLot
from user_credits.domain.offers import Offer
from user_credits.domain.orders import Order
from user_credits.domain.subscriptions import Subscription
from user_credits.errors import CustomerNotFound, ValidationFailed
from user_credits.logic import expiry, purchases
from user_credits.observability import logger
from user_credits.payments import gateway
from user_credits.payments.webhooks import StripeEvent
from user_credits.store import idempotency
from user_credits.store import orders as order_store
from user_credits.store import subscriptions as store
from user_credits.store.balances import GroupState, read_group, stage_group_change
from user_credits.store.models import OrderRecord
from user_credits.store.transactions import commit, optimistic

CHECKOUT_ROUTE: Final = "POST /checkout"


# ---------------------------------------------------------------- checkout and the portal


@dataclass(frozen=True)
class CheckoutRequest:
    offer_id: str
    success_url: str
    cancel_url: str
    quantity: int = 1
    currency: str | None = None


def checkout(
    user_id: str, request: CheckoutRequest, body: Mapping[str, Any], key: str | None,
) -> tuple[int, dict[str, Any]]:
    """POST /checkout: 201 {"orderId", "sessionId", "url"}. With an Idempotency-Key a repeat replays."""
    keyed = idempotency.keyed_call(user_id, CHECKOUT_ROUTE, key, body)
    if keyed.replay is not None:
        return keyed.replay.status_code, keyed.replay.body
    now = utc_now()
    offer, currency = purchases.orderable_offer(
        user_id, purchases.OrderRequest(request.offer_id, request.quantity, request.currency), now,
        for_checkout=True)
    amount = offer.prices[currency] * request.quantity
    if amount == 0 and offer.billing != "recurring":
        raise ValidationFailed(f"{offer.offer_id!r} is free: it is ordered with POST /orders, no payment page")
    items = purchases.item_offers(offer)
    lines = purchase_terms(offer, request.quantity, items)
    lock = purchases.check_purchase_limit(user_id, offer)
    order_id = purchases.order_id_for(user_id, key)
    customer_id = _customer(user_id, now)
    session = gateway.create_checkout_session(
        order_id=order_id, user_id=user_id, offer_id=offer.offer_id, customer_id=customer_id,
        line=_line(offer, currency, request.quantity), success_url=request.success_url,
        cancel_url=request.cancel_url,
    )
    order = Order(
        order_id=order_id, user_id=user_id, offer_id=offer.offer_id, offer_group=offer.offer_group,
        quantity=request.quantity, amount=amount, currency=currency, status="pending",
        tokens=offer.tokens * request.quantity, created_at=now,
    )
    response = {"orderId": order_id, "sessionId": session.session_id, "url": session.url}
    snapshot = purchases.offer_snapshot(offer, items, lines)
    record = order_store.new_order_record(order, credits=[], offer_snapshot=snapshot)
    record.sessionId = session.session_id
    record.checkoutMode = "subscription" if offer.billing == "recurring" else "payment"
    return purchases.store_pending_order(record, lock, keyed, response, now, metric="Checkouts")


def _line(offer: Offer, currency: str, quantity: int) -> gateway.CheckoutLine:
    interval: tuple[str, int] | tuple[None, None] = (None, None)
    if offer.billing == "recurring":
        interval = stripe_interval(offer.cycle)
    return gateway.CheckoutLine(name=offer.name or offer.offer_id, currency=currency,
                                unit_amount=offer.prices[currency], quantity=quantity, interval=interval[0],
                                interval_count=interval[1])


def _customer(user_id: str, now: datetime) -> str:
    """The user's one Stripe Customer, created on the first checkout (SPEC 2.10)."""
    found = store.read_customer(user_id)
    if found is not None:
        return found
    return store.save_customer(user_id, gateway.create_customer(user_id=user_id), now)


def billing_portal(user_id: str, return_url: str) -> dict[str, Any]:
    """POST /billing-portal: 201 {"url"} of a Stripe customer portal session; 404 before any checkout."""
    customer_id = store.read_customer(user_id)
    if customer_id is None:
        raise CustomerNotFound("this user has no Stripe customer yet: check out first")
    return {"url": gateway.create_portal_session(customer_id=customer_id, return_url=return_url)}


# ---------------------------------------------------------------- reading Stripe's objects


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _id_of(value: Any) -> str | None:
    """A field that is an id, or the object it names when expanded."""
    if isinstance(value, str) and value:
        return value
    found = _mapping(value).get("id")
    return found if isinstance(found, str) and found else None


def invoice_subscription(invoice: Mapping[str, Any]) -> tuple[str | None, Mapping[str, Any]]:
    """The invoice's subscription id and that subscription's metadata: under `parent.subscription_details`
    since Stripe API 2025-03-31, at the top level (`subscription`, `subscription_details`) before."""
    details = _mapping(_mapping(invoice.get("parent")).get("subscription_details"))
    subscription = _id_of(details.get("subscription")) or _id_of(invoice.get("subscription"))
    metadata = _mapping(details.get("metadata")) or _mapping(_mapping(invoice.get("subscription_details")).get(
        "metadata"))
    if not metadata:
        lines = _mapping(invoice.get("lines")).get("data") or []
        metadata = next((_mapping(line.get("metadata")) for line in lines if _mapping(line.get("metadata"))), {})
    return subscription, metadata


def invoice_period(invoice: Mapping[str, Any]) -> tuple[datetime, datetime] | None:
    """The period the invoice pays: from its lines (`lines.data[].period`), the earliest start to the
    latest end."""
    lines = _mapping(invoice.get("lines")).get("data") or []
    periods = [_mapping(line.get("period")) for line in lines if isinstance(line, Mapping)]
    starts = [p["start"] for p in periods if type(p.get("start")) is int]
    ends = [p["end"] for p in periods if type(p.get("end")) is int]
    if not starts or not ends:
        return None
    return datetime.fromtimestamp(min(starts), UTC), datetime.fromtimestamp(max(ends), UTC)


def _subscription_period_end(subscription: Mapping[str, Any]) -> datetime | None:
    """`current_period_end`: on the subscription's items since API 2025-03-31, at the top level before."""
    items = _mapping(subscription.get("items")).get("data") or []
    ends = [item["current_period_end"] for item in items
            if isinstance(item, Mapping) and type(item.get("current_period_end")) is int]
    if not ends and type(subscription.get("current_period_end")) is int:
        ends = [subscription["current_period_end"]]
    return datetime.fromtimestamp(max(ends), UTC) if ends else None


def _ref(metadata: Mapping[str, Any]) -> tuple[str, str] | None:
    user_id, order_id = metadata.get("userId"), metadata.get("orderId")
    if isinstance(user_id, str) and user_id and isinstance(order_id, str) and order_id:
        return user_id, order_id
    return None


def _our_order(user_id: str, order_id: str, mode: str) -> OrderRecord | None:
    """The order of a checkout the service itself created in that mode (any other is not ours)."""
    record = order_store.read_order(user_id, order_id)
    if record is None or record.sessionId is None or record.checkoutMode != mode:
        return None
    return record


# ---------------------------------------------------------------- webhook: invoices


def on_invoice_paid(event: StripeEvent) -> tuple[str, str | None]:
    """One lot per paid invoice (reason `purchase` for the subscription's first, `renewal` after)."""
    invoice = event.object
    invoice_id = event.text("id")
    subscription_id, metadata = invoice_subscription(invoice)
    ref = _ref(metadata)
    period = invoice_period(invoice)
    if invoice_id is None or subscription_id is None or ref is None or period is None:
        return "ignored_not_ours", None
    user_id, order_id = ref

    def attempt() -> tuple[str, str | None]:
        record = _our_order(user_id, order_id, "subscription")
        if record is None:
            return "ignored_unknown_order", order_id
        if store.invoice_credited(user_id, invoice_id):
            return "duplicate", order_id
        before = store.read_subscription(user_id, subscription_id)
        if before is not None and before.ended:
            return "ignored_canceled", order_id
        now = utc_now()
        problem = _invoice_mismatch(record, invoice)
        if problem is not None:
            logger.error("inconsistent invoice", extra={"order_id": order_id, "problem": problem})
            return "ignored_inconsistent", order_id
        starts, ends = period
        state = expiry.read_touched(user_id, record.offerGroup, now)
        book, movements = state.book.expire(now)
        offer = Offer.from_json(dict((record.offerSnapshot or {}).get("offer") or {}))
        first = invoice.get("billing_reason") == "subscription_create"
        reason = "purchase" if first else "renewal"
        lot = NewLot(invoice_id, "subscription", int(record.tokens), starts, ends, offer.priority,
                     order_id=order_id, subscription_id=subscription_id)
        book, movement = book.credit(lot, reason)
        movements.append(replace(movement, order_id=order_id, subscription_id=subscription_id))
        # An invoice delivered after the period it pays has ended: its lot expires at once, here (the
        # sweep has passed that time already).
        book, late = book.expire(now)
        movements += late
        current = before or Subscription(subscription_id, user_id, record.offerId, record.offerGroup, order_id,
                                         int(record.quantity), "active", status_at=0)
        after = replace(current, current_period_end=max(filter(None, (current.current_period_end, ends))))
        if current.status in ("incomplete", "past_due", "unpaid") and event.created >= current.status_at:
            # Paid: it runs again (a later subscription event still says better, see `_change_status`).
            after = replace(after, status="active", status_at=event.created)
        order_actions = _order_paid_through(record, starts, ends)

        granted, expired = _granted(user_id, record, lot, reason, now), expiry.expired_events(state, movements, now)

        def events(after_state: GroupState) -> list[Event]:
            return [*granted(after_state), *expired(after_state)]

        def build(tx: TransactWrite) -> None:
            stage_group_change(tx, state, movements, book, now, events=events)
            store.stage_invoice(tx, user_id, invoice_id, subscription_id, now)
            store.stage_subscription(tx, before, after, now)
            if order_actions:
                order_store.stage_order_update(tx, record, order_actions)

        commit(build)
        return reason, order_id

    return optimistic(attempt)


def _invoice_mismatch(record: OrderRecord, invoice: Mapping[str, Any]) -> str | None:
    paid, currency = invoice.get("amount_paid"), str(invoice.get("currency") or "").lower()
    if type(paid) is not int or paid != int(record.amount):
        return f"amount_paid {paid!r} != the subscription's price {int(record.amount)}"
    if currency != record.currency:
        return f"currency {currency!r} != {record.currency!r}"
    return None


def _order_paid_through(record: OrderRecord, starts: datetime, ends: datetime) -> list[Any]:
    """The checkout's order is paid from its first invoice on, and stands for the periods paid so far
    (so `subscribed` and unlocking follow the subscription)."""
    actions: list[Any] = []
    if record.status == "pending":
        actions += [OrderRecord.status.set("paid"), OrderRecord.startsAt.set(starts)]
    if record.expiresAt is None or record.expiresAt < ends:
        actions.append(OrderRecord.expiresAt.set(ends))
    return actions


def _granted(
    user_id: str, record: OrderRecord, lot: NewLot, reason: str, now: datetime,
) -> Callable[[GroupState], list[Event]]:
    def events(after: GroupState) -> list[Event]:
        return [Event("CreditsGranted", {
            "userId": user_id, "offerGroup": record.offerGroup, "balance": after.book.spendable(now),
            "expiresAt": to_iso(after.expires_at), "orderId": record.orderId, "subscriptionId": lot.subscription_id,
            "tokens": lot.tokens, "reason": reason, "lotIds": [lot.lot_id],
        })]

    return events


# ---------------------------------------------------------------- webhook: the subscription's status


def on_payment_failed(event: StripeEvent) -> tuple[str, str | None]:
    """`invoice.payment_failed`: the subscription is `past_due`, and SubscriptionPaymentFailed is sent."""
    subscription_id, metadata = invoice_subscription(event.object)
    ref = _ref(metadata)
    if subscription_id is None or ref is None:
        return "ignored_not_ours", None
    return _change_status(event, ref, subscription_id, lambda current: replace(current, status="past_due"),
                          "SubscriptionPaymentFailed")


def on_subscription_changed(event: StripeEvent) -> tuple[str, str | None]:
    """`customer.subscription.updated` / `.deleted`: keep Stripe's status and `cancel_at_period_end`."""
    subscription = event.object
    subscription_id = event.text("id")
    ref = _ref(_mapping(subscription.get("metadata")))
    if subscription_id is None or ref is None:
        return "ignored_not_ours", None
    deleted = event.type == "customer.subscription.deleted"
    status = "canceled" if deleted else str(subscription.get("status") or "active")
    period_end = _subscription_period_end(subscription)

    def change(current: Subscription) -> Subscription:
        return replace(current, status=status, cancel_at_period_end=bool(subscription.get("cancel_at_period_end")),
                       current_period_end=period_end or current.current_period_end)

    return _change_status(event, ref, subscription_id, change, "SubscriptionCanceled" if status == "canceled" else None)


def _change_status(
    event: StripeEvent, ref: tuple[str, str], subscription_id: str, change: Callable[[Subscription], Subscription],
    event_type: str | None,
) -> tuple[str, str | None]:
    user_id, order_id = ref
    created = event.created

    def attempt() -> tuple[str, str | None]:
        record = _our_order(user_id, order_id, "subscription")
        if record is None:
            return "ignored_unknown_order", order_id
        before = store.read_subscription(user_id, subscription_id)
        current = before or Subscription(subscription_id, user_id, record.offerId, record.offerGroup, order_id,
                                         int(record.quantity), "incomplete", status_at=0)
        # A payment failure is news once per Stripe event, whatever the status says by now (the update
        # to past_due may come first): its record, written with it, makes a redelivery a duplicate.
        failure = event_type == "SubscriptionPaymentFailed"
        if failure and purchases.event_recorded(event):
            return "duplicate", order_id
        stale = created < current.status_at or current.ended
        if stale and not failure:
            # Older than what we know (Stripe does not deliver in order), or over: nothing changes.
            return "ignored_stale", order_id
        after = current if stale else replace(change(current), status_at=created)
        if before is not None and after == before and not failure:
            return "duplicate", order_id
        events: list[Event] = []
        # A cancellation is sent once (nothing follows it).
        if event_type is not None and (failure or after.status != current.status):
            group = read_group(user_id, record.offerGroup)
            now = utc_now()
            events = [Event(event_type, {
                "userId": user_id, "offerGroup": record.offerGroup, "balance": group.book.spendable(now),
                "expiresAt": to_iso(group.expires_at), "subscriptionId": subscription_id, "orderId": order_id,
                "status": after.status,
            })]

        def build(tx: TransactWrite) -> None:
            store.stage_subscription(tx, before, after, utc_now(), events)
            if failure:
                purchases.stage_event_record(tx, event, order_id, "past_due", utc_now())

        commit(build)
        return after.status, order_id

    return optimistic(attempt)


# ---------------------------------------------------------------- webhook: one-time checkouts


def on_checkout_completed(event: StripeEvent) -> tuple[str, OrderRecord | None, str | None]:
    """`checkout.session.completed` in payment mode, paid, for a session the service created for that
    order: the order is credited as a PaymentIntent would credit it. Returns (action, order, problem)."""
    session = event.object
    if session.get("mode") != "payment":
        return "ignored_subscription_session", None, None
    if session.get("payment_status") != "paid":
        return "ignored_unpaid", None, None
    ref = _ref(_mapping(session.get("metadata")))
    if ref is None:
        return "ignored_not_ours", None, None
    record = _our_order(*ref, "payment")
    if record is None or record.sessionId != event.text("id"):
        return "ignored_foreign_session", None, None
    total, currency = session.get("amount_total"), str(session.get("currency") or "").lower()
    problem = None
    if type(total) is not int or total != int(record.amount):
        problem = f"amount_total {total!r} != order amount {int(record.amount)}"
    elif currency != record.currency:
        problem = f"currency {currency!r} != order currency {record.currency!r}"
    return "pay", record, problem


def on_checkout_expired(event: StripeEvent) -> tuple[str, str | None]:
    """`checkout.session.expired`: the customer left the page and Stripe closed it. The order of a
    session we created is `canceled`, so that it no longer counts against a `perUserLimit`."""
    ref = _ref(_mapping(event.object.get("metadata")))
    if ref is None:
        return "ignored_not_ours", None
    mode = "subscription" if event.object.get("mode") == "subscription" else "payment"

    def cancel(record: OrderRecord) -> purchases.WebhookOutcome:
        if record.sessionId != event.text("id") or record.checkoutMode != mode:
            return purchases.WebhookOutcome("ignored_foreign_session", record.orderId)
        now = utc_now()

        def build(tx: TransactWrite) -> None:
            order_store.stage_order_update(tx, record, [OrderRecord.status.set("canceled")])
            purchases.stage_event_record(tx, event, record.orderId, "canceled", now)

        commit(build)
        return purchases.WebhookOutcome("canceled", record.orderId)

    outcome = purchases.apply_to_order(event, "payment_intent", ("pending",), cancel)
    return outcome.action, outcome.order_id


def session_received(event: StripeEvent) -> dict[str, Any]:
    """What a paid Checkout Session says was paid; its PaymentIntent goes on the order (refunds find it)."""
    return {"amount": event.object.get("amount_total"), "currency": event.text("currency"),
            "sessionId": event.text("id"), "paymentIntentId": _id_of(event.object.get("payment_intent"))}

