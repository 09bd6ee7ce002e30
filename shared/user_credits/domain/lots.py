"""Lots (SPEC 1, 2.4-2.6): a group's tokens as separate credits, each with its own life, spent in order.

The balance item keeps a *book*: the lots as the last rewrite (purchase, grant, refund, expiry,
warning) left them, and the book's debt. A consume never rewrites the book: it only decrements the
item's `balance` under a condition (one UpdateItem, see `store.consumption`). Which lots a run of
consumes burned is derived here, whenever the book is read, from `book.total - balance`: taking that
sum in spending order is the same as taking each consume in turn, because between two rewrites no
lot is added and no lot with tokens expires (a consume is refused while a lot with tokens is due,
and the caller expires it first).

Expired lots leave the book at the rewrite that expires them; the book remembers only the latest
expiry among them (`expired_until`), which is all the group's `expiresAt` needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final

from user_credits.domain.clock import from_iso, to_iso

DEFAULT_PRIORITY: Final = 50
SOURCES: Final = ("order", "subscription", "grant")


@dataclass(frozen=True)
class Lot:
    lot_id: str
    offer_group: str
    source: str
    granted: int
    remaining: int
    starts_at: datetime
    expires_at: datetime | None
    priority: int = DEFAULT_PRIORITY
    # Creation order within the group: the last tie-breaker of the spending order ("the older lot").
    ordinal: int = 0
    order_id: str | None = None
    subscription_id: str | None = None
    # A CreditsExpiringSoon was sent for this lot (one per lot).
    warned: bool = False

    def is_live(self, now: datetime) -> bool:
        return self.expires_at is None or self.expires_at > now

    def spending_key(self) -> tuple[int, int, datetime, int]:
        """SPEC 2.5: lower priority first, then the sooner expiry (never-expiring last), then the older."""
        never = self.expires_at is None
        return (self.priority, 1 if never else 0, self.expires_at or self.starts_at, self.ordinal)

    def to_json(self) -> dict[str, Any]:
        """The lot as `GET` credits shows it."""
        body: dict[str, Any] = {
            "lotId": self.lot_id, "offerGroup": self.offer_group, "source": self.source, "granted": self.granted,
            "remaining": self.remaining, "startsAt": to_iso(self.starts_at), "expiresAt": to_iso(self.expires_at),
            "priority": self.priority,
        }
        if self.order_id is not None:
            body["orderId"] = self.order_id
        if self.subscription_id is not None:
            body["subscriptionId"] = self.subscription_id
        return body

    def to_record(self) -> dict[str, Any]:
        """The stored form (inside the balance item's book)."""
        return {**self.to_json(), "ordinal": self.ordinal, "warned": self.warned}

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Lot:
        expires = data.get("expiresAt")
        return cls(
            lot_id=data["lotId"], offer_group=data["offerGroup"], source=data["source"], granted=int(data["granted"]),
            remaining=int(data["remaining"]), starts_at=from_iso(data["startsAt"]),
            expires_at=from_iso(expires) if expires else None, priority=int(data["priority"]),
            ordinal=int(data["ordinal"]), order_id=data.get("orderId"), subscription_id=data.get("subscriptionId"),
            warned=bool(data.get("warned", False)),
        )


@dataclass(frozen=True)
class Movement:
    """One ledger entry to be: a signed delta and its reason, the lot it concerns, what a refund could
    not take, and where it came from. The store gives it its `seq` and `balanceAfter`."""

    delta: int
    reason: str
    lot_id: str | None = None
    shortfall: int | None = None
    order_id: str | None = None
    idempotency_key: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class NewLot:
    """What a credit asks for; the book gives it its ordinal and pays debt from it."""

    lot_id: str
    source: str
    tokens: int
    starts_at: datetime
    expires_at: datetime | None
    priority: int = DEFAULT_PRIORITY
    order_id: str | None = None
    subscription_id: str | None = None


@dataclass(frozen=True)
class Book:
    offer_group: str
    lots: tuple[Lot, ...] = ()
    debt: int = 0
    next_ordinal: int = 0
    # The latest expiresAt among lots that have left the book (expired), if any.
    expired_until: datetime | None = None
    warnings: tuple[Lot, ...] = field(default=(), compare=False)

    # -- what the book says

    @property
    def total(self) -> int:
        """sum(remaining) - debt: the balance as of this book (before consumes not yet burned)."""
        return sum(lot.remaining for lot in self.lots) - self.debt

    def has_lots(self) -> bool:
        return bool(self.lots) or self.expired_until is not None

    def spendable(self, now: datetime) -> int:
        """SPEC 1's balance at `now`: live lots only, whether or not the sweep has run."""
        return sum(lot.remaining for lot in self.lots if lot.is_live(now)) - self.debt

    def all_expired(self, now: datetime) -> bool:
        """The group has lots and every one has expired (consumption refusals say `credits_expired`)."""
        return self.has_lots() and not any(lot.is_live(now) for lot in self.lots)

    def live_lots(self, now: datetime) -> list[Lot]:
        """Live lots in spending order (what `GET` credits lists)."""
        return sorted((lot for lot in self.lots if lot.is_live(now)), key=Lot.spending_key)

    @property
    def expires_at(self) -> datetime | None:
        """SPEC 1: the latest expiresAt among the lots, expired or not; None if one never expires or none."""
        if any(lot.expires_at is None for lot in self.lots):
            return None
        dates = [lot.expires_at for lot in self.lots if lot.expires_at is not None]
        if self.expired_until is not None:
            dates.append(self.expired_until)
        return max(dates) if dates else None

    @property
    def next_expiry(self) -> datetime | None:
        """The soonest expiry of a lot that still holds tokens: consumes are allowed only before it."""
        dates = [lot.expires_at for lot in self.lots if lot.remaining > 0 and lot.expires_at is not None]
        return min(dates) if dates else None

    # -- how it changes (each returns a new book)

    def burn(self, consumed: int) -> Book:
        """Apply `consumed` tokens of consumes since this book was written: spending order, rest is debt."""
        if consumed <= 0:
            return self
        lots, left = self._taken(sorted(self.lots, key=Lot.spending_key), consumed)
        return replace(self, lots=lots, debt=self.debt + left)

    def expire(self, now: datetime) -> tuple[Book, list[Movement]]:
        """Every lot with expiresAt <= now leaves the book; one `expire` movement per lot with tokens."""
        movements = [Movement(-lot.remaining, "expire", lot.lot_id)
                     for lot in self.lots if not lot.is_live(now) and lot.remaining > 0]
        gone = [lot for lot in self.lots if not lot.is_live(now)]
        if not gone:
            return self, []
        latest = max(lot.expires_at for lot in gone if lot.expires_at is not None)
        until = latest if self.expired_until is None else max(self.expired_until, latest)
        kept = tuple(lot for lot in self.lots if lot.is_live(now))
        return replace(self, lots=kept, expired_until=until), movements

    def credit(self, new: NewLot, reason: str) -> tuple[Book, Movement]:
        """Add a lot (always, even to a group at or below 0); a debt is paid from it first."""
        paid = min(self.debt, new.tokens)
        lot = Lot(
            lot_id=new.lot_id, offer_group=self.offer_group, source=new.source, granted=new.tokens,
            remaining=new.tokens - paid, starts_at=new.starts_at, expires_at=new.expires_at, priority=new.priority,
            ordinal=self.next_ordinal, order_id=new.order_id, subscription_id=new.subscription_id,
        )
        book = replace(self, lots=(*self.lots, lot), debt=self.debt - paid, next_ordinal=self.next_ordinal + 1)
        return book, Movement(new.tokens, reason, lot.lot_id)

    def take(self, tokens: int, first: Sequence[str] = ()) -> tuple[Book, list[tuple[str, int]]]:
        """Take up to `tokens` from the live lots: the lots named in `first`, then the others in spending
        order. Never below 0 (a debt means every lot is already empty). Returns the book and what was
        taken from each lot, in the order taken. Call after `expire`: only live lots are in the book then."""
        preferred = [lot for lot_id in first for lot in self.lots if lot.lot_id == lot_id]
        others = sorted((lot for lot in self.lots if lot.lot_id not in first), key=Lot.spending_key)
        order = preferred + others
        lots, _ = self._taken(order, tokens)
        after = {lot.lot_id: lot.remaining for lot in lots}
        taken = [(lot.lot_id, lot.remaining - after[lot.lot_id]) for lot in order]
        return replace(self, lots=lots), [(lot_id, n) for lot_id, n in taken if n]

    def _taken(self, order: Sequence[Lot], tokens: int) -> tuple[tuple[Lot, ...], int]:
        """The book's lots after taking `tokens` from them in `order`, and what no lot covered."""
        left = tokens
        updated: dict[str, Lot] = {}
        for lot in order:
            if left == 0:
                break
            take = min(lot.remaining, left)
            if take:
                updated[lot.lot_id] = replace(lot, remaining=lot.remaining - take)
                left -= take
        return tuple(updated.get(lot.lot_id, lot) for lot in self.lots), left

    def claim_warnings(self, now: datetime, window_end: datetime) -> Book:
        """Mark the lots with tokens that expire in (now, window_end] and were not warned yet; the
        marked lots are in `warnings` of the result (one CreditsExpiringSoon each)."""
        due = [lot for lot in self.lots if lot.remaining > 0 and lot.expires_at is not None
               and now < lot.expires_at <= window_end and not lot.warned]
        if not due:
            return replace(self, warnings=())
        ids = {lot.lot_id for lot in due}
        lots = tuple(replace(lot, warned=True) if lot.lot_id in ids else lot for lot in self.lots)
        return replace(self, lots=lots, warnings=tuple(due))

    def find(self, lot_ids: Iterable[str]) -> list[Lot]:
        wanted = set(lot_ids)
        return [lot for lot in self.lots if lot.lot_id in wanted]

    # -- storage

    def to_record(self) -> dict[str, Any]:
        return {
            "lots": [lot.to_record() for lot in self.lots], "debt": self.debt, "total": self.total,
            "nextOrdinal": self.next_ordinal, "expiredUntil": to_iso(self.expired_until),
        }

    @classmethod
    def from_record(cls, offer_group: str, data: Mapping[str, Any] | None) -> Book:
        if not data:
            return cls(offer_group)
        until = data.get("expiredUntil")
        return cls(
            offer_group, lots=tuple(Lot.from_record(lot) for lot in data.get("lots", [])),
            debt=int(data.get("debt", 0)), next_ordinal=int(data.get("nextOrdinal", 0)),
            expired_until=from_iso(until) if until else None,
        )


def current_book(offer_group: str, stored: Mapping[str, Any] | None, balance: int) -> Book:
    """The book as it is now: the stored one with the consumes since it was written burned.

    A consume only lowers `balance`, so `stored total - balance` is what they took. A consume on a
    group with no book yet (it created the balance item) leaves a negative balance: all debt.
    """
    book = Book.from_record(offer_group, stored)
    return book.burn(book.total - balance)
