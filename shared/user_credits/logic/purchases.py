"""Purchases (SPEC 2.3, 2.4): creating orders, and applying Stripe's word about their payment, once.

Every effect of a payment event (the order's new status, each group's balance and lots, the record of
the Stripe event) is one DynamoDB transaction, conditioned on the order's status and on each group's
sequence number as they were read. A duplicate or concurrent delivery either loses that race and
re-reads, or reads after the winner committed; either way it finds the order no longer waiting for
that event and does nothing. The ledger entries and the events travel with the write, as its
`change`, and come out of the table's stream (`logic.stream`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Final

from pynamodb.attributes import UTCDateTimeAttribute
from pynamodb.expressions.update import Action
from pynamodb.transactions import TransactWrite

from user_credits.config import load_settings
from user_credits.domain.changes import Event
from user_credits.domain.clock import to_iso, utc_now
from user_credits.domain.crediting import (
    CreditTerms,
    GroupCredit,
    GroupRevocation,
    credit_group,
    group_lines,
    purchase_terms,
    refund_status,
    revoke_from_group,
)
from user_credits.domain.lots import Book, Movement
from user_credits.domain.offers import Offer, is_visible
from user_credits.domain.orders import PAID_STATUSES, Order, holdings_from_orders
from user_credits.errors import (
    CurrencyNotSupported,
    OfferInactive,
    OfferLocked,
    OfferNotFound,
    OrderNotFound,
    PurchaseLimitReached,
    QuantityLimitExceeded,
    ServiceBusy,
    ValidationFailed,
)
from user_credits.logic import expiry
from user_credits.observability import count, logger
from user_credits.payments import gateway
from user_credits.payments.webhooks import StripeEvent
from user_credits.store import idempotency
from user_credits.store import offers as offer_store
from user_credits.store import orders as order_store
from user_credits.store.balances import GroupState, read_group, stage_group_change
from user_credits.store.models import OrderRecord
from user_credits.store.transactions import StaleRead, commit, optimistic

ORDER_ROUTE: Final = "POST /orders"
# Fixed forever: order ids derived from (user, Idempotency-Key) must come out the same after a deploy.
ORDER_ID_NAMESPACE: Final = uuid.UUID("5d0c8f0e-6f1a-4c53-9a57-0b8f3c1e2a41")
WEBHOOK_SCOPE: Final = ("stripe", "webhook")


# ---------------------------------------------------------------- creating orders


@dataclass(frozen=True)
class OrderRequest:
    offer_id: str
    quantity: int = 1
    currency: str | None = None


def order_id_for(user_id: str, key: str | None) -> str:
    """With an Idempotency-Key the id is derived from it, so a retry after a crash reuses the same
    Stripe idempotency key (the order id) and gets the same PaymentIntent, not a second one."""
    if key is None:
        return str(uuid.uuid4())
    return str(uuid.uuid5(ORDER_ID_NAMESPACE, f"{user_id}\n{key}"))


def item_offers(offer: Offer) -> dict[str, Offer]:
    items: dict[str, Offer] = {}
    for item in offer.combined_items:
        if item.offer_id not in items:
            found = offer_store.load_offer(item.offer_id)
            if found is None:
                raise OfferNotFound(f"the bundle's item offer {item.offer_id!r} does not exist")
            items[item.offer_id] = found
    return items


# SPEC 1: the orders that count against an offer's perUserLimit.
LIMITED_STATUSES: Final = frozenset({"pending", "paid", "partially_refunded"})


def check_purchase_limit(user_id: str, offer: Offer) -> order_store.LimitLock | None:
    """SPEC 2.11, before anything is written or Stripe is called: 409 when the user already has
    `perUserLimit` orders of the offer that count. The lock returned goes into the order's transaction,
    so of two orders created at once only one commits (the other re-checks, or answers 503)."""
    if offer.per_user_limit is None:
        return None
    lock = order_store.read_limit_lock(user_id, offer.offer_id)
    counted = sum(1 for order in order_store.list_orders(user_id, consistent=True)
                  if order.offer_id == offer.offer_id and order.status in LIMITED_STATUSES)
    if counted >= offer.per_user_limit:
        raise PurchaseLimitReached(f"at most {offer.per_user_limit} order(s) of {offer.offer_id!r} per user")
    return lock


def orderable_offer(
    user_id: str, request: OrderRequest, now: datetime, *, for_checkout: bool = False,
) -> tuple[Offer, str]:
    """SPEC 2.3's checks, all before any write or Stripe call; returns the offer and the currency.
    `for_checkout`: POST /checkout, which sells recurring offers too."""
    offer = offer_store.load_offer(request.offer_id)
    if offer is None:
        raise OfferNotFound(f"no offer {request.offer_id!r}")
    if not offer.active:
        raise OfferInactive(f"the offer {offer.offer_id!r} is not for sale")
    holdings = holdings_from_orders(order_store.list_orders(user_id), now)
    if not is_visible(offer, holdings):
        raise OfferLocked(f"the offer {offer.offer_id!r} is not unlocked for this user")
    if offer.quantity_limit is not None and request.quantity > offer.quantity_limit:
        raise QuantityLimitExceeded(f"at most {offer.quantity_limit} of {offer.offer_id!r} per order")
    currency = request.currency or load_settings().default_currency
    if currency not in offer.prices:
        raise CurrencyNotSupported(f"{offer.offer_id!r} has no price in {currency!r}")
    if offer.billing == "recurring" and not for_checkout:
        raise ValidationFailed(f"{offer.offer_id!r} is a subscription: it is bought with POST /checkout")
    return offer, currency


def offer_snapshot(offer: Offer, items: Mapping[str, Offer], lines: Sequence[CreditTerms]) -> dict[str, Any]:
    """What was bought, frozen at order time: a later catalog edit cannot change what is credited."""
    return {
        "offer": offer.to_json(),
        "itemOffers": {k: v.to_json() for k, v in items.items()},
        "lines": [line.to_json() for line in lines],
    }


def create_order(
    user_id: str, request: OrderRequest, body: Mapping[str, Any], key: str | None
) -> tuple[int, dict[str, Any]]:
    """POST /orders: (status, body). With an Idempotency-Key, a repeat returns the first response."""
    keyed = idempotency.keyed_call(user_id, ORDER_ROUTE, key, body)
    if keyed.replay is not None:
        return keyed.replay.status_code, keyed.replay.body
    record_key, body_hash = keyed.record_key, keyed.body_hash
    now = utc_now()
    offer, currency = orderable_offer(user_id, request, now)
    items = item_offers(offer)
    lines = purchase_terms(offer, request.quantity, items)
    order = Order(
        order_id=order_id_for(user_id, key), user_id=user_id, offer_id=offer.offer_id,
        offer_group=offer.offer_group, quantity=request.quantity, amount=offer.prices[currency] * request.quantity,
        currency=currency, status="pending", tokens=offer.tokens * request.quantity, created_at=now,
    )
    snapshot = offer_snapshot(offer, items, lines)
    if order.amount == 0:
        return _create_free_order(order, offer, lines, snapshot, record_key, body_hash)
    lock = check_purchase_limit(user_id, offer)
    intent = gateway.create_payment_intent(
        order_id=order.order_id, user_id=user_id, amount=order.amount, currency=currency
    )
    order = replace(order, payment_intent_id=intent.payment_intent_id)
    response = {"order": order.to_json(client_secret=intent.client_secret)}
    record = order_store.new_order_record(order, credits=[], offer_snapshot=snapshot)
    return store_pending_order(record, lock, keyed, response, now)


def store_pending_order(
    record: OrderRecord, lock: order_store.LimitLock | None, keyed: idempotency.KeyedCall,
    response: dict[str, Any], now: datetime, metric: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """Store a pending order (POST /orders, POST /checkout) with its limit lock and its key's record, in
    one transaction; 201 with `response` (`metric` is counted when this call stored it)."""
    def build(tx: TransactWrite) -> None:
        order_store.stage_new_order(tx, record)
        if lock is not None:
            order_store.stage_limit_lock(tx, lock)
        if keyed.record_key is not None and keyed.body_hash is not None:
            idempotency.stage_record(tx, keyed.record_key, keyed.body_hash, 201, response, now)

    try:
        commit(build)
    except StaleRead:
        # A request with the same key collides on the derived order id: answer what it answered. Else
        # a concurrent order of a limited offer won the lock: retry (it then counts that order).
        return replay_or_busy(keyed.record_key, keyed.body_hash)
    if metric is not None:
        count(metric)
    return 201, response


def replay_or_busy(record_key: str | None, body_hash: str | None) -> tuple[int, dict[str, Any]]:
    if record_key is not None and body_hash is not None:
        stored = idempotency.lookup(record_key, body_hash)
        if stored is not None:
            return stored.status_code, stored.body
    raise ServiceBusy("a request with the same Idempotency-Key is in progress, retry shortly")


def _create_free_order(
    order: Order, offer: Offer, lines: Sequence[CreditTerms], snapshot: dict[str, Any], record_key: str | None,
    body_hash: str | None,
) -> tuple[int, dict[str, Any]]:
    """An order of amount 0 is stored paid and credited in the same transaction as the webhook would."""

    def attempt() -> tuple[int, dict[str, Any]]:
        if record_key is not None and body_hash is not None:
            stored = idempotency.lookup(record_key, body_hash)
            if stored is not None:
                return stored.status_code, stored.body
        now = utc_now()
        lock = check_purchase_limit(order.user_id, offer)
        plan = plan_credit(order.user_id, order.order_id, lines, now)
        paid = plan.paid_order(order)
        response = {"order": paid.to_json()}
        record = order_store.new_order_record(paid, credits=plan.credits_json(), offer_snapshot=snapshot)

        def build(tx: TransactWrite) -> None:
            order_store.stage_new_order(tx, record)
            if lock is not None:
                order_store.stage_limit_lock(tx, lock)
            plan.stage(tx, order.user_id, order.order_id, now)
            if record_key is not None and body_hash is not None:
                idempotency.stage_record(tx, record_key, body_hash, 201, response, now)

        commit(build)
        return 201, response

    return optimistic(attempt)


def get_order(user_id: str, order_id: str) -> Order:
    """The owner's order; anyone else gets the same 404 as for an order that does not exist."""
    record = order_store.read_order(user_id, order_id)
    if record is None:
        raise OrderNotFound(f"no order {order_id!r}")
    return order_store.to_order(record)


