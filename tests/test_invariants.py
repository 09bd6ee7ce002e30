"""The invariant checker: balance == sum of ledger deltas for every (user, group), outboxes included."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from user_credits.domain.ledger import LedgerEntry
from user_credits.logic.invariants import Mismatch, check_all, check_user
from user_credits.store import consumption as consumption_store
from user_credits.store.ledger import ledger_record


def grant(service: Any, user: str, group: str, tokens: int) -> None:
    assert service.call("POST", f"/admin/users/{user}/grants", {"offerGroup": group, "tokens": tokens},
                        iam=True).status == 201


def consume(service: Any, user: str, group: str, tokens: int) -> None:
    assert service.call("POST", f"/users/{user}/consume", {"offerGroup": group, "tokens": tokens},
                        iam=True).status == 200


def test_a_consistent_user_passes(service: Any, ids: Any) -> None:
    user, a, b = ids("u"), ids("a"), ids("b")
    grant(service, user, a, 10)
    grant(service, user, b, 3)
    consume(service, user, a, 4)
    report = check_user(user)
    assert report.ok and report.users == 1 and report.groups == 2


def test_a_ledger_entry_without_its_balance_change_is_reported(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, group, 10)
    stray = LedgerEntry(user, group, delta=-2, balance_after=8, reason="consume", at=datetime.now(UTC), seq=99)
    ledger_record(stray).save()
    assert check_user(user).mismatches == [Mismatch(user, group, balance=10, ledger_sum=8)]


def test_a_ledger_without_a_balance_is_reported(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    ledger_record(LedgerEntry(user, group, 5, 5, "grant", datetime.now(UTC), 1)).save()
    assert check_user(user).mismatches == [Mismatch(user, group, balance=0, ledger_sum=5)]


def test_the_checker_flushes_pending_outbox_entries_first(
    service: Any, ids: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, group, 10)
    monkeypatch.setattr(consumption_store, "_flush_quietly", lambda user_id, item: None)
    consume(service, user, group, 3)
    consume(service, user, group, 2)
    assert len(consumption_store.pending_entries(user, group)) == 2
    assert check_user(user).ok
    assert consumption_store.pending_entries(user, group) == []


def test_check_all_covers_every_user(fresh_service: Any, ids: Any) -> None:
    good, bad, group = ids("u"), ids("u"), ids("g")
    grant(fresh_service, good, group, 10)
    grant(fresh_service, bad, group, 10)
    ledger_record(LedgerEntry(bad, group, 1, 11, "grant", datetime.now(UTC), 7)).save()
    report = check_all()
    assert report.users == 2
    assert report.mismatches == [Mismatch(bad, group, balance=10, ledger_sum=11)]
