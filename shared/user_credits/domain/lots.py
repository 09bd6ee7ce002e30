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

Holds (SPEC 2.9) take tokens from the front of the spending order like a consume, but their tokens
may come back to the lots they came from, so the order of holds, returns and consumes matters. Each
hold's opening and closing is written on the balance item with the item's `seq` and `balance` just
before it (`HoldEvent`); between two such events only consumes ran, and they took from the front.
`replay` applies them in order to the book of the last rewrite: the same lots as applying every
write one by one. The next rewrite stores the result (`holds` of the book: what each open hold took).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final

from user_credits.domain.clock import from_iso, to_iso

DEFAULT_PRIORITY: Final = 50
# SPEC 2.9: a hold lives 15 minutes unless asked otherwise, at most a day.
DEFAULT_HOLD_TTL_SECONDS: Final = 15 * 60
MAX_HOLD_TTL_SECONDS: Final = 24 * 60 * 60
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
    hold_id: str | None = None
    subscription_id: str | None = None


@dataclass(frozen=True)
class Held:
    """An open hold as the book knows it: what it took from each lot (spending order at the time it
    was placed) and what no lot covered (`uncovered`, a debt while it is held)."""

    hold_id: str
    tokens: int
    expires_at: datetime
    taken: tuple[tuple[str, int], ...] = ()
    uncovered: int = 0

    def to_record(self) -> dict[str, Any]:
        return {"holdId": self.hold_id, "tokens": self.tokens, "expiresAt": to_iso(self.expires_at),
                "taken": [[lot_id, n] for lot_id, n in self.taken], "uncovered": self.uncovered}

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Held:
        return cls(hold_id=data["holdId"], tokens=int(data["tokens"]), expires_at=from_iso(data["expiresAt"]),
                   taken=tuple((str(lot_id), int(n)) for lot_id, n in data.get("taken", [])),
                   uncovered=int(data.get("uncovered", 0)))


@dataclass(frozen=True)
class HoldEvent:
    """A hold opened (`tokens` held) or closed (`tokens` settled: kept), as written on the balance item:
    `seq` and `balance` are the item's just before that write."""

    hold_id: str
    kind: str  # open | close
    seq: int
    balance: int
    tokens: int
    expires_at: datetime | None = None  # open only