# ---------------------------------------------------------------- crediting (shared by webhook and free orders)


def _from_order(changes: Sequence[Movement], order_id: str) -> list[Movement]:
    """The order's own movements name it; the expiry of some other lot on the way does not."""
    return [change if change.reason == "expire" else replace(change, order_id=order_id) for change in changes]


@dataclass(frozen=True)
class CreditPlan:
    """Each group the order credits, as read, and what the domain decided to do with it."""

    groups: tuple[tuple[GroupState, GroupCredit], ...]

    def paid_order(self, order: Order) -> Order:
        # The order's own period is its main line's: the first line of the first group (the offer's).
        main = self.groups[0][1].periods[0]
        return replace(order, status="paid", starts_at=main.starts_at, expires_at=main.expires_at)

    def credits_json(self) -> list[dict[str, Any]]:
        return [{"offerGroup": credit.offer_group, "tokens": credit.tokens, "revoked": 0,
                 "lots": list(credit.lot_ids)} for _, credit in self.groups]

    def books(self) -> dict[str, Book]:
        """Each group's book once the payment is in (what a refund that came first applies to)."""
        return {credit.offer_group: credit.book for _, credit in self.groups}

    def stage(
        self, tx: TransactWrite, user_id: str, order_id: str, now: datetime, refund: RefundPlan | None = None,
    ) -> None:
        """Stage each group's credit, with its CreditsGranted; `refund` (one that came before the
        payment) adds its changes."""
        for state, credit in self.groups:
            changes, book = list(credit.changes), credit.book
            revocation = None if refund is None else refund.revocations.get(credit.offer_group)
            if revocation is not None:
                changes.extend(revocation.changes)
                book = revocation.book
            stage_group_change(tx, state, _from_order(changes, order_id), book, now,
                               events=_granted(user_id, order_id, credit, now))


