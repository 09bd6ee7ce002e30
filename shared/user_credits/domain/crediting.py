"""SPEC 2.4 as pure functions: the lots a paid order adds to each group, and what a refund takes back.

Nothing here reads a clock or a table: the caller passes `now` and each group's book as it was read,
and gets back the ledger movements and the book after. The store then writes exactly that, in one
transaction, guarded by the sequence numbers it read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from user_credits.domain.durations import cycle_end
from user_credits.domain.lots import DEFAULT_PRIORITY, Book, Movement, NewLot
from user_credits.domain.offers import Offer


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
    priority: int = DEFAULT_PRIORITY

    def to_json(self) -> dict[str, Any]:
        return {
            "offerId": self.offer_id, "offerGroup": self.offer_group, "tokens": self.tokens, "cycle": self.cycle,
            "cycles": self.cycles, "appendDate": self.append_date, "customCycleSeconds": self.custom_cycle_seconds,
            "priority": self.priority,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CreditTerms:
        return cls(
            offer_id=data["offerId"], offer_group=data["offerGroup"], tokens=int(data["tokens"]),
            cycle=data["cycle"], cycles=int(data["cycles"]), append_date=bool(data["appendDate"]),
            custom_cycle_seconds=data.get("customCycleSeconds"),
            # Orders placed before offers had a priority keep the default one.
            priority=int(data.get("priority", DEFAULT_PRIORITY)),
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
    book: Book
    periods: tuple[Period, ...]
    tokens: int
    lot_ids: tuple[str, ...]


@dataclass(frozen=True)
class GroupRevocation:
    offer_group: str
    changes: tuple[Movement, ...]
    book: Book
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
            offer.append_date, offer.custom_cycle_seconds, offer.priority,
        )
    ]
    for item in offer.combined_items:
        item_offer = item_offers[item.offer_id]
        cycles = item.quantity * quantity
        lines.append(
            CreditTerms(
                item_offer.offer_id, item.offer_group, item_offer.tokens * cycles, item_offer.cycle, cycles,
                item_offer.append_date, item_offer.custom_cycle_seconds, item_offer.priority,
            )
        )
    return lines


def lot_id_for(order_id: str, line: int) -> str:
    """An order's lots are named after it and the purchase line, so a retried payment names the same lots."""
    return f"{order_id}.{line}"


def credit_group(
    book: Book, lines: Sequence[tuple[int, CreditTerms]], order_id: str, now: datetime,
) -> GroupCredit:
    """Add one lot per purchase line (numbered within the order) that targets this group, in order.

    Lots that have expired leave first, each with its own `expire` movement, so old tokens never ride
    on a new lot. start = now, or with appendDate max(now, the group's expiresAt as it stands); tokens
    are always added, even to a group at or below 0, and pay its debt first (SPEC 2.4).
    """
    book, changes = book.expire(now)
    periods: list[Period] = []
    lot_ids: list[str] = []
    tokens = 0
    for number, line in lines:
        if line.offer_group != book.offer_group:
            raise ValueError(f"line for {line.offer_group!r} applied to group {book.offer_group!r}")
        start = now
        current = book.expires_at
        if line.append_date and book.has_lots() and current is not None:
            start = max(now, current)
        end = cycle_end(start, line.cycle, line.cycles, line.custom_cycle_seconds)
        lot_id = lot_id_for(order_id, number)
        book, movement = book.credit(
            NewLot(lot_id, "order", line.tokens, start, end, line.priority, order_id=order_id), "purchase")
        changes.append(movement)
        periods.append(Period(start, end))
        lot_ids.append(lot_id)
        tokens += line.tokens
    return GroupCredit(book.offer_group, tuple(changes), book, tuple(periods), tokens, tuple(lot_ids))


def group_lines(lines: Sequence[CreditTerms]) -> dict[str, list[tuple[int, CreditTerms]]]:
    """Lines per group, in order, with their number in the order: one DynamoDB transaction may touch
    each balance item only once, and each line's lot is named by its number."""
    grouped: dict[str, list[tuple[int, CreditTerms]]] = {}
    for number, line in enumerate(lines):
        grouped.setdefault(line.offer_group, []).append((number, line))
    return grouped


def refund_target(tokens: int, amount_refunded: int, amount: int) -> int:
    """floor(tokens x refunded / amount) in integers: no float ever touches money or tokens."""
    if amount <= 0:
        return 0
    return tokens * min(amount_refunded, amount) // amount


def revoke_from_group(
    book: Book, credited: int, already_revoked: int, amount_refunded: int, amount: int, now: datetime,
    own_lots: Sequence[str] = (),
) -> GroupRevocation:
    """Take back this group's share of a refund: from the order's own lots first, then from the other
    live lots in spending order, never below 0; the rest is recorded as shortfall.

    `already_revoked` counts what earlier refunds of the same order took or recorded as shortfall, so a
    refund that grows from 25% to 50% takes only the second quarter. Expired lots leave first (their
    tokens are not spendable, so they cannot pay for a refund either). One `refund` movement per lot
    taken from; the shortfall rides on the last one (or on a movement of 0 when nothing could be taken).
    """
    due = max(0, refund_target(credited, amount_refunded, amount) - already_revoked)
    book, changes = book.expire(now)
    if due == 0:
        return GroupRevocation(book.offer_group, tuple(changes), book, 0, 0)
    book, takes = book.take(due, first=own_lots)
    taken = sum(n for _, n in takes)
    shortfall = due - taken
    refunds = [Movement(-n, "refund", lot_id) for lot_id, n in takes]
    if not refunds:
        refunds = [Movement(0, "refund", own_lots[0] if own_lots else None)]
    if shortfall:
        last = refunds[-1]
        refunds[-1] = Movement(last.delta, last.reason, last.lot_id, shortfall=shortfall)
    return GroupRevocation(book.offer_group, (*changes, *refunds), book, taken, shortfall)


def refund_status(amount_refunded: int, amount: int) -> str:
    return "refunded" if amount_refunded >= amount else "partially_refunded"
