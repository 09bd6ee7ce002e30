"""Balances: one per (user, group). The consumption and low-balance rules (SPEC 2.5, 2.7)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from user_credits.domain.clock import to_iso


@dataclass(frozen=True)
class Balance:
    user_id: str
    offer_group: str
    balance: int = 0
    expires_at: datetime | None = None

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def to_json(self) -> dict[str, Any]:
        return {"offerGroup": self.offer_group, "balance": self.balance, "expiresAt": to_iso(self.expires_at)}


def can_consume(balance: Balance, tokens: int, max_overdraft: int, now: datetime) -> bool:
    """SPEC 2.5 as a predicate; the store enforces the same rule as a DynamoDB condition."""
    return not balance.is_expired(now) and balance.balance - tokens >= -max_overdraft


def crossed_below(threshold: int | None, before: int, after: int) -> bool:
    """SPEC 2.7: one CreditsLow per consumption that takes the balance from >= threshold to < threshold."""
    return threshold is not None and before >= threshold > after