def plan_credit(user_id: str, order_id: str, lines: Sequence[CreditTerms], now: datetime) -> CreditPlan:
    """Read each group once and add a lot per order line for it (SPEC 2.4)."""
    groups = []
    for offer_group, group_terms in group_lines(lines).items():
        state = expiry.read_touched(user_id, offer_group, now)
        groups.append((state, credit_group(state.book, group_terms, order_id, now)))
    return CreditPlan(tuple(groups))


def _granted(user_id: str, order_id: str, credit: GroupCredit, now: datetime) -> Callable[[GroupState], list[Event]]:
    """One CreditsGranted per credited group, sent by the stream function once the write is in."""

    def events(after: GroupState) -> list[Event]:
        return [Event("CreditsGranted", {
            "userId": user_id, "offerGroup": credit.offer_group, "balance": after.book.spendable(now),
            "expiresAt": to_iso(after.expires_at), "orderId": order_id, "tokens": credit.tokens,
            "lotIds": list(credit.lot_ids),
        })]

    return events


# ---------------------------------------------------------------- the Stripe webhook


@dataclass(frozen=True)
class WebhookOutcome:
    """What one delivery did (its events travel with its write, see `domain.changes`)."""

    action: str
    order_id: str | None = None


def event_recorded(event: StripeEvent) -> bool:
    """Whether this Stripe event already had its effect (its record, see `stage_event_record`)."""
    key = idempotency.scoped_key(WEBHOOK_SCOPE[0], WEBHOOK_SCOPE[1], event.event_id)
    return idempotency.lookup(key, idempotency.request_hash({"type": event.type, "object": event.object})) is not None


