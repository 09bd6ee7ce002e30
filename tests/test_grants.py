"""POST /admin/users/{userId}/grants: promotional and corrective credits, ledger reason `grant`, idempotent."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from seeding import seed_lot

from user_credits.domain.clock import to_iso
from user_credits.domain.lots import Book, NewLot
from user_credits.logic.grants import plan_grant
from user_credits.store.balances import GroupState, read_group
from user_credits.store.models import LedgerRecord


def iso(days: float) -> str:
    moment = (datetime.now(UTC) + timedelta(days=days)).replace(microsecond=0)
    return str(to_iso(moment))


def grant(service: Any, user: str, body: dict[str, Any], key: str | None = None) -> Any:
    headers = {"Idempotency-Key": key} if key else None
    return service.call("POST", f"/admin/users/{user}/grants", body, iam=True, headers=headers)


def entries(user: str) -> list[tuple[int, int, str]]:
    records = sorted(LedgerRecord.query(user, consistent_read=True), key=lambda r: int(r.seq))
    return [(int(r.delta), int(r.balanceAfter), r.reason) for r in records]


def test_grant_creates_a_group_with_a_grant_entry(service: Any, ids: Any, events: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    reply = grant(service, user, {"offerGroup": group, "tokens": 25, "reason": "welcome"})
    assert reply.status == 201
    lot_id = reply.body["lotId"]
    assert reply.body == {"userId": user, "offerGroup": group, "balance": 25, "expiresAt": None, "lotId": lot_id}
    assert entries(user) == [(25, 25, "grant")]
    [lot] = read_group(user, group).book.lots
    assert (lot.lot_id, lot.source, lot.granted, lot.expires_at, lot.priority) == (lot_id, "grant", 25, None, 50)
    granted = events.of_type("CreditsGranted")
    assert len(granted) == 1 and granted[0]["userId"] == user and granted[0]["balance"] == 25
    balanced(user)


def test_the_grant_reason_is_the_ledger_entry_note(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, {"offerGroup": group, "tokens": 25, "reason": "welcome"})
    grant(service, user, {"offerGroup": group, "tokens": -5})
    reply = service.call("GET", f"/users/{user}/ledger", iam=True)
    assert reply.status == 200, reply.body
    newest, oldest = reply.body["items"]
    assert (oldest["reason"], oldest["note"], oldest["seq"]) == ("grant", "welcome", 1)
    assert newest["seq"] == 2 and "note" not in newest


def test_grant_with_expiry_sets_it_on_a_new_group(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    expiry = iso(10)
    assert grant(service, user, {"offerGroup": group, "tokens": 5, "expiresAt": expiry}).body["expiresAt"] == expiry


def test_grant_never_shortens_a_group(service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    later, sooner = iso(30), iso(5)
    grant(service, user, {"offerGroup": group, "tokens": 5, "expiresAt": later})
    assert grant(service, user, {"offerGroup": group, "tokens": 5, "expiresAt": sooner}).body["expiresAt"] == later
    even_later = iso(60)
    reply = grant(service, user, {"offerGroup": group, "tokens": 5, "expiresAt": even_later})
    assert reply.body == {"userId": user, "offerGroup": group, "balance": 15, "expiresAt": even_later,
                          "lotId": reply.body["lotId"]}
    balanced(user)


def test_a_grant_without_expiry_is_a_lot_that_never_expires(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    expiry = iso(30)
    dated = grant(service, user, {"offerGroup": group, "tokens": 5, "expiresAt": expiry}).body["lotId"]
    # SPEC 1: a group with a lot that never expires never expires; the dated lot keeps its own date.
    undated = grant(service, user, {"offerGroup": group, "tokens": 5}).body
    assert undated["expiresAt"] is None
    lots = {lot.lot_id: lot.expires_at for lot in read_group(user, group).book.lots}
    assert lots == {dated: datetime.fromisoformat(expiry), undated["lotId"]: None}


def test_a_grant_with_a_lower_priority_is_spent_first(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, {"offerGroup": group, "tokens": 5, "expiresAt": iso(1)})
    promo = grant(service, user, {"offerGroup": group, "tokens": 5, "priority": 0}).body["lotId"]
    consumed = service.call("POST", f"/users/{user}/consume", {"offerGroup": group, "tokens": 3}, iam=True)
    assert consumed.status == 200
    lots = service.call("GET", f"/users/{user}/credits", iam=True).body["groups"][0]["lots"]
    # Spending order: the promotion (priority 0) first, although the other lot expires sooner.
    assert [(lot["lotId"] == promo, lot["remaining"], lot["priority"]) for lot in lots] == [
        (True, 2, 0), (False, 5, 50)]


def test_a_negative_grant_is_no_lot_and_cannot_set_a_priority(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, {"offerGroup": group, "tokens": 10})
    assert grant(service, user, {"offerGroup": group, "tokens": -1, "priority": 3}).status == 422
    reply = grant(service, user, {"offerGroup": group, "tokens": -4})
    assert reply.status == 201 and reply.body["lotId"] is None and reply.body["balance"] == 6
    assert [lot.remaining for lot in read_group(user, group).book.lots] == [6]


def test_a_group_that_never_expires_stays_so(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, {"offerGroup": group, "tokens": 5})
    assert grant(service, user, {"offerGroup": group, "tokens": 5, "expiresAt": iso(3)}).body["expiresAt"] is None


def test_grant_into_an_expired_group_expires_the_remainder_first(service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    past = datetime.now(UTC) - timedelta(hours=1)
    seed_lot(user, group, 8, expires_at=past, at=past - timedelta(days=1), reason="purchase", order_id="o1")
    expiry = iso(7)
    reply = grant(service, user, {"offerGroup": group, "tokens": 5, "expiresAt": expiry})
    assert reply.body == {"userId": user, "offerGroup": group, "balance": 5, "expiresAt": expiry,
                          "lotId": reply.body["lotId"]}
    assert entries(user) == [(8, 8, "purchase"), (-8, 0, "expire"), (5, 5, "grant")]
    balanced(user)


def test_a_negative_grant_corrects_but_never_below_zero(service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, {"offerGroup": group, "tokens": 10})
    assert grant(service, user, {"offerGroup": group, "tokens": -4}).body["balance"] == 6
    refused = grant(service, user, {"offerGroup": group, "tokens": -7})
    assert refused.status == 402 and refused.body["error"] == "insufficient_credits" and refused.body["balance"] == 6
    assert grant(service, user, {"offerGroup": group, "tokens": -6}).body["balance"] == 0
    assert entries(user) == [(10, 10, "grant"), (-4, 6, "grant"), (-6, 0, "grant")]
    balanced(user)


def test_a_negative_grant_cannot_set_an_expiry(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, {"offerGroup": group, "tokens": 10})
    reply = grant(service, user, {"offerGroup": group, "tokens": -1, "expiresAt": iso(3)})
    assert reply.status == 422 and reply.body["error"] == "validation_error"
    assert read_group(user, group).balance == 10


def test_a_grant_that_has_already_expired_is_refused(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    reply = grant(service, user, {"offerGroup": group, "tokens": 1, "expiresAt": iso(-1)})
    assert reply.status == 422 and not read_group(user, group).exists


BAD_GRANTS: list[tuple[str, Any]] = [
    ("missing tokens", {"offerGroup": "g"}),
    ("missing group", {"tokens": 1}),
    ("zero tokens", {"offerGroup": "g", "tokens": 0}),
    ("fractional tokens", {"offerGroup": "g", "tokens": 1.5}),
    ("boolean tokens", {"offerGroup": "g", "tokens": True}),
    ("string tokens", {"offerGroup": "g", "tokens": "5"}),
    ("huge tokens", {"offerGroup": "g", "tokens": 10**15 + 1}),
    ("empty group", {"offerGroup": "", "tokens": 1}),
    ("naive expiry", {"offerGroup": "g", "tokens": 1, "expiresAt": "2099-01-01T00:00:00"}),
    ("garbage expiry", {"offerGroup": "g", "tokens": 1, "expiresAt": "soon"}),
    ("numeric expiry", {"offerGroup": "g", "tokens": 1, "expiresAt": 4102444800}),
    ("empty reason", {"offerGroup": "g", "tokens": 1, "reason": ""}),
    ("unknown field", {"offerGroup": "g", "tokens": 1, "note": "x"}),
    ("array body", [{"offerGroup": "g", "tokens": 1}]),
]


@pytest.mark.parametrize("body", [b for _, b in BAD_GRANTS], ids=[n for n, _ in BAD_GRANTS])
def test_bad_grant_is_refused_and_writes_nothing(fresh_service: Any, ids: Any, body: Any) -> None:
    reply = fresh_service.call("POST", f"/admin/users/{ids('u')}/grants", raw_body=json.dumps(body), iam=True,
                               headers={"Idempotency-Key": "k"})
    assert reply.status in (400, 422), reply.body
    assert reply.body["error"] == "validation_error"
    assert all(fresh_service.item_count(table) == 0 for table in fresh_service.backend.tables)


def test_grant_without_iam_is_forbidden(fresh_service: Any, ids: Any) -> None:
    reply = fresh_service.call("POST", f"/admin/users/{ids('u')}/grants", {"offerGroup": "g", "tokens": 1},
                               user="someone")
    assert reply.status == 403 and reply.body["error"] == "forbidden"
    assert all(fresh_service.item_count(table) == 0 for table in fresh_service.backend.tables)


def test_same_key_replays_the_grant_once(service: Any, ids: Any, events: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    body = {"offerGroup": group, "tokens": 10}
    first = grant(service, user, body, key="g-1")
    again = grant(service, user, body, key="g-1")
    assert first.status == again.status == 201 and again.body == first.body
    assert read_group(user, group).balance == 10 and len(entries(user)) == 1
    assert len(events.of_type("CreditsGranted")) == 1
    reused = grant(service, user, {**body, "tokens": 11}, key="g-1")
    assert reused.status == 422 and reused.body["error"] == "idempotency_key_reused"
    balanced(user)


def test_grant_keys_do_not_collide_with_consume_keys(service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    assert grant(service, user, {"offerGroup": group, "tokens": 10}, key="same").status == 201
    consumed = service.call("POST", f"/users/{user}/consume", {"offerGroup": group, "tokens": 2}, iam=True,
                            headers={"Idempotency-Key": "same"})
    assert consumed.status == 200 and consumed.body["balance"] == 8
    balanced(user)


# Keyed grant: record lookup, consistent read of the group, the transaction (change + ledger + record).
KEYED_GRANT_CALLS = 3


def test_a_keyed_grant_makes_the_calls_the_fault_tests_cover(local_service: Any, crash: Any, ids: Any) -> None:
    crash.count_calls()
    assert grant(local_service, ids("u"), {"offerGroup": ids("g"), "tokens": 5}, key="k").status == 201
    assert crash.calls == KEYED_GRANT_CALLS


@pytest.mark.parametrize("phase", ["before", "after"])
@pytest.mark.parametrize("at_call", range(1, KEYED_GRANT_CALLS + 1))
def test_retry_after_a_crash_at_any_call_grants_exactly_once(
    local_service: Any, crash: Any, ids: Any, balanced: Any, phase: str, at_call: int
) -> None:
    user, group = ids("u"), ids("g")
    body = {"offerGroup": group, "tokens": 7}
    crash.arm(phase, at_call)
    crash.expect_crash(lambda: grant(local_service, user, body, key="retry-me"))
    crash.disarm()
    reply = grant(local_service, user, body, key="retry-me")
    assert reply.status == 201
    assert reply.body == {"userId": user, "offerGroup": group, "balance": 7, "expiresAt": None,
                          "lotId": reply.body["lotId"]}
    assert [lot.lot_id for lot in read_group(user, group).book.lots] == [reply.body["lotId"]]
    assert grant(local_service, user, body, key="retry-me").body == reply.body
    assert entries(user) == [(7, 7, "grant")]
    balanced(user)


NOW = datetime(2026, 1, 1, tzinfo=UTC)
LATER = st.none() | st.integers(1, 10**8).map(lambda seconds: NOW + timedelta(seconds=seconds))


def group_of(balance: int, expires_at: datetime | None) -> GroupState:
    """A group holding `balance` in one lot expiring at `expires_at` (a negative balance: spent into debt)."""
    book, _ = Book("g").credit(NewLot("old", "grant", max(balance, 0), NOW - timedelta(days=1), expires_at), "grant")
    book = book.burn(-min(balance, 0))
    return GroupState("u", "g", book, balance, seq=3, exists=True)


@given(old=LATER, new=LATER, tokens=st.integers(1, 10**15), balance=st.integers(-10**6, 10**6))
def test_a_positive_grant_never_shortens_a_live_group(
    old: datetime | None, new: datetime | None, tokens: int, balance: int
) -> None:
    before = group_of(balance, old)
    plan = plan_grant(before, tokens, new, None, NOW)
    expiry = plan.book.expires_at
    if old is None or new is None:
        assert expiry is None
    else:
        assert expiry is not None and expiry >= old and expiry >= new
    assert [(m.delta, m.reason, m.lot_id) for m in plan.movements] == [(tokens, "grant", plan.lot_id)]
    assert plan.book.total == balance + tokens


@given(old=LATER, tokens=st.integers(-10**6, -1), balance=st.integers(-10, 10**6))
def test_a_negative_grant_never_goes_below_zero_nor_moves_the_expiry(
    old: datetime | None, tokens: int, balance: int
) -> None:
    before = group_of(balance, old)
    try:
        plan = plan_grant(before, tokens, None, None, NOW)
    except Exception as refusal:
        assert getattr(refusal, "code", None) == "insufficient_credits" and balance + tokens < 0
        return
    assert balance + tokens >= 0 and plan.book.expires_at == before.book.expires_at and plan.lot_id is None
    assert [m.delta for m in plan.movements] == [tokens] and plan.book.total == balance + tokens
