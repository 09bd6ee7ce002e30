"""The lot book (domain/lots.py): spending order, lazy burning of consumes, expiry, debt, refunds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from user_credits.domain.lots import Book, NewLot, replay

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def lot(lot_id: str, tokens: int, expires: datetime | None, priority: int = 50) -> NewLot:
    return NewLot(lot_id, "grant", tokens, NOW, expires, priority)


def remaining(book: Book) -> dict[str, int]:
    return {item.lot_id: item.remaining for item in book.lots}


def credited(*lots: NewLot) -> Book:
    book = Book("chat")
    for new in lots:
        book, _ = book.credit(new, "grant")
    return book


def test_spending_order_is_priority_then_sooner_expiry_then_never_then_older() -> None:
    book = credited(
        lot("forever", 10, None), lot("late", 10, NOW + 9 * DAY), lot("soon", 10, NOW + DAY),
        lot("promo", 10, None, priority=0), lot("soon-too", 10, NOW + DAY),
    )
    assert [item.lot_id for item in book.live_lots(NOW)] == ["promo", "soon", "soon-too", "late", "forever"]
    assert remaining(book.burn(25)) == {"forever": 10, "late": 10, "soon": 0, "promo": 0, "soon-too": 5}


def test_consumes_beyond_the_lots_become_debt_and_the_next_credit_pays_it_first() -> None:
    book = credited(lot("a", 10, None)).burn(14)
    assert book.debt == 4 and book.total == -4
    book, movement = book.credit(lot("b", 10, NOW + DAY), "purchase")
    assert movement.delta == 10 and movement.lot_id == "b"
    assert book.debt == 0 and remaining(book) == {"a": 0, "b": 6} and book.total == 6


def test_a_credit_smaller_than_the_debt_is_all_spent_on_it() -> None:
    book, _ = credited(lot("a", 3, None)).burn(10).credit(lot("b", 5, None), "grant")
    assert book.debt == 2 and remaining(book) == {"a": 0, "b": 0} and book.total == -2


def test_expired_lots_leave_with_one_entry_each_and_are_never_spendable() -> None:
    book = credited(lot("old", 10, NOW - DAY), lot("empty", 5, NOW - DAY), lot("new", 7, NOW + DAY))
    book = book.burn(5)  # consumed before they expired: the soonest lot ("old") pays first
    assert remaining(book) == {"old": 5, "empty": 5, "new": 7}
    assert book.spendable(NOW) == 7  # before the sweep: expired tokens do not count
    expired, movements = book.expire(NOW)
    assert [(m.delta, m.reason, m.lot_id) for m in movements] == [(-5, "expire", "old"), (-5, "expire", "empty")]
    assert remaining(expired) == {"new": 7} and expired.total == 7
    assert expired.expired_until == NOW - DAY and expired.expires_at == NOW + DAY


def test_group_expiry_is_the_latest_lot_expiry_and_none_when_one_never_expires() -> None:
    assert Book("chat").expires_at is None and not Book("chat").has_lots()
    dated = credited(lot("a", 1, NOW + DAY), lot("b", 1, NOW + 5 * DAY))
    assert dated.expires_at == NOW + 5 * DAY and dated.next_expiry == NOW + DAY
    assert credited(lot("a", 1, NOW + DAY), lot("b", 1, None)).expires_at is None
    gone, _ = dated.expire(NOW + 6 * DAY)
    assert gone.expires_at == NOW + 5 * DAY and gone.all_expired(NOW + 6 * DAY)
    assert not dated.all_expired(NOW)


def test_next_expiry_ignores_lots_without_tokens() -> None:
    book = credited(lot("soon", 4, NOW + DAY), lot("late", 4, NOW + 3 * DAY)).burn(4)
    assert book.next_expiry == NOW + 3 * DAY


def test_take_prefers_the_named_lots_then_spending_order_and_never_goes_below_zero() -> None:
    book = credited(lot("promo", 5, None, priority=0), lot("order", 5, NOW + DAY), lot("other", 5, NOW + 2 * DAY))
    taken_book, taken = book.take(8, first=["order"])
    assert taken == [("order", 5), ("promo", 3)] and remaining(taken_book) == {"promo": 2, "order": 0, "other": 5}
    emptied, all_of_it = book.take(100)
    assert sum(n for _, n in all_of_it) == 15 and emptied.total == 0


def test_warnings_are_claimed_once_per_lot_within_the_window() -> None:
    book = credited(lot("soon", 5, NOW + DAY), lot("later", 5, NOW + 9 * DAY), lot("spent", 5, NOW + DAY))
    book = book.burn(0)
    first = book.claim_warnings(NOW, NOW + 3 * DAY)
    assert [item.lot_id for item in first.warnings] == ["soon", "spent"]
    again = first.claim_warnings(NOW, NOW + 3 * DAY)
    assert again.warnings == ()
    assert [item.lot_id for item in again.claim_warnings(NOW, NOW + 10 * DAY).warnings] == ["later"]


def test_the_stored_book_round_trips_and_burns_what_consumes_took_since() -> None:
    book = credited(lot("a", 10, NOW + DAY, priority=10), lot("b", 10, None))
    record = book.to_record()
    assert Book.from_record("chat", record) == book
    now_book = replay(Book.from_record("chat", record), (), balance=3)  # consumes took 17 since
    assert remaining(now_book) == {"a": 0, "b": 3}
    assert replay(Book.from_record("chat", None), (), balance=-6).debt == 6


@given(
    st.lists(st.tuples(st.integers(0, 50), st.integers(0, 100), st.one_of(st.none(), st.integers(1, 30))),
             min_size=1, max_size=8),
    st.lists(st.integers(1, 60), max_size=8),
)
def test_burning_the_sum_equals_burning_each_consume_in_turn(
    lots: list[tuple[int, int, int | None]], consumes: list[int],
) -> None:
    book = credited(*[lot(f"l{i}", tokens, None if days is None else NOW + days * DAY, priority)
                      for i, (tokens, priority, days) in enumerate(lots)])
    one_by_one = book
    for tokens in consumes:
        one_by_one = one_by_one.burn(tokens)
    at_once = book.burn(sum(consumes))
    assert at_once == one_by_one
    assert at_once.total == book.total - sum(consumes)
    assert all(item.remaining >= 0 for item in at_once.lots)
    assert at_once.debt == 0 or all(item.remaining == 0 for item in at_once.lots)