# Stripe retries a delivery for up to three days: an event's record outlives that.
EVENT_RECORD_SECONDS: Final = 4 * 24 * 3600


def stage_event_record(tx: TransactWrite, event: StripeEvent, order_id: str, action: str, now: datetime) -> None:
    """The record that this Stripe event had its effect, written with that effect (kept 4 days)."""
    key = idempotency.scoped_key(WEBHOOK_SCOPE[0], WEBHOOK_SCOPE[1], event.event_id)
    idempotency.stage_record(
        tx, key, idempotency.request_hash({"type": event.type, "object": event.object}), 200,
        {"orderId": order_id, "action": action}, now, ttl_seconds=EVENT_RECORD_SECONDS,
    )


def _order_lines(record: OrderRecord) -> list[CreditTerms]:
    snapshot = record.offerSnapshot or {}
    return [CreditTerms.from_json(line) for line in snapshot.get("lines", [])]


def _mismatch(record: OrderRecord, event: StripeEvent) -> str | None:
    received, currency = event.integer("amount_received"), (event.text("currency") or "").lower()
    if received != int(record.amount):
        return f"amount_received {received} != order amount {int(record.amount)}"
    if currency != record.currency:
        return f"currency {currency!r} != order currency {record.currency!r}"
    intent_id = event.text("id")
    if record.paymentIntentId and intent_id != record.paymentIntentId:
        return f"payment intent {intent_id!r} is not the order's {record.paymentIntentId!r}"
    return None


# A payment can succeed after a failed attempt on the same PaymentIntent (the customer tries another card).
PAYABLE: Final = ("pending", "failed")


def apply_to_order(
    event: StripeEvent,
    intent_field: str,
    allowed_from: Collection[str],
    act: Callable[[OrderRecord], WebhookOutcome],
    not_allowed: str = "duplicate",
) -> WebhookOutcome:
    """Apply `act` to a fresh read of the event's order while its status allows it.

    Exactly once: `act` commits conditioned on what it read, and a retry, a redelivery or a concurrent
    delivery re-reads the order and finds it no longer in `allowed_from`.
    """
    ref = _order_key(event, intent_field)
    if ref is None:
        return WebhookOutcome("ignored_no_order")
    user_id, order_id = ref

    def attempt() -> WebhookOutcome:
        record = order_store.read_order(user_id, order_id)
        if record is None:
            logger.warning("event for an unknown order", extra={"order_id": order_id})
            return WebhookOutcome("ignored_unknown_order", order_id)
        if record.status not in allowed_from:
            return WebhookOutcome(not_allowed, order_id)
        return act(record)

    return optimistic(attempt)


def _on_payment_succeeded(event: StripeEvent) -> WebhookOutcome:
    def pay(record: OrderRecord) -> WebhookOutcome:
        return credit_paid_order(record, event, _mismatch(record, event), _received(event))

    return apply_to_order(event, "id", PAYABLE, pay)


def _received(event: StripeEvent) -> dict[str, Any]:
    """What a PaymentIntent event says was paid (for PaymentInconsistent)."""
    return {"amount": event.integer("amount_received"), "currency": event.text("currency"),
            "paymentIntentId": event.text("id")}


