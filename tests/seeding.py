"""Putting a group into a given state directly through the store, for tests that need one the routes
cannot make (a lot that expired before the sweep ran, a group written in the past)."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import datetime

from user_credits.domain.lots import DEFAULT_PRIORITY, NewLot
from user_credits.store.balances import GroupState, read_group, stage_group_change
from user_credits.store.transactions import commit


def seed_lot(
    user: str, group: str, tokens: int, *, expires_at: datetime | None, at: datetime,
    priority: int = DEFAULT_PRIORITY, reason: str = "grant", order_id: str | None = None,
    lot_id: str | None = None,
) -> GroupState:
    """Add one lot of `tokens` to the group as of `at`, with its ledger entry; the group after."""
    before = read_group(user, group)
    new = NewLot(lot_id or f"seed-{uuid.uuid4().hex[:12]}", "order" if order_id else "grant", tokens, at,
                 expires_at, priority, order_id=order_id)
    book, movement = before.book.credit(new, reason)
    after: list[GroupState] = []
    commit(lambda tx: after.append(stage_group_change(tx, before, [replace(movement, order_id=order_id)], book, at)))
    return after[0]
