"""SPEC 2.8 when the function dies: between any two DynamoDB calls of a consume, a retry with the same
Idempotency-Key replays instead of debiting twice, and the ledger still matches the balance.

The crash (conftest `crash`) is raised from a botocore event hook on the clients pynamodb builds:
`before-call` (the call never reached DynamoDB) or `after-call` (DynamoDB applied it, the function never
saw the answer).
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from user_credits.store import consumption as consumption_store
from user_credits.store.balances import read_group
from user_credits.store.models import LedgerRecord

# Keyed consume: decision transaction, GetItem of the balance, flush transaction.
KEYED_CALLS = 3
# Unkeyed consume: conditional UpdateItem, flush transaction.
UNKEYED_CALLS = 2
# A retry that finds the record in_progress: failed decision, record read, outbox read, flush,
# outbox read (now empty), record read (now completed).
RECOVERY_CALLS = 6


def grant(service: Any, user: str, group: str, tokens: int) -> None:
    reply = service.call("POST", f"/admin/users/{user}/grants", {"offerGroup": group, "tokens": tokens}, iam=True)
    assert reply.status == 201, reply.body


def consume(service: Any, user: str, group: str, key: str | None) -> Any:
    headers = {"Idempotency-Key": key} if key else None
    return service.call("POST", f"/users/{user}/consume", {"offerGroup": group, "tokens": 3}, iam=True,
                        headers=headers)


def consume_entries(user: str) -> list[LedgerRecord]:
    return [r for r in LedgerRecord.query(user, consistent_read=True) if r.reason == "consume"]


def test_a_keyed_consume_makes_the_calls_the_fault_tests_cover(local_service: Any, crash: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(local_service, user, group, 10)
    crash.count_calls()
    assert consume(local_service, user, group, "k").status == 200
    assert crash.calls == KEYED_CALLS
    crash.count_calls()
    assert consume(local_service, user, group, None).status == 200
    assert crash.calls == UNKEYED_CALLS
    other = ids("g")
    grant(local_service, user, other, 10)
    # Dies after its debit, before its flush: the record is left in_progress.
    crash.arm("after", at_call=2)
    crash.expect_crash(lambda: consume(local_service, user, other, "recover"))
    crash.count_calls()
    assert consume(local_service, user, other, "recover").status == 200
    assert crash.calls == RECOVERY_CALLS


@pytest.mark.parametrize("phase", ["before", "after"])
@pytest.mark.parametrize("at_call", range(1, KEYED_CALLS + 1))
def test_retry_after_a_crash_at_any_call_debits_exactly_once(
    local_service: Any, crash: Any, ids: Any, balanced: Any, phase: str, at_call: int
) -> None:
    user, group = ids("u"), ids("g")
    grant(local_service, user, group, 10)
    crash.arm(phase, at_call)
    crash.expect_crash(lambda: consume(local_service, user, group, "retry-me"))
    crash.disarm()
    reply = consume(local_service, user, group, "retry-me")
    expected = {"userId": user, "offerGroup": group, "consumed": 3, "balance": 7, "expiresAt": None}
    assert reply.status == 200 and reply.body == expected
    # And a third time, once everything is settled: still the same answer, still one debit.
    assert consume(local_service, user, group, "retry-me").body == expected
    assert read_group(user, group).balance == 7
    balanced(user)
    assert [(int(e.delta), int(e.balanceAfter), e.idempotencyKey) for e in consume_entries(user)] == [
        (-3, 7, "retry-me")]


@pytest.mark.parametrize("phase", ["before", "after"])
@pytest.mark.parametrize("at_call", range(1, RECOVERY_CALLS + 1))
def test_a_crash_while_replaying_is_survived_too(
    local_service: Any, crash: Any, ids: Any, balanced: Any, phase: str, at_call: int
) -> None:
    """The first request dies after its debit; the first retry dies too, at every call; the next replays."""
    user, group = ids("u"), ids("g")
    grant(local_service, user, group, 10)
    crash.arm("after", 1)
    crash.expect_crash(lambda: consume(local_service, user, group, "twice"))
    crash.arm(phase, at_call)
    # This retry may die (at the planned call) or, if it makes fewer calls, answer: both are fine.
    with contextlib.suppress(crash.error):
        consume(local_service, user, group, "twice")
    crash.disarm()
    reply = consume(local_service, user, group, "twice")
    assert reply.status == 200 and reply.body["balance"] == 7
    assert read_group(user, group).balance == 7
    balanced(user)
    assert len(consume_entries(user)) == 1


@pytest.mark.parametrize("phase", ["before", "after"])
@pytest.mark.parametrize("at_call", range(1, UNKEYED_CALLS + 1))
def test_a_crash_without_a_key_never_loses_a_ledger_entry(
    local_service: Any, crash: Any, ids: Any, balanced: Any, phase: str, at_call: int
) -> None:
    user, group = ids("u"), ids("g")
    grant(local_service, user, group, 10)
    crash.arm(phase, at_call)
    crash.expect_crash(lambda: consume(local_service, user, group, None))
    crash.disarm()
    debited = phase == "after" or at_call > 1
    assert read_group(user, group).balance == (7 if debited else 10)
    # A debit whose flush never ran sits in the outbox until the next writer (or the checker) flushes it.
    assert consume(local_service, user, group, None).status == 200
    assert consumption_store.pending_entries(user, group) == []
    assert len(consume_entries(user)) == (2 if debited else 1)
    balanced(user)
