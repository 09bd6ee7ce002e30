"""Orders in the accounts table, beside the user's balances (`ORDER#<orderId>`)."""

from __future__ import annotations

from user_credits.domain.orders import Order
from user_credits.store.models import ORDER_PREFIX, OrderRecord


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


def list_orders(user_id: str) -> list[Order]:
    records = OrderRecord.query(user_id, OrderRecord.sk.startswith(ORDER_PREFIX))
    return [to_order(r) for r in records if isinstance(r, OrderRecord)]
