"""The Accounts table's stream, read into the domain: which records carry a change, and what it did.

A record carries a change when the item's `change` differs between its old and new image (every
write that changes a balance, or sends an order's event, sets a fresh one). Anything else (a marker
removed, the sweep's position, an order's status alone) carries none and is skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from user_credits.domain.changes import Change, GroupWrite
from user_credits.store.models import BalanceRecord


@dataclass(frozen=True)
class EventsWrite:
    """An order's or a subscription's change: events with no balance change (PaymentInconsistent,
    SubscriptionPaymentFailed, SubscriptionCanceled)."""

    user_id: str
    item: str
    change: Change


def _change_text(image: Mapping[str, Any] | None) -> str | None:
    text = (image or {}).get("change", {}).get("S")
    return str(text) if text is not None else None


def read_record(dynamodb: Mapping[str, Any]) -> GroupWrite | EventsWrite | None:
    """The change a stream record's `dynamodb` part carries (DynamoDB JSON images), or None."""
    new, old = dynamodb.get("NewImage"), dynamodb.get("OldImage")
    text = _change_text(new)
    if new is None or text is None or text == _change_text(old):
        return None
    kind = new.get("itemType", {}).get("S")
    if kind == "balance":
        after = BalanceRecord.from_raw_data(dict(new))
        before = BalanceRecord.from_raw_data(dict(old)) if old else None
        return GroupWrite(
            user_id=after.userId, offer_group=after.offerGroup, change=Change.from_json(text),
            seq_before=int(before.seq) if before is not None else 0,
            balance_before=int(before.balance) if before is not None else 0,
            seq_after=int(after.seq), balance_after=int(after.balance), expires_at=after.expiresAt,
        )
    if kind in ("order", "subscription"):
        return EventsWrite(new["userId"]["S"], new["sk"]["S"], Change.from_json(text))
    return None


@dataclass(frozen=True)
class Swing:
    """A balance item swung to a book prepared without a transaction (`store.balances.rewrite_group`)."""

    user_id: str
    offer_group: str
    version: int
    token: str


def swing_of(dynamodb: Mapping[str, Any]) -> Swing | None:
    """The swing a stream record shows (a new `bookTok` on a balance item), or None."""
    new, old = dynamodb.get("NewImage") or {}, dynamodb.get("OldImage") or {}
    token = new.get("bookTok", {}).get("S")
    if token is None or token == old.get("bookTok", {}).get("S") or new.get("itemType", {}).get("S") != "balance":
        return None
    return Swing(new["userId"]["S"], new["offerGroup"]["S"], int(new["bookVer"]["N"]), str(token))