@dataclass(frozen=True)
class Returned:
    """What closing a hold gave back: per lot still in the book, per lot gone (those tokens expire),
    its uncovered part cancelled (`debt`), and what paid the debt that consumes left meanwhile
    (`paid_debt`, as a credit would); `excess` is what a settle above the hold consumed on top."""

    to_lots: tuple[tuple[str, int], ...] = ()
    expired: tuple[tuple[str, int], ...] = ()
    debt: int = 0
    paid_debt: int = 0
    excess: int = 0

    @property
    def released(self) -> int:
        """Tokens that went back to the balance (what the `release` entry says)."""
        return sum(n for _, n in self.to_lots) + sum(n for _, n in self.expired) + self.debt + self.paid_debt


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
    # Open holds and what each took (see `replay`).
    holds: tuple[Held, ...] = ()
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
        """The soonest expiry of a lot that holds tokens, or may get some back from an open hold:
        consumes are allowed only before it."""
        held = {lot_id for hold in self.holds for lot_id, _ in hold.taken}
        dates = [lot.expires_at for lot in self.lots
                 if (lot.remaining > 0 or lot.lot_id in held) and lot.expires_at is not None]
        return min(dates) if dates else None

    def held(self, hold_id: str) -> Held | None:
        return next((hold for hold in self.holds if hold.hold_id == hold_id), None)

    def hold_lots_expiry(self, hold_id: str) -> datetime | None:
        """The soonest expiry among the lots an open hold took from (None: none expires): a settle
        or release is one plain write only before it (after it, some returned tokens expire)."""
        hold = self.held(hold_id)
        lots = {lot.lot_id: lot for lot in self.lots}
        dates = [lots[lot_id].expires_at if lot_id in lots else datetime.min.replace(tzinfo=UTC)
                 for lot_id, _ in (hold.taken if hold else ())]
        found = [date for date in dates if date is not None]
        return min(found) if found else None

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
        """Add a lot (always, even to a group at or below 0); a debt is paid from it first.

        A hold's uncovered part is debt too: the new lot covers it last (after the consumes' debt), and
        the hold then counts those tokens as taken from the new lot, so releasing gives them back to it."""
        paid = min(self.debt, new.tokens)
        holds_debt = sum(hold.uncovered for hold in self.holds)
        to_holds = max(0, paid - (self.debt - holds_debt))
        holds = []
        for hold in self.holds:
            part = min(hold.uncovered, to_holds)
            to_holds -= part
            holds.append(hold if not part else replace(
                hold, taken=(*hold.taken, (new.lot_id, part)), uncovered=hold.uncovered - part))
        lot = Lot(
            lot_id=new.lot_id, offer_group=self.offer_group, source=new.source, granted=new.tokens,
            remaining=new.tokens - paid, starts_at=new.starts_at, expires_at=new.expires_at, priority=new.priority,
            ordinal=self.next_ordinal, order_id=new.order_id, subscription_id=new.subscription_id,
        )
        book = replace(self, lots=(*self.lots, lot), debt=self.debt - paid, next_ordinal=self.next_ordinal + 1,
                       holds=tuple(holds))
        return book, Movement(new.tokens, reason, lot.lot_id)

    def without_due_holds(self, now: datetime) -> Book:
        """The book once its holds past their expiresAt are released (what the next rewrite does)."""
        book = self
        for held in self.holds:
            if held.expires_at <= now:
                book, _ = book.close(held.hold_id, 0)
        return book

    def hold(self, hold_id: str, tokens: int, expires_at: datetime) -> Book:
        """Take `tokens` for a hold from the front of the spending order, like a consume; what no lot
        covers is debt while held."""
        order = sorted(self.lots, key=Lot.spending_key)
        lots, left = self._taken(order, tokens)
        after = {lot.lot_id: lot.remaining for lot in lots}
        taken = tuple((lot.lot_id, lot.remaining - after[lot.lot_id]) for lot in order
                      if lot.remaining != after[lot.lot_id])
        held = Held(hold_id, tokens, expires_at, taken, left)
        return replace(self, lots=lots, debt=self.debt + left, holds=(*self.holds, held))

    def close(self, hold_id: str, settled: int) -> tuple[Book, Returned]:
        """Close a hold, keeping `settled` tokens of it (settle; 0 for a release): the hold's tokens are
        kept in the order taken, the rest go back to their lots (those no longer in the book are
        expired: their tokens expire), its uncovered part cancels debt; a settle above the hold
        consumes the excess from the front of the spending order."""
        hold = self.held(hold_id)
        if hold is None:
            raise KeyError(f"no open hold {hold_id!r} in {self.offer_group!r}")
        keep = min(settled, hold.tokens)
        parts = [*hold.taken, ("", hold.uncovered)]
        back: list[tuple[str, int]] = []
        for lot_id, n in parts:
            kept = min(keep, n)
            keep -= kept
            if n - kept:
                back.append((lot_id, n - kept))
        present = {lot.lot_id: lot for lot in self.lots}
        expired = tuple((lot_id, n) for lot_id, n in back if lot_id and lot_id not in present)
        debt = sum(n for lot_id, n in back if not lot_id)
        # Debt left meanwhile is paid from the returned tokens first, in spending order, as a new lot
        # would pay it (SPEC 1: in debt, every live lot is empty): the consumes' debt, then other
        # holds' uncovered parts, which then count as taken from that lot (a release gives them back).
        others = [h for h in self.holds if h.hold_id != hold_id]
        plain_debt = self.debt - sum(h.uncovered for h in self.holds)
        to_lots: list[tuple[str, int]] = []
        paid_debt = 0
        for lot_id, n in sorted(((lot_id, n) for lot_id, n in back if lot_id in present),
                                key=lambda part: present[part[0]].spending_key()):
            paying = min(n, plain_debt)
            plain_debt -= paying
            paid_debt += paying
            left = n - paying
            for number, other in enumerate(others):
                covering = min(left, other.uncovered)
                if covering:
                    others[number] = replace(other, taken=(*other.taken, (lot_id, covering)),
                                             uncovered=other.uncovered - covering)
                    paid_debt += covering
                    left -= covering
            if left:
                to_lots.append((lot_id, left))
        # A hold may have taken from one lot in several parts (a credit or a return covered it later).
        gains: dict[str, int] = {}
        for lot_id, n in to_lots:
            gains[lot_id] = gains.get(lot_id, 0) + n
        lots = tuple(replace(lot, remaining=lot.remaining + gains[lot.lot_id]) if lot.lot_id in gains else lot
                     for lot in self.lots)
        book = replace(self, lots=lots, debt=self.debt - debt - paid_debt, holds=tuple(others))
        excess = max(0, settled - hold.tokens)
        return book.burn(excess), Returned(tuple(to_lots), expired, debt, paid_debt, excess)

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
        record: dict[str, Any] = {
            "lots": [lot.to_record() for lot in self.lots], "debt": self.debt, "total": self.total,
            "nextOrdinal": self.next_ordinal, "expiredUntil": to_iso(self.expired_until),
        }
        if self.holds:
            record["holds"] = [hold.to_record() for hold in self.holds]
        return record

    @classmethod
    def from_record(cls, offer_group: str, data: Mapping[str, Any] | None) -> Book:
        if not data:
            return cls(offer_group)
        until = data.get("expiredUntil")
        return cls(
            offer_group, lots=tuple(Lot.from_record(lot) for lot in data.get("lots", [])),
            debt=int(data.get("debt", 0)), next_ordinal=int(data.get("nextOrdinal", 0)),
            expired_until=from_iso(until) if until else None,
            holds=tuple(Held.from_record(hold) for hold in data.get("holds", [])),
        )