def credit_paid_order(
    record: OrderRecord, event: StripeEvent, problem: str | None, received: Mapping[str, Any],
) -> WebhookOutcome:
    """SPEC 2.4 for an order whose payment arrived (a PaymentIntent, or a Checkout Session in payment
    mode): `inconsistent` when `problem` (amount or currency differ), else paid and credited, once."""
    user_id, order_id = record.userId, record.orderId
    now = utc_now()
    if problem is not None:
        return _mark_inconsistent(record, event, problem, now, received)
    order = order_store.to_order(record)
    plan = plan_credit(user_id, order_id, _order_lines(record), now)
    paid = plan.paid_order(order)
    refund = _early_refund(record, plan, now)
    period = [_set_or_remove(OrderRecord.startsAt, paid.starts_at),
              _set_or_remove(OrderRecord.expiresAt, paid.expires_at)]
    if refund is None:
        action = "paid"
        order_actions = [OrderRecord.status.set("paid"), OrderRecord.credits.set(plan.credits_json()), *period]
    else:
        action = refund.status
        order_actions = [*refund.order_actions(0), OrderRecord.pendingRefund.remove(), *period]
    intent_id = received.get("paymentIntentId")
    if record.paymentIntentId is None and isinstance(intent_id, str):
        # A Checkout payment: its PaymentIntent, so that a refund (a charge names only that) finds the order.
        order_actions.append(OrderRecord.paymentIntentId.set(intent_id))

    def build(tx: TransactWrite) -> None:
        order_store.stage_order_update(tx, record, order_actions)
        plan.stage(tx, user_id, order_id, now, refund)
        stage_event_record(tx, event, order_id, "paid", now)

    commit(build)
    return WebhookOutcome(action, order_id)


@dataclass(frozen=True)
class RefundPlan:
    """What a refund takes from each group an order credited, and what the order records of it."""

    refunded: int
    status: str
    accounted: int  # tokens this refund revoked or recorded as shortfall
    credits: list[dict[str, Any]]  # the order's `credits` with `revoked` brought up to date
    revocations: dict[str, GroupRevocation]

    def order_actions(self, accounted_before: int) -> list[Action]:
        return [
            OrderRecord.status.set(self.status),
            OrderRecord.amountRefunded.set(self.refunded),
            OrderRecord.revokedTokens.set(accounted_before + self.accounted),
            OrderRecord.credits.set(self.credits),
        ]


def plan_refund(
    credits: Sequence[Mapping[str, Any]], books: Mapping[str, Book], refunded: int, amount: int,
    now: datetime,
) -> RefundPlan:
    """Each credited group gives back its share of `refunded`, less what it already gave, from the
    order's own lots first (SPEC 2.4)."""
    updated = [dict(credit) for credit in credits]
    revocations: dict[str, GroupRevocation] = {}
    accounted = 0
    for credit in updated:
        group, already = credit["offerGroup"], int(credit.get("revoked", 0))
        revocation = revoke_from_group(books[group], int(credit["tokens"]), already, refunded, amount, now,
                                       own_lots=credit.get("lots", ()))
        credit["revoked"] = already + revocation.revoked + revocation.shortfall
        accounted += revocation.revoked + revocation.shortfall
        revocations[group] = revocation
    return RefundPlan(refunded, refund_status(refunded, amount), accounted, updated, revocations)


def _early_refund(record: OrderRecord, plan: CreditPlan, now: datetime) -> RefundPlan | None:
    """A refund remembered before its payment, applied to the groups as the payment leaves them, in the
    payment's own transaction."""
    refunded = min(int(record.pendingRefund or 0), int(record.amount))
    if refunded <= 0:
        return None
    return plan_refund(plan.credits_json(), plan.books(), refunded, int(record.amount), now)


def _set_or_remove(attribute: UTCDateTimeAttribute, value: datetime | None) -> Action:
    return attribute.set(value) if value is not None else attribute.remove()


def _mark_inconsistent(
    record: OrderRecord, event: StripeEvent, problem: str, now: datetime, received: Mapping[str, Any],
) -> WebhookOutcome:
    group = read_group(record.userId, record.offerGroup)
    inconsistent = Event("PaymentInconsistent", {
        "userId": record.userId, "offerGroup": record.offerGroup, "balance": group.book.spendable(now),
        "expiresAt": to_iso(group.expires_at), "orderId": record.orderId, "problem": problem,
        "expected": {"amount": int(record.amount), "currency": record.currency},
        "received": dict(received),
    })

    def build(tx: TransactWrite) -> None:
        order_store.stage_order_update(tx, record, [OrderRecord.status.set("inconsistent")], now,
                                       events=[inconsistent])
        stage_event_record(tx, event, record.orderId, "inconsistent", now)

    commit(build)
    logger.error("inconsistent payment", extra={"order_id": record.orderId, "problem": problem})
    return WebhookOutcome("inconsistent", record.orderId)


