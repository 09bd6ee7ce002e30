"""SPEC 2.4 as pure functions: no database, microseconds per test."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from user_credits.domain.crediting import (
    CreditTerms,
    GroupCredit,
    credit_group,
    group_lines,
    purchase_terms,
    refund_status,
    refund_target,
    revoke_from_group,
)
from user_credits.domain.lots import Book, Movement, NewLot
from user_credits.domain.offers import CombinedItem, Offer

NOW = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)


def line(group: str = "g", tokens: int = 100, cycle: str = "monthly", cycles: int = 1, append: bool = False,
         custom: int | None = None, priority: int = 50) -> CreditTerms:
    return CreditTerms("offer", group, tokens, cycle, cycles, append, custom, priority)


def group(balance: int = 0, expires_at: datetime | None = None, lot_id: str = "old") -> Book:
    """A group holding `balance` in one lot (bought a day ago) expiring at `expires_at`; a negative
    balance is a spent lot and that much debt."""
    bought = NewLot(lot_id, "order", max(balance, 0), NOW - timedelta(days=1), expires_at)
    book, _ = Book("g").credit(bought, "purchase")
    return book.burn(-min(balance, 0))


def credit(book: Book, *lines: CreditTerms, at: datetime = NOW) -> GroupCredit:
    return credit_group(book, list(enumerate(lines)), "o", at)


def test_jan_31_plus_one_month_is_the_last_day_of_february() -> None:
    assert credit(Book("g"), line()).book.expires_at == datetime(2026, 2, 28, 12, 0, tzinfo=UTC)


def test_quantity_multiplies_the_duration_in_one_calendar_step() -> None:
    assert credit(Book("g"), line(cycles=2)).book.expires_at == datetime(2026, 3, 31, 12, 0, tzinfo=UTC)


def test_monthly_plus_monthly_with_append_date_gives_two_months() -> None:
    first = credit(Book("g"), line(append=True))
    second = credit_group(first.book, [(0, line(append=True))], "o2", NOW + timedelta(days=1))
    assert second.periods[0].starts_at == first.book.expires_at
    assert second.book.expires_at == datetime(2026, 3, 28, 12, 0, tzinfo=UTC)
    assert [(c.delta, c.lot_id) for c in second.changes] == [(100, "o2.0")]
    # Two lots, each with its own period: the first month's tokens still end with the first month.
    assert [(lot.lot_id, lot.expires_at) for lot in second.book.lots] == [
        ("o.0", datetime(2026, 2, 28, 12, 0, tzinfo=UTC)), ("o2.0", datetime(2026, 3, 28, 12, 0, tzinfo=UTC))]


def test_without_append_date_a_second_purchase_starts_now() -> None:
    bought = credit(group(100, NOW + timedelta(days=20)), line())
    assert bought.periods[0].starts_at == NOW
    assert bought.book.expires_at == datetime(2026, 2, 28, 12, 0, tzinfo=UTC)


def test_purchase_never_shortens_a_group_yearly_then_monthly_keeps_the_year() -> None:
    yearly_end = datetime(2027, 1, 31, 12, 0, tzinfo=UTC)
    bought = credit(group(1000, yearly_end), line(cycle="monthly"))
    assert bought.book.expires_at == yearly_end
    # ...while the month's own lot ends with the month.
    assert bought.book.lots[-1].expires_at == datetime(2026, 2, 28, 12, 0, tzinfo=UTC)


def test_a_group_that_never_expires_stays_never() -> None:
    assert credit(group(5, None), line(cycle="weekly")).book.expires_at is None


def test_once_makes_the_group_never_expire() -> None:
    bought = credit(group(5, NOW + timedelta(days=3)), line(cycle="once"))
    assert bought.book.expires_at is None and bought.periods[0].expires_at is None


def test_tokens_are_added_even_to_a_negative_balance_and_pay_the_debt_first() -> None:
    bought = credit(group(-30, NOW + timedelta(days=3)), line(tokens=100))
    assert bought.changes == (Movement(100, "purchase", "o.0"),)
    assert bought.book.total == 70 and bought.book.debt == 0
    assert [(lot.granted, lot.remaining) for lot in bought.book.lots if lot.lot_id == "o.0"] == [(100, 70)]


def test_an_expired_group_has_its_remainder_expired_first() -> None:
    bought = credit(group(40, NOW - timedelta(seconds=1)), line(tokens=100, append=True))
    assert bought.changes == (Movement(-40, "expire", "old"), Movement(100, "purchase", "o.0"))
    assert bought.periods[0].starts_at == NOW
    assert bought.book.expires_at == datetime(2026, 2, 28, 12, 0, tzinfo=UTC)


def test_an_expired_group_at_or_below_zero_has_nothing_to_expire() -> None:
    bought = credit(group(-5, NOW - timedelta(seconds=1)), line(tokens=10))
    assert bought.changes == (Movement(10, "purchase", "o.0"),) and bought.book.total == 5


def test_custom_cycle_uses_custom_cycle_seconds_times_quantity() -> None:
    assert credit(Book("g"), line(cycle="custom", cycles=3, custom=3600)).book.expires_at == NOW + timedelta(hours=3)


def test_bundle_items_credit_their_own_groups_with_their_own_cycle() -> None:
    item = Offer("item", "g-item", 10, "weekly", {"usd": 1}, append_date=True)
    bundle = Offer("bundle", "g-main", 100, "monthly", {"usd": 5},
                   combined_items=(CombinedItem("item", "g-item", 2),))
    lines = purchase_terms(bundle, 3, {"item": item})
    assert [(t.offer_group, t.tokens, t.cycle, t.cycles, t.append_date) for t in lines] == [
        ("g-main", 300, "monthly", 3, False),
        ("g-item", 10 * 2 * 3, "weekly", 6, True),
    ]
    item_credit = credit_group(Book("g-item"), group_lines(lines)["g-item"], "o", NOW)
    # The item's lot is named by its line in the order (line 1: the offer itself is line 0).
    assert item_credit.lot_ids == ("o.1",) and item_credit.book.expires_at == NOW + timedelta(weeks=6)


def test_lines_for_the_same_group_apply_in_order_within_one_change() -> None:
    bought = credit(Book("g"), line(append=True), line(cycle="weekly", append=True, tokens=5))
    assert [(c.delta, c.lot_id) for c in bought.changes] == [(100, "o.0"), (5, "o.1")]
    assert bought.book.expires_at == datetime(2026, 2, 28, 12, 0, tzinfo=UTC) + timedelta(weeks=1)


def test_a_quarter_refund_revokes_a_quarter() -> None:
    revocation = revoke_from_group(group(1000, NOW + timedelta(days=10)), 1000, 0, 250, 1000, NOW, ["old"])
    assert revocation.changes == (Movement(-250, "refund", "old"),) and revocation.shortfall == 0


def test_refund_revokes_the_floor_minus_what_was_already_revoked() -> None:
    assert refund_target(100, 1, 3) == 33
    revocation = revoke_from_group(group(1000, None), 100, 33, 2, 3, NOW)
    assert revocation.revoked == 66 - 33


def test_refund_never_takes_a_balance_below_zero_and_records_the_shortfall() -> None:
    revocation = revoke_from_group(group(30, None), 100, 0, 1000, 1000, NOW, ["old"])
    assert revocation.changes == (Movement(-30, "refund", "old", shortfall=70),)
    assert (revocation.revoked, revocation.shortfall) == (30, 70)
    overdrawn = revoke_from_group(group(-5, None), 100, 0, 1000, 1000, NOW, ["old"])
    assert overdrawn.changes == (Movement(0, "refund", "old", shortfall=100),)


def test_a_refund_takes_from_the_orders_own_lot_first_then_in_spending_order() -> None:
    book = credit(group(50, NOW + timedelta(days=2), lot_id="promo"), line(tokens=30, cycle="once")).book
    # The order's own lot o.0 (30 left) first, then the other live lot.
    revocation = revoke_from_group(book, 80, 0, 1000, 1000, NOW, ["o.0"])
    assert revocation.changes == (Movement(-30, "refund", "o.0"), Movement(-50, "refund", "promo"))
    assert revocation.book.total == 0 and revocation.shortfall == 0


def test_refund_of_an_expired_group_expires_the_remainder_and_records_all_as_shortfall() -> None:
    revocation = revoke_from_group(group(80, NOW - timedelta(seconds=1)), 100, 0, 500, 1000, NOW, ["old"])
    assert revocation.changes == (Movement(-80, "expire", "old"), Movement(0, "refund", "old", shortfall=50))


def test_refund_status_full_or_partial() -> None:
    assert refund_status(1000, 1000) == "refunded"
    assert refund_status(999, 1000) == "partially_refunded"


@given(
    tokens=st.integers(0, 10**9), amount=st.integers(1, 10**7),
    steps=st.lists(st.integers(0, 10**7), min_size=1, max_size=6), balance=st.integers(-10**6, 10**9),
)
def test_growing_refunds_never_revoke_more_than_the_full_refund_formula(
    tokens: int, amount: int, steps: list[int], balance: int
) -> None:
    accounted = 0
    for refunded in sorted(min(s, amount) for s in steps):
        revocation = revoke_from_group(group(balance, None), tokens, accounted, refunded, amount, NOW, ["old"])
        assert revocation.revoked >= 0 and revocation.shortfall >= 0
        assert balance - revocation.revoked >= min(0, balance)
        accounted += revocation.revoked + revocation.shortfall
        balance -= revocation.revoked
        assert accounted == max(refund_target(tokens, r, amount) for r in steps if min(r, amount) <= refunded)
