"""SPEC 2.4 as pure functions: no database, microseconds per test."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from user_credits.domain.crediting import (
    CreditTerms,
    GroupSnapshot,
    credit_group,
    group_lines,
    purchase_terms,
    refund_status,
    refund_target,
    revoke_from_group,
)
from user_credits.domain.lots import Movement
from user_credits.domain.offers import CombinedItem, Offer

NOW = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)


def line(group: str = "g", tokens: int = 100, cycle: str = "monthly", cycles: int = 1, append: bool = False,
         custom: int | None = None) -> CreditTerms:
    return CreditTerms("offer", group, tokens, cycle, cycles, append, custom)


def test_jan_31_plus_one_month_is_the_last_day_of_february() -> None:
    credit = credit_group(GroupSnapshot("g"), [line()], NOW)
    assert credit.expires_at == datetime(2026, 2, 28, 12, 0, tzinfo=UTC)


def test_quantity_multiplies_the_duration_in_one_calendar_step() -> None:
    credit = credit_group(GroupSnapshot("g"), [line(cycles=2)], NOW)
    assert credit.expires_at == datetime(2026, 3, 31, 12, 0, tzinfo=UTC)


def test_monthly_plus_monthly_with_append_date_gives_two_months() -> None:
    first = credit_group(GroupSnapshot("g"), [line(append=True)], NOW)
    group = GroupSnapshot("g", first.tokens, first.expires_at, exists=True)
    second = credit_group(group, [line(append=True)], NOW + timedelta(days=1))
    assert second.periods[0].starts_at == first.expires_at
    assert second.expires_at == datetime(2026, 3, 28, 12, 0, tzinfo=UTC)
    assert [c.delta for c in second.changes] == [100]


def test_without_append_date_a_second_purchase_starts_now() -> None:
    group = GroupSnapshot("g", 100, NOW + timedelta(days=20), exists=True)
    credit = credit_group(group, [line()], NOW)
    assert credit.periods[0].starts_at == NOW
    assert credit.expires_at == datetime(2026, 2, 28, 12, 0, tzinfo=UTC)


def test_purchase_never_shortens_a_group_yearly_then_monthly_keeps_the_year() -> None:
    yearly_end = datetime(2027, 1, 31, 12, 0, tzinfo=UTC)
    group = GroupSnapshot("g", 1000, yearly_end, exists=True)
    credit = credit_group(group, [line(cycle="monthly")], NOW)
    assert credit.expires_at == yearly_end


def test_a_group_that_never_expires_stays_never() -> None:
    credit = credit_group(GroupSnapshot("g", 5, None, exists=True), [line(cycle="weekly")], NOW)
    assert credit.expires_at is None


def test_once_makes_the_group_never_expire() -> None:
    group = GroupSnapshot("g", 5, NOW + timedelta(days=3), exists=True)
    credit = credit_group(group, [line(cycle="once")], NOW)
    assert credit.expires_at is None and credit.periods[0].expires_at is None


def test_tokens_are_added_even_to_a_negative_balance() -> None:
    credit = credit_group(GroupSnapshot("g", -30, NOW + timedelta(days=3), exists=True), [line(tokens=100)], NOW)
    assert credit.changes == (Movement(100, "purchase"),)


def test_an_expired_group_has_its_remainder_expired_first() -> None:
    group = GroupSnapshot("g", 40, NOW - timedelta(seconds=1), exists=True)
    credit = credit_group(group, [line(tokens=100, append=True)], NOW)
    assert credit.changes == (Movement(-40, "expire"), Movement(100, "purchase"))
    assert credit.periods[0].starts_at == NOW
    assert credit.expires_at == datetime(2026, 2, 28, 12, 0, tzinfo=UTC)


def test_an_expired_group_at_or_below_zero_has_nothing_to_expire() -> None:
    group = GroupSnapshot("g", -5, NOW - timedelta(days=1), exists=True)
    credit = credit_group(group, [line(tokens=10)], NOW)
    assert credit.changes == (Movement(10, "purchase"),)


def test_custom_cycle_uses_custom_cycle_seconds_times_quantity() -> None:
    credit = credit_group(GroupSnapshot("g"), [line(cycle="custom", cycles=3, custom=3600)], NOW)
    assert credit.expires_at == NOW + timedelta(hours=3)


def test_bundle_items_credit_their_own_groups_with_their_own_cycle() -> None:
    item = Offer("item", "g-item", 10, "weekly", {"usd": 1}, append_date=True)
    bundle = Offer("bundle", "g-main", 100, "monthly", {"usd": 5},
                   combined_items=(CombinedItem("item", "g-item", 2),))
    lines = purchase_terms(bundle, 3, {"item": item})
    assert [(t.offer_group, t.tokens, t.cycle, t.cycles, t.append_date) for t in lines] == [
        ("g-main", 300, "monthly", 3, False),
        ("g-item", 10 * 2 * 3, "weekly", 6, True),
    ]
    item_credit = credit_group(GroupSnapshot("g-item"), group_lines(lines)["g-item"], NOW)
    assert item_credit.expires_at == NOW + timedelta(weeks=6)


def test_lines_for_the_same_group_apply_in_order_within_one_change() -> None:
    credit = credit_group(GroupSnapshot("g"), [line(append=True), line(cycle="weekly", append=True, tokens=5)], NOW)
    assert [c.delta for c in credit.changes] == [100, 5]
    assert credit.expires_at == datetime(2026, 2, 28, 12, 0, tzinfo=UTC) + timedelta(weeks=1)


def test_a_quarter_refund_revokes_a_quarter() -> None:
    group = GroupSnapshot("g", 1000, NOW + timedelta(days=10), exists=True)
    revocation = revoke_from_group(group, 1000, 0, 250, 1000, NOW)
    assert revocation.changes == (Movement(-250, "refund"),) and revocation.shortfall == 0


def test_refund_revokes_the_floor_minus_what_was_already_revoked() -> None:
    assert refund_target(100, 1, 3) == 33
    group = GroupSnapshot("g", 1000, None, exists=True)
    revocation = revoke_from_group(group, 100, 33, 2, 3, NOW)
    assert revocation.revoked == 66 - 33


def test_refund_never_takes_a_balance_below_zero_and_records_the_shortfall() -> None:
    group = GroupSnapshot("g", 30, None, exists=True)
    revocation = revoke_from_group(group, 100, 0, 1000, 1000, NOW)
    assert revocation.changes == (Movement(-30, "refund", shortfall=70),)
    assert (revocation.revoked, revocation.shortfall) == (30, 70)
    overdrawn = revoke_from_group(GroupSnapshot("g", -5, None, exists=True), 100, 0, 1000, 1000, NOW)
    assert overdrawn.changes == (Movement(0, "refund", shortfall=100),)


def test_refund_of_an_expired_group_expires_the_remainder_and_records_all_as_shortfall() -> None:
    group = GroupSnapshot("g", 80, NOW - timedelta(days=1), exists=True)
    revocation = revoke_from_group(group, 100, 0, 500, 1000, NOW)
    assert revocation.changes == (Movement(-80, "expire"), Movement(0, "refund", shortfall=50))


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
        group = GroupSnapshot("g", balance, None, exists=True)
        revocation = revoke_from_group(group, tokens, accounted, refunded, amount, NOW)
        assert revocation.revoked >= 0 and revocation.shortfall >= 0
        assert balance - revocation.revoked >= min(0, balance)
        accounted += revocation.revoked + revocation.shortfall
        balance -= revocation.revoked
        assert accounted == max(refund_target(tokens, r, amount) for r in steps if min(r, amount) <= refunded)
