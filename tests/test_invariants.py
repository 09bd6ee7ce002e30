"""The invariant checker: for every (user, group), balance == sum of ledger deltas, and `seq` runs
1, 2, ... up to the balance item's, once the stream has delivered."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from user_credits.domain.ledger import LedgerEntry
from user_credits.logic.invariants import Mismatch, check_all, check_user
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
    assert check_user(user).mismatches == [
        Mismatch(user, group, balance=10, ledger_sum=8, seq_problem="seq 1,99, balance item at 1")]


def test_a_ledger_without_a_balance_is_reported(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    ledger_record(LedgerEntry(user, group, 5, 5, "grant", datetime.now(UTC), 1)).save()
    assert check_user(user).mismatches == [
        Mismatch(user, group, balance=0, ledger_sum=5, seq_problem="seq 1, balance item at 0")]


def test_the_checker_sees_entries_the_stream_has_not_delivered_yet(service: Any, ids: Any) -> None:
    """A quiet moment is one where the stream has caught up: until then, a missing entry shows."""
    user, group = ids("u"), ids("g")
    grant(service, user, group, 10)
    with service.stream_late():
        consume(service, user, group, 3)
        consume(service, user, group, 2)
        assert check_user(user).mismatches == [
            Mismatch(user, group, balance=5, ledger_sum=10, seq_problem="seq 1, balance item at 3")]
    assert check_user(user).ok


def test_a_gap_in_seq_is_reported_even_when_the_sums_agree(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, group, 10)
    consume(service, user, group, 3)
    # An entry of delta 0 under a seq the balance item never had: the sum still agrees.
    ledger_record(LedgerEntry(user, group, 0, 7, "consume", datetime.now(UTC), 5)).save()
    [mismatch] = check_user(user).mismatches
    assert (mismatch.balance, mismatch.ledger_sum, mismatch.seq_problem) == (7, 7, "seq 1-2,5, balance item at 2")


def test_check_all_covers_every_user(fresh_service: Any, ids: Any) -> None:
    good, bad, group = ids("u"), ids("u"), ids("g")
    grant(fresh_service, good, group, 10)
    grant(fresh_service, bad, group, 10)
    ledger_record(LedgerEntry(bad, group, 1, 11, "grant", datetime.now(UTC), 7)).save()
    report = check_all()
    assert report.users == 2
    assert report.mismatches == [
        Mismatch(bad, group, balance=10, ledger_sum=11, seq_problem="seq 1,7, balance item at 1")]
