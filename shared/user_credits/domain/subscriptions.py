"""Subscriptions (SPEC 2.10): a recurring offer bought through Stripe, credited one lot per paid invoice."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from user_credits.domain.clock import to_iso

# Stripe's statuses after which a subscription credits nothing more.
ENDED: Final = frozenset({"canceled", "incomplete_expired"})


@dataclass(frozen=True)
class Subscription:
    subscription_id: str
    user_id: str
    offer_id: str
    offer_group: str
    order_id: str
    quantity: int
    status: str
    current_period_end: datetime | None = None
    cancel_at_period_end: bool = False
    # Stripe's `created` of the event the status came from: an older event changes nothing.
    status_at: int = 0

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    def to_json(self) -> dict[str, Any]:
        return {
            "subscriptionId": self.subscription_id, "offerId": self.offer_id, "offerGroup": self.offer_group,
            "status": self.status, "currentPeriodEnd": to_iso(self.current_period_end),
            "cancelAtPeriodEnd": self.cancel_at_period_end, "quantity": self.quantity,
        }