def replay(book: Book, events: Iterable[HoldEvent], balance: int) -> Book:
    """The book as it is now: `book` as the last rewrite stored it, then every hold event since, in
    the order written, with the consumes between them burned from the front of the spending order.

    Between two events only consumes changed the balance, and a consume only lowers it, so the
    balance just before an event, against the balance the previous one left, is what they took. A
    consume on a group with no book yet (it created the balance item) leaves a negative balance:
    all debt.
    """
    events = list(events)
    held = {hold.hold_id: hold.tokens for hold in book.holds}
    held.update({e.hold_id: e.tokens for e in events if e.kind == "open"})

    def written(event: HoldEvent) -> tuple[int, int]:
        # Every write but one moves the item's seq: a settle of exactly what was held. So events that
        # share a seq are such settles, then at most one write that moved it (it came last).
        quiet = event.kind == "close" and event.tokens == held.get(event.hold_id)
        return event.seq, 0 if quiet else 1

    expected = book.total
    for event in sorted(events, key=written):
        book = _burned(book, expected - event.balance, event)
        if event.kind == "open":
            assert event.expires_at is not None
            book = book.hold(event.hold_id, event.tokens, event.expires_at)
            expected = event.balance - event.tokens
        else:
            book, returned = book.close(event.hold_id, event.tokens)
            expected = event.balance + returned.released - returned.excess
    return _burned(book, expected - balance, None)


def _burned(book: Book, consumed: int, before: HoldEvent | None) -> Book:
    if consumed < 0:
        # Only consumes run between two hold events, and they only lower the balance: a bug.
        raise ValueError(f"{book.offer_group!r}: the balance rose by {-consumed} between hold events "
                         f"(before {before!r})")
    return book.burn(consumed)
