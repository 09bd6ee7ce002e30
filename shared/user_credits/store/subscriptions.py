"""Customers, subscriptions and credited invoices: items of the user's partition (SPEC 2.10)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from pynamodb.exceptions import PutError
from pynamodb.expressions.operand import Path
from pynamodb.transactions import TransactWrite

from user_credits.domain.changes import Change, Event
from user_credits.domain.subscriptions import Subscription
from user_credits.store.models import (
    CUSTOMER_SK,
    INVOICE_PREFIX,
    SUBSCRIPTION_PREFIX,
    CustomerRecord,
    InvoiceRecord,
    SubscriptionRecord,
)


def read_customer(user_id: str) -> str | None:
    try:
        record = CustomerRecord.get(user_id, CUSTOMER_SK, consistent_read=True)
    except CustomerRecord.DoesNotExist:
        return None
    return str(record.customerId)


def save_customer(user_id: str, customer_id: str, now: datetime) -> str:
    """Remember the user's Customer once; if one is already remembered, that one stays (and is returned)."""
    try:
        CustomerRecord(user_id, CUSTOMER_SK, customerId=customer_id, createdAt=now).save(
            condition=CustomerRecord.sk.does_not_exist())
    except PutError as error:
        if error.cause_response_code != "ConditionalCheckFailedException":
            raise
        stored = read_customer(user_id)
        assert stored is not None
        return stored
    return customer_id


def _to_subscription(record: SubscriptionRecord) -> Subscription:
    return Subscription(
        subscription_id=record.subscriptionId, user_id=record.userId, offer_id=record.offerId,
        offer_group=record.offerGroup, order_id=record.orderId, quantity=int(record.quantity), status=record.status,
        current_period_end=record.currentPeriodEnd, cancel_at_period_end=bool(record.cancelAtPeriodEnd),
        status_at=int(record.statusAt or 0),
    )


def read_subscription(user_id: str, subscription_id: str) -> Subscription | None:
    try:
        record = SubscriptionRecord.get(user_id, SUBSCRIPTION_PREFIX + subscription_id, consistent_read=True)
    except SubscriptionRecord.DoesNotExist:
        return None
    return _to_subscription(record)


def list_subscriptions(user_id: str) -> list[Subscription]:
    records = SubscriptionRecord.query(user_id, SubscriptionRecord.sk.startswith(SUBSCRIPTION_PREFIX),
                                       consistent_read=True)
    return sorted((_to_subscription(r) for r in records if isinstance(r, SubscriptionRecord)),
                  key=lambda s: s.subscription_id)


def stage_subscription(
    tx: TransactWrite, before: Subscription | None, after: Subscription, at: datetime, events: Sequence[Event] = (),
) -> None:
    """Write the subscription as `after`, only if it is still as read (`before`; None: not there yet).
    Its `events` travel on the item as its `change`, for the stream function to send."""
    record = SubscriptionRecord(
        after.user_id, SUBSCRIPTION_PREFIX + after.subscription_id, subscriptionId=after.subscription_id,
        offerId=after.offer_id, offerGroup=after.offer_group, orderId=after.order_id, quantity=after.quantity,
        status=after.status, currentPeriodEnd=after.current_period_end, cancelAtPeriodEnd=after.cancel_at_period_end,
        statusAt=after.status_at,
        change=Change(uuid.uuid4().hex, at, events=tuple(events)).to_json() if events else None,
    )
    if before is None:
        condition = SubscriptionRecord.sk.does_not_exist()
    else:
        condition = (SubscriptionRecord.status == before.status) & (
            SubscriptionRecord.statusAt == before.status_at)
        period = SubscriptionRecord.currentPeriodEnd
        condition &= period.does_not_exist() if before.current_period_end is None else (
            period == before.current_period_end)
    tx.save(record, condition=condition)


def invoice_credited(user_id: str, invoice_id: str) -> bool:
    try:
        InvoiceRecord.get(user_id, INVOICE_PREFIX + invoice_id, consistent_read=True)
    except InvoiceRecord.DoesNotExist:
        return False
    return True


def stage_invoice(tx: TransactWrite, user_id: str, invoice_id: str, subscription_id: str, at: datetime) -> None:
    """The record that this invoice credited its lot, with that credit: a second credit fails on it."""
    tx.save(InvoiceRecord(user_id, INVOICE_PREFIX + invoice_id, invoiceId=invoice_id, subscriptionId=subscription_id,
                          creditedAt=at), condition=Path("sk").does_not_exist())
