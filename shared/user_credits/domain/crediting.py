"""SPEC 2.4 as pure functions: what a paid order adds to each group, and what a refund takes back.

Nothing here reads a clock or a table: the caller passes `now` and the groups as they were read, and
gets back the ledger changes and the new expiry of each group. The store then writes exactly that, in
one transaction, guarded by the sequence numbers it read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from user_credits.domain.durations import cycle_end, later_expiry
from user_credits.domain.lots import Movement
from user_credits.domain.offers import Offer


@dataclass(frozen=True)
class GroupSnapshot:
    """A group as read before the change. `exists` tells "no group yet" from "never expires"."""

    offer_group: str
    balance: int = 0
    expires_at: datetime | None = None
    exists: bool = False

    def is_expired(self, now: datetime) -> bool:
        return self.exists and self.expires_at is not None and self.expires_at <= now


@dataclass(frozen=True)
class CreditTerms:
    """One line of a purchase: `tokens` into `offer_group`, lasting `cycles` of the offer's cycle."""

    offer_id: str
    offer_group: str
    tokens: int
    cycle: str
    cycles: int
    append_date: bool = False
    custom_cycle_seconds: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "offerId": self.offer_id, "offerGroup": self.offer_group, "tokens": self.tokens, "cycle": self.cycle,
            "cycles": self.cycles, "appendDate": self.append_date, "customCycleSeconds": self.custom_cycle_seconds,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CreditTerms:
        return cls(
            offer_id=data["offerId"], offer_group=data["offerGroup"], tokens=int(data["tokens"]),
            cycle=data["cycle"], cycles=int(data["cycles"]), append_date=bool(data["appendDate"]),
            custom_cycle_seconds=data.get("customCycleSeconds"),
        )


@dataclass(frozen=True)
class Period:
    """When one purchase line starts and ends (None: never)."""

    starts_at: datetime
    expires_at: datetime | None


@dataclass(frozen=True)
class GroupCredit:
    offer_group: str
    changes: tuple[Movement, ...]
    expires_at: datetime | None
    periods: tuple[Period, ...]
    tokens: int


@dataclass(frozen=True)
class GroupRevocation:
    offer_group: str
    changes: tuple[Movement, ...]
    expires_at: datetime | None
    revoked: int
    shortfall: int


def purchase_terms(offer: Offer, quantity: int, item_offers: Mapping[str, Offer]) -> list[CreditTerms]:
    """The lines an order of `quantity` units credits: the offer itself, then each combined item.

    A combined item credits `item offer tokens x item quantity x order quantity` to the item's group,
    with the item offer's own cycle and appendDate (SPEC 2.4).
    """
    lines = [
        CreditTerms(
            offer.offer_id, offer.offer_group, offer.tokens * quantity, offer.cycle, quantity,
            offer.append_date, offer.custom_cycle_seconds,
        )
    ]
    for item in offer.combined_items:
        item_offer = item_offers[item.offer_id]
        cycles = item.quantity * quantity
        lines.append(
            CreditTerms(
                item_offer.offer_id, item.offer_group, item_offer.tokens * cycles, item_offer.cycle, cycles,
                item_offer.append_date, item_offer.custom_cycle_seconds,
            )
        )
    return lines


def expire_remainder(group: GroupSnapshot, now: datetime) -> tuple[list[Movement], int]:
    """An expired group's positive remainder goes first, so old tokens never ride on a new expiry."""
    if group.is_expired(now) and group.balance > 0:
        return [Movement(-group.balance, "expire")], 0
    return [], group.balance


def credit_group(group: GroupSnapshot, lines: Sequence[CreditTerms], now: datetime) -> GroupCredit:
    """Apply every purchase line that targets this group, in order, to the group as it was read.

    start = now, or with appendDate max(now, the group's current expiry); the group's expiry becomes the
    later of the old and the new one (None = never, so a purchase never shortens a group); tokens are
    always added, even to a balance at or below 0.
    """
    changes, balance = expire_remainder(group, now)
    # A group that does not exist yet has no expiry to keep; an existing one with None never expires.
    current: datetime | None = group.expires_at
    has_expiry_to_keep = group.exists
    periods: list[Period] = []
    tokens = 0
    for line in lines:
        if line.offer_group != group.offer_group:
            raise ValueError(f"line for {line.offer_group!r} applied to group {group.offer_group!r}")
        start = now
        if line.append_date and has_expiry_to_keep and current is not None:
            start = max(now, current)
        end = cycle_end(start, line.cycle, line.cycles, line.custom_cycle_seconds)
        current = later_expiry(current, end) if has_expiry_to_keep else end
        has_expiry_to_keep = True
        balance += line.tokens
        tokens += line.tokens
        changes.append(Movement(line.tokens, "purchase"))
        periods.append(Period(start, end))
    return GroupCredit(group.offer_group, tuple(changes), current, tuple(periods), tokens)


def group_lines(lines: Sequence[CreditTerms]) -> dict[str, list[CreditTerms]]:
    """Lines per group, in order: one DynamoDB transaction may touch each balance item only once."""
    grouped: dict[str, list[CreditTerms]] = {}
    for line in lines:
        grouped.setdefault(line.offer_group, []).append(line)
    return grouped


def refund_target(tokens: int, amount_refunded: int, amount: int) -> int:
    """floor(tokens x refunded / amount) in integers: no float ever touches money or tokens."""
    if amount <= 0:
        return 0
    return tokens * min(amount_refunded, amount) // amount


def revoke_from_group(
    group: GroupSnapshot, credited: int, already_revoked: int, amount_refunded: int, amount: int, now: datetime
) -> GroupRevocation:
    """Take back this group's share of a refund, never below 0; the rest is recorded as shortfall.

    `already_revoked` counts what earlier refunds of the same order took or recorded as shortfall, so a
    refund that grows from 25% to 50% takes only the second quarter. An expired remainder is expired
    first (it is not spendable, so it cannot pay for a refund either).
    """
    due = max(0, refund_target(credited, amount_refunded, amount) - already_revoked)
    changes, balance = expire_remainder(group, now)
    if due == 0:
        return GroupRevocation(group.offer_group, tuple(changes), group.expires_at, 0, 0)
    taken = min(due, max(0, balance))
    shortfall = due - taken
    changes.append(Movement(-taken, "refund", shortfall=shortfall or None))
    return GroupRevocation(group.offer_group, tuple(changes), group.expires_at, taken, shortfall)


def refund_status(amount_refunded: int, amount: int) -> str:
    return "refunded" if amount_refunded >= amount else "partially_refunded"
