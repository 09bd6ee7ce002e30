"""Orders: one purchase of `quantity` units of an offer in one currency."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from user_credits.domain.clock import to_iso
from user_credits.domain.offers import Holdings

STATUSES: Final = ("pending", "paid", "failed", "canceled", "inconsistent", "refunded", "partially_refunded")
# What "a paid order" means everywhere (unlocking, `subscribed`, GET /credits): the payment arrived and
# was not refunded in full. A partial refund takes back tokens, not the purchase itself.
PAID_STATUSES: Final = ("paid", "partially_refunded")


@dataclass(frozen=True)
class Order:
    order_id: str
    user_id: str
    offer_id: str
    offer_group: str
    quantity: int
    amount: int
    currency: str
    status: str
    tokens: int
    created_at: datetime
    starts_at: datetime | None = None
    expires_at: datetime | None = None
    payment_intent_id: str | None = None

    def credits_active(self, now: datetime) -> bool:
        """A paid order whose credits have not expired (SPEC 2.2: unlocks and subscribes)."""
        return self.status in PAID_STATUSES and (self.expires_at is None or self.expires_at > now)

    def to_json(self, client_secret: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "orderId": self.order_id,
            "userId": self.user_id,
            "offerId": self.offer_id,
            "offerGroup": self.offer_group,
            "quantity": self.quantity,
            "amount": self.amount,
            "currency": self.currency,
            "status": self.status,
            "tokens": self.tokens,
            "createdAt": to_iso(self.created_at),
            "startsAt": to_iso(self.starts_at),
            "expiresAt": to_iso(self.expires_at),
            "paymentIntentId": self.payment_intent_id,
        }
        if client_secret is not None:
            body["clientSecret"] = client_secret
        return body


def holdings_from_orders(orders: Iterable[Order], now: datetime) -> Holdings:
    active = [o for o in orders if o.credits_active(now)]
    return Holdings(
        unlocked_groups=frozenset(o.offer_group for o in active),
        subscribed_offers=frozenset(o.offer_id for o in active),
    )