def _status_change(new_status: str, allowed_from: tuple[str, ...]) -> Callable[[StripeEvent], WebhookOutcome]:
    """payment_failed and canceled: a status change with no credit, applied once."""

    def on_event(event: StripeEvent) -> WebhookOutcome:
        def change(record: OrderRecord) -> WebhookOutcome:
            now = utc_now()

            def build(tx: TransactWrite) -> None:
                order_store.stage_order_update(tx, record, [OrderRecord.status.set(new_status)])
                stage_event_record(tx, event, record.orderId, new_status, now)

            commit(build)
            return WebhookOutcome(new_status, record.orderId)

        return apply_to_order(event, "id", allowed_from, change)

    return on_event


def _order_key(event: StripeEvent, intent_field: str) -> tuple[str, str] | None:
    """(userId, orderId) from the metadata we set; else from the PaymentIntent id through the index.

    A charge names its PaymentIntent but carries our metadata only if someone copied it there.
    """
    ref = event.order_ref()
    if ref is not None:
        return ref
    intent_id = event.text(intent_field)
    return order_store.find_order_key_by_payment_intent(intent_id) if intent_id else None


def _on_charge_refunded(event: StripeEvent) -> WebhookOutcome:
    """Revoke floor(tokens x refunded / amount) minus what was already revoked, group by group.

    An order may credit several groups (a bundle). Each group gives back its own proportional share,
    floor(tokens credited to it x refunded / amount), computed from what the order recorded in
    `credits` when it was paid; for the offer's own group that is exactly SPEC 2.4's formula. Stripe's
    `amount_refunded` is cumulative, so a later, larger refund takes only the difference, and a
    duplicate or out-of-order (smaller) one takes nothing.
    """
    refunded = event.integer("amount_refunded")
    if refunded is None:
        return WebhookOutcome("ignored_no_order")

    def revoke(record: OrderRecord) -> WebhookOutcome:
        user_id, order_id = record.userId, record.orderId
        amount = int(record.amount)
        refunded_now = min(refunded, amount)
        if record.status in PAYABLE:
            return _remember_refund(record, event, refunded_now)
        if refunded_now <= int(record.amountRefunded):
            return WebhookOutcome("duplicate", order_id)
        now = utc_now()
        credits = record.credits or []
        states = {credit["offerGroup"]: expiry.read_touched(user_id, credit["offerGroup"], now)
                  for credit in credits}
        refund = plan_refund(credits, {g: s.book for g, s in states.items()}, refunded_now, amount, now)

        def build(tx: TransactWrite) -> None:
            order_store.stage_order_update(tx, record, refund.order_actions(int(record.revokedTokens or 0)))
            for group, revocation in refund.revocations.items():
                if revocation.changes:
                    stage_group_change(tx, states[group], _from_order(revocation.changes, order_id),
                                       revocation.book, now)
            stage_event_record(tx, event, order_id, refund.status, now)

        commit(build)
        return WebhookOutcome(refund.status, order_id)

    return apply_to_order(event, "payment_intent", (*PAID_STATUSES, *PAYABLE), revoke,
                           not_allowed="ignored_not_paid")


def _remember_refund(record: OrderRecord, event: StripeEvent, refunded: int) -> WebhookOutcome:
    """Stripe delivers out of order: a refund whose payment has not arrived yet is kept on the order
    (the largest cumulative amount seen) and applied by the payment, so it is never lost."""
    if refunded <= int(record.pendingRefund or 0):
        return WebhookOutcome("duplicate", record.orderId)
    now = utc_now()

    def build(tx: TransactWrite) -> None:
        order_store.stage_order_update(tx, record, [OrderRecord.pendingRefund.set(refunded)])
        stage_event_record(tx, event, record.orderId, "refund_remembered", now)

    commit(build)
    return WebhookOutcome("refund_remembered", record.orderId)


# The PaymentIntent and charge events (logic.stripe_events dispatches every type).
HANDLERS: Final = {
    "payment_intent.succeeded": _on_payment_succeeded,
    "payment_intent.payment_failed": _status_change("failed", ("pending",)),
    "payment_intent.canceled": _status_change("canceled", ("pending", "failed")),
    "charge.refunded": _on_charge_refunded,
}
