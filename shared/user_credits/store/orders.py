"""Orders in the accounts table, beside the user's balances (`ORDER#<orderId>`)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pynamodb.expressions.operand import Path
from pynamodb.expressions.update import Action
from pynamodb.transactions import TransactWrite

from user_credits.domain.changes import Change, Event
from user_credits.domain.clock import utc_now
from user_credits.domain.orders import Order
from user_credits.store.models import LIMIT_PREFIX, ORDER_PREFIX, OrderRecord, PurchaseLimitRecord, order_sk


def orders_among(items: Sequence[Mapping[str, Any]]) -> list[Order]:
    """The orders among raw items of a user's partition."""
    return [to_order(OrderRecord.from_raw_data(dict(item))) for item in items
            if item.get("itemType", {}).get("S") == "order"]


def to_order(record: OrderRecord) -> Order:
    return Order(
        order_id=record.orderId,
        user_id=record.userId,
        offer_id=record.offerId,
        offer_group=record.offerGroup,
        quantity=int(record.quantity),
        amount=int(record.amount),
        currency=record.currency,
        status=record.status,
        tokens=int(record.tokens),
        created_at=record.createdAt,
        starts_at=record.startsAt,
        expires_at=record.expiresAt,
        payment_intent_id=record.paymentIntentId,
    )


def list_orders(user_id: str, *, consistent: bool = False) -> list[Order]:
    records = OrderRecord.query(user_id, OrderRecord.sk.startswith(ORDER_PREFIX), consistent_read=consistent)
    return [to_order(r) for r in records if isinstance(r, OrderRecord)]


@dataclass(frozen=True)
class LimitLock:
    """The user's `LIMIT#<offerId>` item as read: its version (None: no order of the offer yet)."""

    user_id: str
    offer_id: str
    version: int | None


def read_limit_lock(user_id: str, offer_id: str) -> LimitLock:
    try:
        record = PurchaseLimitRecord.get(user_id, LIMIT_PREFIX + offer_id, consistent_read=True)
    except PurchaseLimitRecord.DoesNotExist:
        return LimitLock(user_id, offer_id, None)
    return LimitLock(user_id, offer_id, int(record.ver))


def stage_limit_lock(tx: TransactWrite, lock: LimitLock) -> None:
    """Bump the lock from the version read: a concurrent order of the same offer fails this transaction."""
    field = PurchaseLimitRecord.ver
    condition = field.does_not_exist() if lock.version is None else field == lock.version
    tx.update(PurchaseLimitRecord(lock.user_id, LIMIT_PREFIX + lock.offer_id),
              actions=[Path("itemType").set("limit"), field.set((lock.version or 0) + 1)], condition=condition)


def read_order(user_id: str, order_id: str) -> OrderRecord | None:
    """The order as stored (consistent read), or None; only its owner's partition is searched."""
    try:
        record = OrderRecord.get(user_id, order_sk(order_id), consistent_read=True)
    except OrderRecord.DoesNotExist:
        return None
    return record if isinstance(record, OrderRecord) else None


def find_order_key_by_payment_intent(payment_intent_id: str) -> tuple[str, str] | None:
    """(userId, orderId) from the sparse byPaymentIntent index; the caller then reads the order by key.

    The index is eventually consistent and keys-only, so it only points the way: the order itself is
    always read with a consistent GetItem before any decision is made.
    """
    # A low-level query: the model's query would filter on the discriminator, which a keys-only
    # projection does not carry.
    page = OrderRecord._get_connection().query(
        payment_intent_id, index_name=OrderRecord.byPaymentIntent.Meta.index_name, limit=1
    )
    for item in page.get("Items", []):
        user_id, sk = item["userId"]["S"], item["sk"]["S"]
        if sk.startswith(ORDER_PREFIX):
            return user_id, sk[len(ORDER_PREFIX):]
    return None


def new_order_record(order: Order, *, credits: list[dict[str, Any]], offer_snapshot: dict[str, Any]) -> OrderRecord:
    return OrderRecord(
        order.user_id, order_sk(order.order_id), orderId=order.order_id, offerId=order.offer_id,
        offerGroup=order.offer_group, quantity=order.quantity, amount=order.amount, currency=order.currency,
        status=order.status, tokens=order.tokens, createdAt=order.created_at, startsAt=order.starts_at,
        expiresAt=order.expires_at, paymentIntentId=order.payment_intent_id, credits=credits,
        revokedTokens=0, amountRefunded=0, offerSnapshot=offer_snapshot,
    )


def stage_new_order(tx: TransactWrite, record: OrderRecord) -> None:
    """Put the order; fails the transaction if an order with this id exists (a replayed create)."""
    tx.save(record, condition=OrderRecord.sk.does_not_exist())


def stage_order_update(
    tx: TransactWrite, record: OrderRecord, actions: list[Action], at: datetime | None = None,
    events: Sequence[Event] = (),
) -> None:
    """Update the order only if its status and refunded amount are still what we read; `events` (that
    change no balance) travel on the order as its `change`, for the stream function to send.

    This is the exactly-once guard of the webhook: a duplicate or concurrent delivery read the same
    status, so only one of them can commit; the others re-read and find nothing left to do.
    """
    condition = (OrderRecord.status == record.status) & (OrderRecord.amountRefunded == int(record.amountRefunded))
    # A refund remembered before its payment must not slip in between a payment's read and its commit.
    if record.pendingRefund is None:
        condition = condition & OrderRecord.pendingRefund.does_not_exist()
    else:
        condition = condition & (OrderRecord.pendingRefund == int(record.pendingRefund))
    if events:
        change = Change(uuid.uuid4().hex, at or utc_now(), events=tuple(events))
        actions = [*actions, OrderRecord.change.set(change.to_json())]
    tx.update(record, actions=actions, condition=condition)
