"""SPEC 2.8 when the function dies: between any two DynamoDB calls of a consume, a retry with the same
Idempotency-Key replays instead of debiting twice, and the ledger still matches the balance, whether
the stream has delivered the first attempt's write by the time of the retry or not.

The crash (conftest `crash`) is raised from a botocore event hook on the clients pynamodb builds:
`before-call` (the call never reached DynamoDB) or `after-call` (DynamoDB applied it, the function never
saw the answer). The stream function's own calls are left alone here (see tests/test_stream.py).
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine

from user_credits.store.balances import read_group
from user_credits.store.consumption import HOLD_SECONDS
from user_credits.store.models import LedgerRecord

# Keyed consume: PutItem of the key's record, UpdateItem of the balance (with the key's marker).
KEYED_CALLS = 2
# Unkeyed consume: the conditional UpdateItem, nothing else.
UNKEYED_CALLS = 1
# A retry that finds the record in_progress, no marker, and the claim older than HOLD_SECONDS (the first
# attempt died before its debit): PutItem (refused: in_progress), the transaction that debits, GetItem of
# the marker (the answer). Sooner, it is PutItem and GetItem (no marker yet), and a 503.
RECOVERY_CALLS = 3
TOO_SOON_CALLS = 2


def settled() -> Any:
    """The time a caller's retries reach once the first attempt can no longer land its debit."""
    return time_machine.travel(datetime.now(UTC) + timedelta(seconds=HOLD_SECONDS + 1), tick=True)


def consume_as_a_caller(service: Any, user: str, group: str, key: str | None) -> Any:
    """A 503 means "retry shortly" (Retry-After): the caller does, later."""
    reply = consume(service, user, group, key)
    if reply.status == 503:
        with settled():
            reply = consume(service, user, group, key)
    return reply


def grant(service: Any, user: str, group: str, tokens: int) -> None:
    reply = service.call("POST", f"/admin/users/{user}/grants", {"offerGroup": group, "tokens": tokens}, iam=True)
    assert reply.status == 201, reply.body


def consume(service: Any, user: str, group: str, key: str | None) -> Any:
    headers = {"Idempotency-Key": key} if key else None
    return service.call("POST", f"/users/{user}/consume", {"offerGroup": group, "tokens": 3}, iam=True,
                        headers=headers)


def consume_entries(user: str) -> list[LedgerRecord]:
    return [r for r in LedgerRecord.query(user, consistent_read=True) if r.reason == "consume"]


def test_a_consume_makes_the_calls_the_fault_tests_cover(local_service: Any, crash: Any, ids: Any) -> None:
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
    with local_service.stream_late():
        # Dies after claiming its key, before its debit; the retries come before the stream runs.
        crash.arm("after", at_call=1)
        crash.expect_crash(lambda: consume(local_service, user, other, "recover"))
        crash.count_calls()
        # Too soon: the first attempt might still land its debit.
        assert consume(local_service, user, other, "recover").status == 503
        assert crash.calls == TOO_SOON_CALLS
        with settled():
            crash.count_calls()
            assert consume(local_service, user, other, "recover").status == 200
            assert crash.calls == RECOVERY_CALLS


@pytest.mark.parametrize("stream", ["delivered", "late"])
@pytest.mark.parametrize("phase", ["before", "after"])
@pytest.mark.parametrize("at_call", range(1, KEYED_CALLS + 1))
def test_retry_after_a_crash_at_any_call_debits_exactly_once(
    local_service: Any, crash: Any, ids: Any, balanced: Any, phase: str, at_call: int, stream: str
) -> None:
    user, group = ids("u"), ids("g")
    grant(local_service, user, group, 10)
    expected = {"userId": user, "offerGroup": group, "consumed": 3, "balance": 7, "expiresAt": None}
    late = local_service.stream_late() if stream == "late" else contextlib.nullcontext()
    with late:
        crash.arm(phase, at_call)
        crash.expect_crash(lambda: consume(local_service, user, group, "retry-me"))
        crash.disarm()
        reply = consume_as_a_caller(local_service, user, group, "retry-me")
        assert reply.status == 200 and reply.body == expected
    # And a third time, once the stream has completed the record: still the same answer, one debit.
    assert consume(local_service, user, group, "retry-me").body == expected
    assert read_group(user, group).balance == 7
    balanced(user)
    assert [(int(e.delta), int(e.balanceAfter), e.idempotencyKey) for e in consume_entries(user)] == [
        (-3, 7, "retry-me")]


