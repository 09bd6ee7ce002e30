"""The read-then-conditional-write primitive that purchases, refunds, grants and expiry share."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import drain_stream

from user_credits.domain.lots import Movement, NewLot
from user_credits.store.balances import read_group, stage_group_change
from user_credits.store.models import BalanceRecord, LedgerRecord, group_sk
from user_credits.store.transactions import StaleRead, commit


def test_change_writes_balance_book_and_the_stream_writes_exact_ledger_entries(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    now = datetime.now(UTC)
    before = read_group(user, group)
    assert not before.exists and before.balance == 0
    expiry = now + timedelta(days=30)
    book, bought = before.book.credit(NewLot("o1.0", "order", 100, now, expiry, order_id="o1"), "purchase")
    book, _ = book.take(30)
    moves = [Movement(100, "purchase", "o1.0", order_id="o1"), Movement(-30, "grant")]
    commit(lambda tx: stage_group_change(tx, before, moves, book, now))
    after = read_group(user, group)
    assert (after.balance, after.seq, after.expires_at) == (70, 2, expiry)
    assert [(lot.lot_id, lot.remaining) for lot in after.book.lots] == [("o1.0", 70)]
    record = BalanceRecord.get(user, group_sk(group), consistent_read=True)
    assert record.nextExp == expiry and record.dueSort is not None
    assert record.dueSort.startswith(expiry.isoformat()[:19])
    # The write carries its movements; the stream function makes the entries, with exact balanceAfter.
    assert list(LedgerRecord.query(user, consistent_read=True)) == []
    drain_stream()
    entries = sorted(LedgerRecord.query(user), key=lambda r: r.seq)
    assert [(int(e.delta), int(e.balanceAfter), e.reason, e.lotId) for e in entries] == [
        (100, 100, "purchase", "o1.0"), (-30, 70, "grant", None)]
    assert bought.lot_id == "o1.0"


def test_a_book_that_disagrees_with_the_movements_is_a_bug_and_writes_nothing(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    now = datetime.now(UTC)
    before = read_group(user, group)
    book, _ = before.book.credit(NewLot("l", "grant", 5, now, None), "grant")
    with pytest.raises(AssertionError):
        commit(lambda tx: stage_group_change(tx, before, [Movement(6, "grant", "l")], book, now))
    assert not read_group(user, group).exists


def test_a_stale_snapshot_cannot_commit(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    now = datetime.now(UTC)

    def plus(state: Any, tokens: int, lot_id: str) -> Any:
        book, move = state.book.credit(NewLot(lot_id, "grant", tokens, now, None), "grant")
        return lambda tx: stage_group_change(tx, state, [move], book, now)

    first = read_group(user, group)
    commit(plus(first, 5, "a"))
    # A second writer that read before the first commit must lose, and write no ledger entry.
    with pytest.raises(StaleRead):
        commit(plus(first, 7, "b"))
    fresh = read_group(user, group)
    drain_stream()
    assert fresh.balance == 5 and len(list(LedgerRecord.query(user))) == 1
    with pytest.raises(StaleRead):
        commit(plus(first, 7, "b"))
    commit(plus(fresh, 7, "b"))
    assert read_group(user, group).balance == 12
