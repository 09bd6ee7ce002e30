"""The read-then-conditional-write primitive that purchases, refunds, grants and expiry share."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from user_credits.store.balances import EntryDraft, read_group, stage_group_change
from user_credits.store.models import LedgerRecord
from user_credits.store.transactions import StaleRead, commit


def test_change_writes_balance_and_exact_ledger_entries(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    now = datetime.now(UTC)
    before = read_group(user, group)
    assert not before.exists and before.balance == 0
    expiry = now + timedelta(days=30)
    commit(lambda tx: stage_group_change(
        tx, before, [EntryDraft(100, "purchase", order_id="o1"), EntryDraft(-30, "grant")], expiry, now))
    after = read_group(user, group)
    assert (after.balance, after.seq, after.expires_at) == (70, 2, expiry)
    entries = sorted(LedgerRecord.query(user), key=lambda r: r.seq)
    assert [(int(e.delta), int(e.balanceAfter), e.reason) for e in entries] == [
        (100, 100, "purchase"), (-30, 70, "grant")]


def test_a_stale_snapshot_cannot_commit(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    now = datetime.now(UTC)
    first = read_group(user, group)
    commit(lambda tx: stage_group_change(tx, first, [EntryDraft(5, "grant")], None, now))
    # A second writer that read before the first commit must lose, and write no ledger entry.
    with pytest.raises(StaleRead):
        commit(lambda tx: stage_group_change(tx, first, [EntryDraft(7, "grant")], None, now))
    fresh = read_group(user, group)
    assert fresh.balance == 5 and len(list(LedgerRecord.query(user))) == 1
    with pytest.raises(StaleRead):
        commit(lambda tx: stage_group_change(tx, first, [EntryDraft(7, "grant")], None, now))
    commit(lambda tx: stage_group_change(tx, fresh, [EntryDraft(7, "grant")], None, now))
    assert read_group(user, group).balance == 12
