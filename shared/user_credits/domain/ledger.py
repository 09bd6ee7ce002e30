"""Ledger entries: every change of a balance. For each (user, group): balance == sum of deltas."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from user_credits.domain.clock import to_iso

REASONS: Final = ("purchase", "renewal", "consume", "hold", "release", "expire", "refund", "grant")


@dataclass(frozen=True)
class LedgerEntry:
    user_id: str
    offer_group: str
    delta: int
    balance_after: int
    reason: str
    at: datetime
    seq: int
    order_id: str | None = None
    idempotency_key: str | None = None
    shortfall: int | None = None
    # SPEC 3 entry `note`: a grant's free-text `reason`.
    note: str | None = None
    lot_id: str | None = None
    hold_id: str | None = None
    subscription_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "offerGroup": self.offer_group,
            "delta": self.delta,
            "balanceAfter": self.balance_after,
            "reason": self.reason,
            "seq": self.seq,
            "at": to_iso(self.at),
        }
        if self.lot_id is not None:
            body["lotId"] = self.lot_id
        if self.order_id is not None:
            body["orderId"] = self.order_id
        if self.hold_id is not None:
            body["holdId"] = self.hold_id
        if self.subscription_id is not None:
            body["subscriptionId"] = self.subscription_id
        if self.idempotency_key is not None:
            body["idempotencyKey"] = self.idempotency_key
        if self.shortfall:
            body["shortfall"] = self.shortfall
        if self.note is not None:
            body["note"] = self.note
        return body


def entry_key(at: datetime, offer_group: str, seq: int) -> str:
    """Sortable by time, unique per (group, seq): the same change always maps to the same item."""
    return f"{at.strftime('%Y%m%dT%H%M%S.%f')}#{offer_group}#{seq:012d}"
