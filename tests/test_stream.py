"""SPEC 2.8 and 4 through the table's stream: the ledger and the events follow from each write, once per
change however often a record is delivered, and a consume is one write.

The stream function runs as Lambda's event source mapping runs it (conftest: after each call the
service's pump delivers what the call wrote, honouring batchItemFailures). Here it is also killed at
each of its own DynamoDB calls, its batches are delivered twice, and EventBridge fails for a while.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine
from conftest import IN_STREAM, Service, dynamodb_hooks

from user_credits.domain.changes import Change, GroupWrite, event_id
from user_credits.domain.clock import to_iso
from user_credits.domain.lots import Movement
from user_credits.store.balances import read_group
from user_credits.store.consumption import MARKER_BALANCE, MARKER_EXPIRY
from user_credits.store.models import IdempotencyRecord, LedgerRecord, group_sk


def grant(service: Service, user: str, group: str, tokens: int) -> Any:
    reply = service.call("POST", f"/admin/users/{user}/grants", {"offerGroup": group, "tokens": tokens}, iam=True)
    assert reply.status == 201, reply.body
    return reply


def consume(service: Service, user: str, group: str, tokens: int, key: str | None = None) -> Any:
    headers = {"Idempotency-Key": key} if key else None
    return service.call("POST", f"/users/{user}/consume", {"offerGroup": group, "tokens": tokens}, iam=True,
                        headers=headers)


def ledger(user: str) -> list[tuple[str, int, int, int, str]]:
    records = LedgerRecord.query(user, consistent_read=True)
    return sorted((r.entryKey, int(r.seq), int(r.delta), int(r.balanceAfter), r.reason) for r in records)


def balance_item(service: Service, user: str, group: str) -> dict[str, Any]:
    item: dict[str, Any] = service.backend.client().get_item(
        TableName=service.backend.tables["AccountsTable"], ConsistentRead=True,
        Key={"userId": {"S": user}, "sk": {"S": group_sk(group)}})["Item"]
    return item


@contextlib.contextmanager
def request_calls(service: Service) -> Iterator[list[str]]:
    """The DynamoDB operations the request paths make inside the block (the stream function's excluded)."""
    calls: list[str] = []

    def record(model: Any, **_: Any) -> None:
        if not getattr(IN_STREAM, "active", False):
            calls.append(model.name)

    with dynamodb_hooks(service, {"before-call.dynamodb": record}):
        yield calls


def test_an_unkeyed_consume_is_one_update_item_and_a_keyed_one_two_calls(service: Service, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, group, 10)
    with request_calls(service) as calls:
        assert consume(service, user, group, 1).status == 200
    assert calls == ["UpdateItem"]
    with request_calls(service) as calls:
        assert consume(service, user, group, 1, key="k-1").status == 200
    assert calls == ["PutItem", "UpdateItem"]
    with request_calls(service) as calls:
        assert consume(service, user, group, 1, key="k-1").status == 200
    # The replay: the claim finds the completed record and answers from it.
    assert calls == ["PutItem"]


def test_the_ledger_follows_from_the_stream_and_a_redelivered_batch_changes_nothing(
    service: Service, ids: Any, events: Any, balanced: Any,
) -> None:
    user, group = ids("u"), ids("g")
    service.setenv("LOW_BALANCE_THRESHOLDS", json.dumps({group: 5}))
    delivered: list[dict[str, Any]] = []
    real_deliver = service.deliver

    def keep(event: dict[str, Any]) -> Any:
        delivered.append(event)
        return real_deliver(event)

    service.deliver = keep  # type: ignore[method-assign]
    with service.stream_late():
        grant(service, user, group, 10)
        assert consume(service, user, group, 3).body["balance"] == 7
        assert consume(service, user, group, 4, key="k").body["balance"] == 3
        # The balances are exact at once; nothing of the ledger yet (SPEC 2.8).
        assert read_group(user, group).balance == 3 and ledger(user) == []
    first = ledger(user)
    assert [(seq, delta, after, reason) for _, seq, delta, after, reason in first] == [
        (1, 10, 10, "grant"), (2, -3, 7, "consume"), (3, -4, 3, "consume")]
    sent = list(events.entries)
    for batch in list(delivered):
        real_deliver(batch)
    assert ledger(user) == first
    again = events.entries[len(sent):]
    # At least once, and each redelivered event under the id it had.
    assert sorted(json.loads(e["Detail"])["eventId"] for e in again) == sorted(
        json.loads(e["Detail"])["eventId"] for e in sent)
    assert [d["balance"] for d in events.of_type("CreditsLow")] == [3, 3]
    balanced(user)


def test_a_keyed_consume_leaves_a_completed_record_and_no_marker(service: Service, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, group, 10)
    with service.stream_late():
        first = consume(service, user, group, 4, key="k-9")
        item = balance_item(service, user, group)
        # Until the stream has run, the marker holds the answer and the record is unfinished.
        assert sorted(name[:4] for name in item if name.startswith(("ikb_", "ike_"))) == [
            MARKER_BALANCE, MARKER_EXPIRY]
        record = IdempotencyRecord.get(f"consume#{user}#k-9", consistent_read=True)
        assert record.status == "in_progress"
    item = balance_item(service, user, group)
    assert not [name for name in item if name.startswith(("ikb_", "ike_"))]
    record = IdempotencyRecord.get(f"consume#{user}#k-9", consistent_read=True)
    assert (record.status, record.statusCode, record.response) == ("completed", 200, first.body)


def test_concurrent_duplicates_of_a_keyed_consume_debit_once(
    local_service: Service, ids: Any, balanced: Any,
) -> None:
    user, group = ids("u"), ids("g")
    grant(local_service, user, group, 100)
    replies: list[Any] = []
    start = threading.Barrier(6)

    def send() -> None:
        start.wait()
        replies.append(consume(local_service, user, group, 7, key="same"))

    # Before the stream completes the record, so duplicates meet the record unfinished.
    with local_service.stream_late():
        threads = [threading.Thread(target=send) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    answered = [r for r in replies if r.status == 200]
    assert answered and all(r.body == answered[0].body for r in answered), [(r.status, r.body) for r in replies]
    assert {r.status for r in replies} <= {200, 503}
    assert read_group(user, group).balance == 93
    balanced(user)


STREAM_CALLS_OF_A_KEYED_CONSUME = 3  # PutItem of the entry, UpdateItem of the record, UpdateItem of the marker


@pytest.mark.parametrize("phase", ["before", "after"])
@pytest.mark.parametrize("at_call", range(1, STREAM_CALLS_OF_A_KEYED_CONSUME + 1))
def test_the_stream_function_killed_at_any_call_is_delivered_again_and_loses_nothing(
    local_service: Service, crash: Any, ids: Any, events: Any, balanced: Any, phase: str, at_call: int,
) -> None:
    user, group = ids("u"), ids("g")
    local_service.setenv("LOW_BALANCE_THRESHOLDS", json.dumps({group: 5}))
    grant(local_service, user, group, 10)
    crash.stream = True
    crash.count_calls()
    assert consume(local_service, user, group, 1, key="probe").status == 200
    assert crash.calls == STREAM_CALLS_OF_A_KEYED_CONSUME
    crash.arm(phase, at_call)
    first = consume(local_service, user, group, 6, key="low")
    assert first.status == 200 and first.body["balance"] == 3
    assert crash.fired
    crash.disarm()
    # Delivered again until it went through: one entry, the record completed, the marker gone.
    assert [(delta, after) for _, _, delta, after, reason in ledger(user) if reason == "consume"] == [
        (-1, 9), (-6, 3)]
    assert consume(local_service, user, group, 6, key="low").body == first.body
    assert not [name for name in balance_item(local_service, user, group) if name.startswith("ikb_")]
    lows = events.sent("CreditsLow")
    assert lows and len({low["eventId"] for low in lows}) == 1
    balanced(user)


def test_events_of_every_kind_carry_stable_distinct_ids(service: Service, ids: Any, events: Any) -> None:
    user, group = ids("u"), ids("g")
    service.setenv("LOW_BALANCE_THRESHOLDS", json.dumps({group: 50}))
    grant(service, user, group, 60)
    grant(service, user, group, 5)
    consume(service, user, group, 20)
    details = [json.loads(e["Detail"]) for e in events.entries]
    assert Counter(e["DetailType"] for e in events.entries) == Counter({"CreditsGranted": 2, "CreditsLow": 1})
    assert len({d["eventId"] for d in details}) == 3


def test_a_write_whose_movements_do_not_explain_it_is_refused_by_the_stream() -> None:
    change = Change("c1", datetime(2030, 1, 1, tzinfo=UTC), (Movement(-3, "consume"),))
    good = GroupWrite("u", "g", change, seq_before=4, balance_before=10, seq_after=5, balance_after=7)
    assert [(e.seq, e.balance_after) for e in good.entries()] == [(5, 7)]
    bad = GroupWrite("u", "g", change, seq_before=4, balance_before=10, seq_after=5, balance_after=6)
    with pytest.raises(ValueError, match="movements give"):
        bad.entries()
    assert event_id("c1", 0, "CreditsLow") == event_id("c1", 0, "CreditsLow") != event_id("c1", 1, "CreditsLow")


@pytest.mark.parametrize("phase", ["before", "after"])
def test_a_change_of_many_entries_killed_at_its_batch_write_is_delivered_again_whole(
    local_service: Service, crash: Any, ids: Any, events: Any, balanced: Any, phase: str,
) -> None:
    """Two lots expiring in one rewrite are two movements: one BatchWriteItem of both entries."""
    user, group = ids("u"), ids("g")
    now = datetime.now(UTC)
    for tokens, minutes in ((4, 10), (6, 20)):
        body = {"offerGroup": group, "tokens": tokens, "expiresAt": to_iso(now + timedelta(minutes=minutes))}
        assert local_service.call("POST", f"/admin/users/{user}/grants", body, iam=True).status == 201
    crash.stream = True
    crash.arm(phase, 1)
    with time_machine.travel(now + timedelta(hours=1), tick=True):
        # A consume (with an overdraft allowed) finds both lots due: they expire first, in one rewrite.
        reply = local_service.call("POST", f"/users/{user}/consume",
                                   {"offerGroup": group, "tokens": 1, "maxOverdraft": 5}, iam=True)
        assert reply.status == 200 and reply.body["balance"] == -1
    assert crash.fired
    crash.disarm()
    expired = sorted((delta, after) for _, _, delta, after, reason in ledger(user) if reason == "expire")
    assert expired in ([(-6, 0), (-4, 6)], [(-6, 4), (-4, 0)])
    assert len({e["eventId"] for e in events.sent("CreditsExpired")}) == 2
    balanced(user)
