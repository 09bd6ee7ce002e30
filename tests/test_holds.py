"""SPEC 2.9 and the hold routes of SPEC 3, through the handlers, on moto and DynamoDB Local."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import time_machine
from test_consume import grant

from user_credits.store.models import LedgerRecord


def hold(service: Any, user: str, group: str, tokens: int, key: str | None = None, **extra: Any) -> Any:
    headers = {"Idempotency-Key": key} if key else None
    return service.call("POST", f"/users/{user}/holds", {"offerGroup": group, "tokens": tokens, **extra},
                        iam=True, headers=headers)


def settle(service: Any, user: str, hold_id: str, tokens: int, **extra: Any) -> Any:
    return service.call("POST", f"/users/{user}/holds/{hold_id}/settle", {"tokens": tokens, **extra}, iam=True)


def release(service: Any, user: str, hold_id: str) -> Any:
    return service.call("POST", f"/users/{user}/holds/{hold_id}/release", {}, iam=True)


def consume(service: Any, user: str, group: str, tokens: int) -> Any:
    return service.call("POST", f"/users/{user}/consume", {"offerGroup": group, "tokens": tokens}, iam=True)


def ledger(user: str) -> list[tuple[int, str, str | None]]:
    records = sorted(LedgerRecord.query(user, consistent_read=True), key=lambda r: (r.offerGroup, int(r.seq)))
    return [(int(r.delta), r.reason, r.holdId) for r in records]


def lots(service: Any, user: str, group: str) -> list[tuple[str, int]]:
    reply = service.call("GET", f"/users/{user}/credits", iam=True)
    [found] = [g for g in reply.body["groups"] if g["offerGroup"] == group]
    return [(lot["lotId"], lot["remaining"]) for lot in found["lots"]]


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def test_reserve_500_settle_320(service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, group, 1000)
    placed = hold(service, user, group, 500)
    assert placed.status == 201, placed.body
    assert placed.body["tokens"] == 500 and placed.body["balance"] == 500
    assert placed.body["userId"] == user and placed.body["offerGroup"] == group
    hold_id = placed.body["holdId"]
    done = settle(service, user, hold_id, 320)
    assert done.status == 200, done.body
    assert done.body == {"holdId": hold_id, "settled": 320, "released": 180, "balance": 680, "status": "settled"}
    assert ledger(user) == [(1000, "grant", None), (-500, "hold", hold_id), (180, "release", hold_id)]
    balanced(user)


def test_a_keyed_hold_repeated_replays_it_and_places_nothing_more(service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, group, 1000)
    first = hold(service, user, group, 500, key="model-call-1", ttlSeconds=600)
    again = hold(service, user, group, 500, key="model-call-1", ttlSeconds=600)
    assert first.status == again.status == 201, (first.body, again.body)
    assert again.body == first.body
    assert [delta for delta, _, _ in ledger(user)] == [1000, -500]
    reused = hold(service, user, group, 400, key="model-call-1", ttlSeconds=600)
    assert reused.status == 422 and reused.body["error"] == "idempotency_key_reused"
    balanced(user)


def test_a_settle_above_the_hold_consumes_the_excess_or_is_refused_with_the_hold_open(
        service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, group, 100)
    hold_id = hold(service, user, group, 60).body["holdId"]
    refused = settle(service, user, hold_id, 200)
    assert refused.status == 402 and refused.body["error"] == "insufficient_credits", refused.body
    assert refused.body["balance"] == 40
    done = settle(service, user, hold_id, 90)
    assert done.body == {"holdId": hold_id, "settled": 90, "released": 0, "balance": 10, "status": "settled"}
    assert ledger(user) == [(100, "grant", None), (-60, "hold", hold_id), (-30, "consume", hold_id)]
    over = hold(service, user, group, 10).body["holdId"]
    assert settle(service, user, over, 15, maxOverdraft=5).body["balance"] == -5
    balanced(user)


def test_release_returns_everything_and_a_closed_hold_answers_only_the_same_call(
        service: Any, ids: Any, balanced: Any) -> None:
    user, other, group = ids("u"), ids("o"), ids("g")
    grant(service, user, group, 50)
    hold_id = hold(service, user, group, 20).body["holdId"]
    assert settle(service, other, hold_id, 1).status == 404
    first = release(service, user, hold_id)
    assert first.body == {"holdId": hold_id, "settled": 0, "released": 20, "balance": 50, "status": "released"}
    assert release(service, user, hold_id).body == first.body
    closed = settle(service, user, hold_id, 5)
    assert closed.status == 409 and closed.body["error"] == "hold_closed"
    settled_id = hold(service, user, group, 20).body["holdId"]
    assert settle(service, user, settled_id, 5).status == 200
    assert settle(service, user, settled_id, 5).body["balance"] == 45
    assert settle(service, user, settled_id, 6).status == 409
    assert release(service, user, settled_id).status == 409
    missing = settle(service, user, f"{'0' * 20}-20-{group}", 1)
    assert missing.status == 404 and missing.body["error"] == "hold_not_found"
    assert release(service, user, "not-a-hold").status == 404
    balanced(user)


def test_returned_tokens_go_back_to_the_lots_they_came_from(service: Any, ids: Any, balanced: Any) -> None:
    """A consume while a hold is open takes the next lot; the release then refills the first one."""
    user, group = ids("u"), ids("g")
    first = grant(service, user, group, 10, priority=10).body["lotId"]
    second = grant(service, user, group, 10, priority=20).body["lotId"]
    hold_id = hold(service, user, group, 8).body["holdId"]
    assert lots(service, user, group) == [(first, 2), (second, 10)]
    assert consume(service, user, group, 5).status == 200
    assert lots(service, user, group) == [(first, 0), (second, 7)]
    assert release(service, user, hold_id).body["balance"] == 15
    assert lots(service, user, group) == [(first, 8), (second, 7)]
    assert consume(service, user, group, 3).status == 200
    assert lots(service, user, group) == [(first, 5), (second, 7)]
    balanced(user)


def test_the_same_lots_when_the_stream_is_late_and_after_it_folds(service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    first = grant(service, user, group, 10, priority=10).body["lotId"]
    second = grant(service, user, group, 10, priority=20).body["lotId"]
    with service.stream_late():
        a = hold(service, user, group, 4).body["holdId"]
        consume(service, user, group, 3)
        b = hold(service, user, group, 5).body["holdId"]
        assert settle(service, user, a, 1).body["released"] == 3
        consume(service, user, group, 4)
        # a took 4 of the first lot, b 3 of it and 2 of the second; a gave 3 back to the first.
        assert lots(service, user, group) == [(first, 0), (second, 7)]
        assert release(service, user, b).body["balance"] == 12
        assert lots(service, user, group) == [(first, 3), (second, 9)]
    # A grant rewrites the group: the book stores what the holds did, the stamps go.
    third = grant(service, user, group, 1, priority=90).body["lotId"]
    assert lots(service, user, group) == [(first, 3), (second, 9), (third, 1)]
    balanced(user)


def test_tokens_whose_lot_expired_while_held_expire_on_release(service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    soon = datetime.now(UTC) + timedelta(minutes=30)
    short = grant(service, user, group, 10, priority=10, expiresAt=iso(soon)).body["lotId"]
    grant(service, user, group, 10, priority=20)
    hold_id = hold(service, user, group, 12, ttlSeconds=7200).body["holdId"]
    with time_machine.travel(soon + timedelta(minutes=1), tick=True):
        done = release(service, user, hold_id)
        assert done.status == 200, done.body
        assert done.body["released"] == 12 and done.body["balance"] == 10
        entries = ledger(user)
        assert (12, "release", hold_id) in entries and (-10, "expire", hold_id) in entries
        assert [lot for lot, _ in lots(service, user, group)] != [short]
        balanced(user)


def test_a_hold_past_its_expiry_is_released_when_its_group_is_next_touched(
        service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, group, 10)
    hold_id = hold(service, user, group, 6, ttlSeconds=60).body["holdId"]
    with time_machine.travel(datetime.now(UTC) + timedelta(minutes=2), tick=True):
        assert consume(service, user, group, 9).status == 200
        closed = settle(service, user, hold_id, 6)
        assert closed.status == 409 and closed.body["error"] == "hold_closed"
        assert release(service, user, hold_id).body["released"] == 6
        assert [reason for _, reason, _ in ledger(user)] == ["grant", "hold", "release", "consume"]
        balanced(user)


def test_many_holds_keep_the_balance_item_small_and_old_outcomes_still_answer(
        service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, group, 10_000)
    placed = []
    for number in range(40):
        hold_id = hold(service, user, group, 10).body["holdId"]
        assert settle(service, user, hold_id, number % 10).status == 200
        placed.append(hold_id)
    item = service.backend.client().get_item(
        TableName=service.backend.tables["AccountsTable"],
        Key={"userId": {"S": user}, "sk": {"S": f"GROUP#{group}"}}, ConsistentRead=True)["Item"]
    assert sum(1 for name in item if name.startswith("h_")) <= 16
    assert settle(service, user, placed[0], 0).body["released"] == 10
    assert settle(service, user, placed[0], 1).status == 409
    assert service.call("GET", f"/users/{user}/credits", iam=True).body["groups"][0]["balance"] == 10_000 - 180
    balanced(user)


def test_concurrent_settles_of_one_hold_settle_it_once(local_service: Any, ids: Any, balanced: Any) -> None:
    """On DynamoDB Local only: moto does not serialise concurrent conditional writes."""
    service = local_service
    user, group = ids("u"), ids("g")
    grant(service, user, group, 100)
    hold_id = hold(service, user, group, 50).body["holdId"]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda t: settle(service, user, hold_id, t), [10, 10, 20, 30]))
    ok = [reply for reply in replies if reply.status == 200]
    assert {reply.body["settled"] for reply in ok} in ({10}, {20}, {30}), [r.body for r in replies]
    assert all(reply.status in (200, 409) for reply in replies)
    settled = ok[0].body["settled"]
    assert service.call("GET", f"/users/{user}/credits", iam=True).body["groups"][0]["balance"] == 100 - settled
    assert [reason for _, reason, _ in ledger(user)] == ["grant", "hold", "release"]
    balanced(user)


def test_a_hold_counts_for_low_balance_like_a_consume(service: Any, ids: Any, events: Any) -> None:
    user, group = ids("u"), ids("g")
    service.setenv("LOW_BALANCE_THRESHOLDS", json.dumps({group: 50}))
    grant(service, user, group, 100)
    hold(service, user, group, 60)
    [low] = [e for e in events.of_type("CreditsLow") if e["userId"] == user]
    assert low["balance"] == 40 and low["offerGroup"] == group


def test_a_rewrite_that_read_before_a_settle_returning_nothing_reads_again(
        service: Any, ids: Any, balanced: Any, monkeypatch: Any) -> None:
    """Such a settle changes no seq; the rewrite's guard still sees it (the item's count of hold writes)."""
    import user_credits.logic.expiry as grants_logic  # a grant reads the group through expiry.read_touched

    user, group = ids("u"), ids("g")
    first = grant(service, user, group, 10, priority=10).body["lotId"]
    hold_id = hold(service, user, group, 4).body["holdId"]
    real_read = grants_logic.read_group
    raced: list[int] = []

    def read_then_settle(*args: Any) -> Any:
        state = real_read(*args)
        if not raced:
            raced.append(settle(service, user, hold_id, 4).status)
        return state

    monkeypatch.setattr(grants_logic, "read_group", read_then_settle)
    second = grant(service, user, group, 5, priority=20).body["lotId"]
    monkeypatch.setattr(grants_logic, "read_group", real_read)
    assert raced == [200]
    assert lots(service, user, group) == [(first, 6), (second, 5)]
    # The same call again answers with the first outcome (the balance then).
    assert settle(service, user, hold_id, 4).body["balance"] == 6
    balanced(user)
