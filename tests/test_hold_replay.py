"""The exactness claim of holds (domain/lots.py): `replay(book, events, balance)` gives the same lots
as applying every write one by one to explicit per-lot counters.

Random runs of consumes, holds, settles (below, at and above the held amount) and releases are applied
in turn to a plain reference (a counter per lot, a plain debt, per hold what it took from which lot
and what no lot covered), while the events are stamped as `store.holds` stamps them: the item's `seq`
and `balance` just before each hold write, a consume bumping `seq` by 1 and lowering the balance, a
close bumping `seq` by its number of movements (0 for a settle of exactly the held amount). The runs
are cut by rewrites, where the book is stored as `replay` of what came before (as `stage_group_change`
would store it, round-tripped through its record, sometimes with a credit added), and the replay goes
on from there with only what was written after.
"""

from __future__ import annotations

import random
from collections.abc import MutableSequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from user_credits.domain.lots import Book, HoldEvent, NewLot, replay

NOW = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)
HOLD_EXPIRY = NOW + timedelta(minutes=15)
GROUP = "chat"
# ("consume", n) | ("hold", n) | ("settle", pick, "below" | "at" | "above", n) | ("release", pick)
# | ("rewrite", None | (credit tokens, priority, days to expiry or None))
Op = tuple[Any, ...]


@dataclass
class RefHold:
    tokens: int
    parts: list[tuple[str, int]]
    uncovered: int


@dataclass
class Reference:
    """Every write applied in turn to explicit counters (no time passes: every lot is live)."""

    remaining: dict[str, int] = field(default_factory=dict)
    keys: dict[str, tuple[int, int, datetime, int]] = field(default_factory=dict)
    debt: int = 0  # what plain consumes (and kept uncovered parts of holds) left uncovered
    holds: dict[str, RefHold] = field(default_factory=dict)  # in placement order

    def add_lot(self, lot_id: str, tokens: int, priority: int, expires: datetime | None) -> None:
        """A credit: plain debt first, then the holds' uncovered parts (placement order), which then
        count as taken from the new lot."""
        paid = min(self.debt, tokens)
        self.debt -= paid
        left = tokens - paid
        for hold in self.holds.values():
            part = min(hold.uncovered, left)
            if part:
                hold.uncovered -= part
                hold.parts.append((lot_id, part))
                left -= part
        self.remaining[lot_id] = left
        self.keys[lot_id] = (priority, 1 if expires is None else 0, expires or NOW, len(self.keys))

    def take(self, tokens: int) -> tuple[list[tuple[str, int]], int]:
        parts = []
        for lot_id in sorted(self.remaining, key=self.keys.__getitem__):
            part = min(self.remaining[lot_id], tokens)
            if part:
                self.remaining[lot_id] -= part
                tokens -= part
                parts.append((lot_id, part))
        return parts, tokens

    def consume(self, tokens: int) -> None:
        self.debt += self.take(tokens)[1]

    def hold(self, hold_id: str, tokens: int) -> None:
        parts, uncovered = self.take(tokens)
        self.holds[hold_id] = RefHold(tokens, parts, uncovered)

    def close(self, hold_id: str, settled: int) -> None:
        """Keep the first `settled` tokens in the order taken, give the rest back (paying first, as a
        credit would, the debt that consumes left meanwhile, then the other holds' uncovered parts,
        which then count as taken from that lot: in the spending order of the returned tokens' lots);
        a settle above the hold consumes the excess."""
        hold = self.holds.pop(hold_id)
        keep = min(settled, hold.tokens)
        back = []
        for lot_id, n in hold.parts:
            kept = min(keep, n)
            keep -= kept
            back.append((lot_id, n - kept))
        for lot_id, n in sorted(back, key=lambda part: self.keys[part[0]]):
            paying = min(n, self.debt)
            self.debt -= paying
            left = n - paying
            for other in self.holds.values():
                covering = min(left, other.uncovered)
                if covering:
                    other.uncovered -= covering
                    other.parts.append((lot_id, covering))
                    left -= covering
            self.remaining[lot_id] += left
        self.debt += min(keep, hold.uncovered)
        if settled > hold.tokens:
            self.consume(settled - hold.tokens)

    @property
    def balance(self) -> int:
        return sum(self.remaining.values()) - self.debt - sum(h.uncovered for h in self.holds.values())


@dataclass
class Item:
    """The balance item's `seq` and `balance`, and the hold events written since the last rewrite,
    per hold (the store reads them per hold attribute: its open, then its close)."""

    seq: int = 0
    balance: int = 0
    events: dict[str, list[HoldEvent]] = field(default_factory=dict)
    written: list[HoldEvent] = field(default_factory=list)  # every event, in the order written

    def stamp(self, event: HoldEvent) -> None:
        self.events.setdefault(event.hold_id, []).append(event)
        self.written.append(event)


def assert_same(book: Book, ref: Reference, balance: int) -> None:
    assert {lot.lot_id: lot.remaining for lot in book.lots} == ref.remaining
    assert [(h.hold_id, h.tokens, h.taken, h.uncovered) for h in book.holds] == [
        (hold_id, h.tokens, tuple(h.parts), h.uncovered) for hold_id, h in ref.holds.items()]
    assert book.debt == ref.debt + sum(h.uncovered for h in ref.holds.values())
    assert book.total == ref.balance == balance


AMOUNTS = st.integers(1, 25)
CREDIT = st.one_of(st.none(), st.tuples(st.integers(0, 40), st.sampled_from([0, 50, 90]),
                                         st.sampled_from([None, 1, 5])))