@pytest.mark.parametrize("first_dies_after", [1, 2])
@pytest.mark.parametrize("phase", ["before", "after"])
@pytest.mark.parametrize("at_call", range(1, RECOVERY_CALLS + 1))
def test_a_crash_while_recovering_is_survived_too(
    local_service: Any, crash: Any, ids: Any, balanced: Any, phase: str, at_call: int, first_dies_after: int
) -> None:
    """The first request dies after its claim (or its debit); the retry, before the stream has run and
    once the claim has settled, dies too, at every call; the next retry answers with the one debit."""
    user, group = ids("u"), ids("g")
    grant(local_service, user, group, 10)
    with local_service.stream_late():
        crash.arm("after", first_dies_after)
        crash.expect_crash(lambda: consume(local_service, user, group, "twice"))
        with settled():
            crash.arm(phase, at_call)
            # This retry may die (at the planned call) or, if it makes fewer calls, answer: both are fine.
            with contextlib.suppress(crash.error):
                consume(local_service, user, group, "twice")
            crash.disarm()
            reply = consume(local_service, user, group, "twice")
            assert reply.status == 200 and reply.body["balance"] == 7
    assert consume(local_service, user, group, "twice").body["balance"] == 7
    assert read_group(user, group).balance == 7
    balanced(user)
    assert len(consume_entries(user)) == 1


@pytest.mark.parametrize("phase", ["before", "after"])
def test_a_crash_without_a_key_never_loses_a_ledger_entry(
    local_service: Any, crash: Any, ids: Any, balanced: Any, phase: str
) -> None:
    user, group = ids("u"), ids("g")
    grant(local_service, user, group, 10)
    crash.arm(phase, 1)
    crash.expect_crash(lambda: consume(local_service, user, group, None))
    crash.disarm()
    debited = phase == "after"
    assert read_group(user, group).balance == (7 if debited else 10)
    # The entry comes from the write itself (through the stream): the function's death cannot lose it.
    assert len(consume_entries(user)) == (1 if debited else 0)
    balanced(user)


def test_a_keyed_refusal_is_decided_again_on_retry(local_service: Any, ids: Any, balanced: Any) -> None:
    """A 402 is not stored under the key: after a top-up the same request succeeds, once."""
    user, group = ids("u"), ids("g")
    grant(local_service, user, group, 2)
    assert consume(local_service, user, group, "later").error == "insufficient_credits"
    grant(local_service, user, group, 5)
    first = consume(local_service, user, group, "later")
    assert first.status == 200 and first.body["balance"] == 4
    assert consume(local_service, user, group, "later").body == first.body
    assert read_group(user, group).balance == 4
    balanced(user)


def test_a_duplicate_never_debits_while_the_first_attempt_may_still_land(
    local_service: Any, ids: Any, balanced: Any,
) -> None:
    """The first attempt claims its key and is slow to land its debit (botocore's backoff, a pause): a
    duplicate meanwhile must neither debit nor let the first debit twice (found in review)."""
    from user_credits.domain.changes import KeyedRequest
    from user_credits.store import consumption as store
    from user_credits.store.idempotency import request_hash, scoped_key

    user, group = ids("u"), ids("g")
    grant(local_service, user, group, 10)
    body = {"offerGroup": group, "tokens": 3, "maxOverdraft": 0}
    keyed = KeyedRequest("slow", scoped_key(user, store.CONSUME_ROUTE, "slow"), request_hash(body))
    now = datetime.now(UTC)
    assert store.claim(keyed, now).fresh  # the first attempt, paused after its claim
    # The duplicate: too soon to decide; nothing is debited.
    assert consume(local_service, user, group, "slow").status == 503
    assert read_group(user, group).balance == 10
    # The first attempt lands (its answer is its own), the stream completes the record.
    first = store.debit(user, group, 3, 0, now, keyed)
    assert isinstance(first, store.Debit) and first.balance_after == 7
    local_service.drain()
    # Every retry, soon or late, replays that one debit.
    assert consume(local_service, user, group, "slow").body["balance"] == 7
    with settled():
        assert consume(local_service, user, group, "slow").body["balance"] == 7
    assert read_group(user, group).balance == 7
    balanced(user)
    assert len(consume_entries(user)) == 1


def test_a_marker_never_answers_another_body_under_the_same_key(local_service: Any, ids: Any) -> None:
    """A marker outliving its record (the stream more than a day late) must not replay its answer to a
    new request with another body: markers are named after the key and the body."""
    from user_credits.domain.changes import KeyedRequest
    from user_credits.store import consumption as store
    from user_credits.store.idempotency import request_hash, scoped_key

    user, group = ids("u"), ids("g")
    grant(local_service, user, group, 10)
    record_key = scoped_key(user, store.CONSUME_ROUTE, "k")
    first = KeyedRequest("k", record_key, request_hash({"offerGroup": group, "tokens": 3, "maxOverdraft": 0}))
    other = KeyedRequest("k", record_key, request_hash({"offerGroup": group, "tokens": 4, "maxOverdraft": 0}))
    assert store.marker_names(first) != store.marker_names(other)
    with local_service.stream_late():
        now = datetime.now(UTC)
        assert isinstance(store.debit(user, group, 3, 0, now, first), store.Debit)
        # The other body's debit is not taken for a replay of the first: it debits.
        again = store.debit(user, group, 4, 0, now, other)
        assert isinstance(again, store.Debit) and again.balance_after == 3