HOLD = st.tuples(st.just("hold"), AMOUNTS)
# settle: which open hold, below / at / above the held amount, and by how much
SETTLE = st.tuples(st.just("settle"), st.integers(0, 7), st.sampled_from(["below", "at", "above"]),
                   st.integers(0, 30))
OPS = st.lists(st.one_of(
    st.tuples(st.just("consume"), AMOUNTS), HOLD, HOLD, SETTLE, SETTLE,
    st.tuples(st.just("release"), st.integers(0, 7)), st.tuples(st.just("rewrite"), CREDIT),
), min_size=8, max_size=40)
# Lots smaller than most holds, so that a hold often takes from several.
LOTS = st.lists(st.tuples(st.integers(0, 15), st.sampled_from([0, 50, 90]), st.sampled_from([None, 1, 3, 9])),
                max_size=5)


def settled_amount(held: int, mode: str, amount: int) -> int:
    if mode == "below":
        return amount % held
    return held if mode == "at" else held + 1 + amount


def run(lots: list[tuple[int, int, int | None]], ops: list[Op], order: random.Random | None) -> None:
    """Apply `ops` to the reference and stamp them on the item; replay at every rewrite and at the end.

    `order`: None gives replay the events in the order written; otherwise the holds come in an order
    it draws (the store reads them from the item's attributes, and DynamoDB keeps no order there)."""
    ref, item, book = Reference(), Item(), Book(GROUP)
    credits = 0

    def credit(tokens: int, priority: int, days: int | None) -> None:
        nonlocal book, credits
        expires = None if days is None else NOW + timedelta(days=days)
        lot_id = f"lot{credits}"
        credits += 1
        book, _ = book.credit(NewLot(lot_id, "grant", tokens, NOW, expires, priority), "grant")
        ref.add_lot(lot_id, tokens, priority, expires)
        item.balance += tokens
        item.seq += 1

    def replayed() -> Book:
        if order is None:
            events = list(item.written)
        else:
            per_hold = list(item.events.values())
            order.shuffle(per_hold)
            events = [event for events in per_hold for event in events]
        return replay(book, events, item.balance)

    for tokens, priority, days in lots:
        credit(tokens, priority, days)
    placed = 0
    for op in ops:
        kind = op[0]
        if kind == "consume":
            ref.consume(op[1])
            item.balance -= op[1]
            item.seq += 1
        elif kind == "hold":
            hold_id = f"h{placed}"
            placed += 1
            item.stamp(HoldEvent(hold_id, "open", item.seq, item.balance, op[1], HOLD_EXPIRY))
            ref.hold(hold_id, op[1])
            item.balance -= op[1]
            item.seq += 1
        elif kind in ("settle", "release"):
            if not ref.holds:
                continue
            hold_id = list(ref.holds)[op[1] % len(ref.holds)]
            held = ref.holds[hold_id].tokens
            settled = 0 if kind == "release" else settled_amount(held, op[2], op[3])
            item.stamp(HoldEvent(hold_id, "close", item.seq, item.balance, settled))
            ref.close(hold_id, settled)
            # One movement (a release, or the excess consumed), or none for a settle of exactly the hold.
            item.balance += held - settled
            item.seq += 0 if settled == held else 1
        else:  # a rewrite: the book as `stage_group_change` stores it; the item's stamps go
            book = Book.from_record(GROUP, replayed().to_record())
            assert_same(book, ref, item.balance)
            item.events, item.written = {}, []
            if op[1] is not None:
                credit(*op[1])
                assert_same(book, ref, item.balance)
    assert_same(replayed(), ref, item.balance)


@settings(max_examples=300, deadline=None)
@given(LOTS, OPS)
def test_replay_of_the_events_in_the_order_written_equals_each_write_in_turn(
    lots: list[tuple[int, int, int | None]], ops: list[Op],
) -> None:
    run(lots, ops, None)


class Backwards(random.Random):
    """The holds in the reverse of their placement order."""

    def shuffle(self, x: MutableSequence[Any]) -> None:
        x.reverse()


@settings(max_examples=300, deadline=None)
@given(LOTS, OPS, st.randoms(use_true_random=False))
# The smallest failure Hypothesis found while replay ordered events by (seq, close first) only: a settle
# of exactly the held amount moves no seq, so a close after it may share its seq and be listed first.
@example([], [("hold", 1), ("hold", 1), ("settle", 0, "at", 0), ("release", 0)], Backwards())
def test_replay_of_the_events_in_any_hold_order_equals_each_write_in_turn(
    lots: list[tuple[int, int, int | None]], ops: list[Op], order: random.Random,
) -> None:
    run(lots, ops, order)


def test_a_settle_at_the_held_amount_then_a_release_at_the_same_seq() -> None:
    """The same, spelled out (it raised "the balance rose")."""
    # One lot of 10; hold b 3, hold a 2, settle a at 2 (no movement: seq stays 3), release b (seq 3).
    # The item lists b's attribute before a's: b's close comes first among the events at seq 3.
    book, _ = Book(GROUP).credit(NewLot("lot", "grant", 10, NOW, None), "grant")
    events = [HoldEvent("b", "open", 1, 10, 3, HOLD_EXPIRY), HoldEvent("b", "close", 3, 5, 0),
              HoldEvent("a", "open", 2, 7, 2, HOLD_EXPIRY), HoldEvent("a", "close", 3, 5, 2)]
    assert [(lot.lot_id, lot.remaining) for lot in replay(book, events, 8).lots] == [("lot", 8)]
