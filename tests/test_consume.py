"""SPEC 2.5, 2.7 and 2.8 for POST /users/{userId}/consume, through the handler, on moto and DynamoDB Local."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from seeding import seed_lot

from user_credits.store.balances import read_group
from user_credits.store.models import LedgerRecord


def grant(service: Any, user: str, group: str, tokens: int, **extra: Any) -> Any:
    reply = service.call("POST", f"/admin/users/{user}/grants", {"offerGroup": group, "tokens": tokens, **extra},
                         iam=True)
    assert reply.status == 201, reply.body
    return reply


def consume(service: Any, user: str, group: str, tokens: Any, key: str | None = None, **extra: Any) -> Any:
    headers = {"Idempotency-Key": key} if key else None
    return service.call("POST", f"/users/{user}/consume", {"offerGroup": group, "tokens": tokens, **extra},
                        iam=True, headers=headers)


def ledger(user: str) -> list[LedgerRecord]:
    return sorted(LedgerRecord.query(user, consistent_read=True), key=lambda r: (r.offerGroup, int(r.seq)))


def expired_group(user: str, group: str, balance: int) -> None:
    """A group whose only lot expired a minute ago, which the sweep has not reached yet."""
    past = datetime.now(UTC) - timedelta(minutes=1)
    seed_lot(user, group, balance, expires_at=past, at=past - timedelta(days=1))


def test_consume_spends_tokens_and_writes_one_ledger_entry(service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, group, 10)
    reply = consume(service, user, group, 3)
    assert reply.status == 200
    assert reply.body == {"userId": user, "offerGroup": group, "consumed": 3, "balance": 7, "expiresAt": None}
    entries = [(int(r.delta), int(r.balanceAfter), r.reason) for r in ledger(user)]
    assert entries == [(10, 10, "grant"), (-3, 7, "consume")]
    balanced(user)


def test_consume_reports_the_group_expiry(service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    expiry = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    grant(service, user, group, 10, expiresAt=expiry.isoformat().replace("+00:00", "Z"))
    reply = consume(service, user, group, 1)
    assert reply.status == 200 and reply.body["expiresAt"] == expiry.isoformat().replace("+00:00", "Z")
    balanced(user)


def test_a_missing_group_has_balance_zero_and_refusal_creates_nothing(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    reply = consume(service, user, group, 1)
    assert reply.status == 402
    assert reply.body["error"] == "insufficient_credits" and reply.body["balance"] == 0
    assert not read_group(user, group).exists
    assert ledger(user) == []


def test_refusal_changes_nothing_and_writes_no_ledger_entry(service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, group, 5)
    before = read_group(user, group)
    reply = consume(service, user, group, 6)
    assert reply.status == 402 and reply.body["error"] == "insufficient_credits" and reply.body["balance"] == 5
    assert read_group(user, group) == before
    assert len(ledger(user)) == 1
    balanced(user)


def test_exact_balance_can_be_consumed_to_zero(service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, group, 4)
    assert consume(service, user, group, 4).body["balance"] == 0
    assert consume(service, user, group, 1).status == 402
    balanced(user)


def test_tokens_of_an_expired_group_are_never_spendable(
    service: Any, ids: Any, events: Any, balanced: Any,
) -> None:
    user, group = ids("u"), ids("g")
    expired_group(user, group, 10)
    # SPEC 2.5: only live lots count, so the balance is 0 before the sweep has run.
    reply = consume(service, user, group, 1)
    assert reply.status == 402
    assert reply.body["error"] == "credits_expired" and reply.body["balance"] == 0
    # The refusal wrote nothing: the lot leaves with its own entry when the sweep reaches it.
    assert read_group(user, group).balance == 10 and len(ledger(user)) == 1
    # An overdraft may still run into debt: the expired tokens leave first, they are never spent.
    reply = consume(service, user, group, 1, maxOverdraft=100)
    assert reply.status == 200 and reply.body["balance"] == -1
    assert [(int(r.delta), int(r.balanceAfter), r.reason, r.lotId is not None) for r in ledger(user)] == [
        (10, 10, "grant", True), (-10, 0, "expire", True), (-1, -1, "consume", False)]
    assert [e["expiredTokens"] for e in events.of_type("CreditsExpired")] == [10]
    balanced(user)


def test_overdraft_allows_a_bounded_negative_balance(service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, group, 5)
    assert consume(service, user, group, 8, maxOverdraft=3).body["balance"] == -3
    refused = consume(service, user, group, 1, maxOverdraft=3)
    assert refused.status == 402 and refused.body == {
        "error": "insufficient_credits", "message": refused.body["message"], "balance": -3}
    assert consume(service, user, group, 1, maxOverdraft=4).body["balance"] == -4
    assert consume(service, user, group, 1).status == 402
    balanced(user)


def test_overdraft_applies_to_a_group_that_does_not_exist(service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    assert consume(service, user, group, 3, maxOverdraft=2).status == 402
    assert not read_group(user, group).exists
    reply = consume(service, user, group, 2, maxOverdraft=2)
    assert reply.status == 200 and reply.body["balance"] == -2
    assert [(int(r.delta), int(r.balanceAfter)) for r in ledger(user)] == [(-2, -2)]
    balanced(user)


BAD_BODIES: list[tuple[str, Any]] = [
    ("missing tokens", {"offerGroup": "g"}),
    ("missing group", {"tokens": 1}),
    ("zero tokens", {"offerGroup": "g", "tokens": 0}),
    ("negative tokens", {"offerGroup": "g", "tokens": -1}),
    ("fractional tokens", {"offerGroup": "g", "tokens": 1.5}),
    ("float integral tokens", {"offerGroup": "g", "tokens": 2.0}),
    ("boolean tokens", {"offerGroup": "g", "tokens": True}),
    ("string tokens", {"offerGroup": "g", "tokens": "1"}),
    ("null tokens", {"offerGroup": "g", "tokens": None}),
    ("huge tokens", {"offerGroup": "g", "tokens": 10**15 + 1}),
    ("enormous tokens", {"offerGroup": "g", "tokens": 10**40}),
    ("empty group", {"offerGroup": "", "tokens": 1}),
    ("group with a space", {"offerGroup": "a b", "tokens": 1}),
    ("group too long", {"offerGroup": "g" * 129, "tokens": 1}),
    ("group not a string", {"offerGroup": 7, "tokens": 1}),
    ("negative overdraft", {"offerGroup": "g", "tokens": 1, "maxOverdraft": -1}),
    ("fractional overdraft", {"offerGroup": "g", "tokens": 1, "maxOverdraft": 0.5}),
    ("string overdraft", {"offerGroup": "g", "tokens": 1, "maxOverdraft": "2"}),
    ("huge overdraft", {"offerGroup": "g", "tokens": 1, "maxOverdraft": 10**15 + 1}),
    ("unknown field", {"offerGroup": "g", "tokens": 1, "token": 1}),
    ("array body", [{"offerGroup": "g", "tokens": 1}]),
    ("string body", "consume"),
    ("null body", None),
]


@pytest.mark.parametrize("body", [b for _, b in BAD_BODIES], ids=[n for n, _ in BAD_BODIES])
def test_bad_body_is_refused_and_writes_nothing(fresh_service: Any, ids: Any, body: Any) -> None:
    user = ids("u")
    reply = fresh_service.call("POST", f"/users/{user}/consume", raw_body=json.dumps(body), iam=True,
                               headers={"Idempotency-Key": "k-bad"})
    assert reply.status in (400, 422), reply.body
    assert reply.body["error"] == "validation_error" and reply.body["message"]
    assert all(fresh_service.item_count(table) == 0 for table in fresh_service.backend.tables)


@pytest.mark.parametrize("raw", ["{", "", "{\"offerGroup\": \"g\", \"tokens\": 1,}", "tokens=1", "\x00"])
def test_malformed_json_is_refused_and_writes_nothing(fresh_service: Any, ids: Any, raw: str) -> None:
    reply = fresh_service.call("POST", f"/users/{ids('u')}/consume", raw_body=raw, iam=True)
    assert reply.status in (400, 422) and reply.body["error"] == "validation_error"
    assert all(fresh_service.item_count(table) == 0 for table in fresh_service.backend.tables)


@pytest.mark.parametrize("user", ["has space", "x" * 129, "semi;colon"])
def test_bad_user_id_in_the_path_is_refused(fresh_service: Any, user: str) -> None:
    reply = fresh_service.call("POST", f"/users/{user}/consume", {"offerGroup": "g", "tokens": 1}, iam=True)
    assert reply.status == 422 and reply.body["error"] == "validation_error"
    assert all(fresh_service.item_count(table) == 0 for table in fresh_service.backend.tables)


def test_bad_idempotency_key_is_refused_and_writes_nothing(fresh_service: Any, ids: Any) -> None:
    reply = fresh_service.call("POST", f"/users/{ids('u')}/consume", {"offerGroup": "g", "tokens": 1}, iam=True,
                               headers={"Idempotency-Key": "not a key"})
    assert reply.status == 422 and reply.body["error"] == "validation_error"
    assert all(fresh_service.item_count(table) == 0 for table in fresh_service.backend.tables)


def test_consume_without_iam_is_forbidden_and_writes_nothing(fresh_service: Any, ids: Any) -> None:
    reply = fresh_service.call("POST", f"/users/{ids('u')}/consume", {"offerGroup": "g", "tokens": 1},
                               user="someone")
    assert reply.status == 403 and reply.body["error"] == "forbidden"
    assert all(fresh_service.item_count(table) == 0 for table in fresh_service.backend.tables)


def test_same_key_and_body_replays_the_first_response_without_a_second_debit(
    service: Any, ids: Any, balanced: Any
) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, group, 10)
    first = consume(service, user, group, 3, key="k-1")
    again = consume(service, user, group, 3, key="k-1")
    assert first.status == again.status == 200
    assert again.body == first.body == {"userId": user, "offerGroup": group, "consumed": 3, "balance": 7,
                                        "expiresAt": None}
    # Same JSON, other key order and spacing: the same request.
    reordered = service.call("POST", f"/users/{user}/consume", raw_body=f'{{ "tokens":3,"offerGroup":"{group}" }}',
                             iam=True, headers={"Idempotency-Key": "k-1"})
    assert reordered.status == 200 and reordered.body == first.body
    assert read_group(user, group).balance == 7
    assert [r.idempotencyKey for r in ledger(user) if r.reason == "consume"] == ["k-1"]
    balanced(user)


def test_a_replay_still_answers_after_later_consumes(service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, group, 10)
    first = consume(service, user, group, 3, key="k-1")
    consume(service, user, group, 5)
    assert consume(service, user, group, 3, key="k-1").body == first.body
    assert read_group(user, group).balance == 2
    balanced(user)


def test_same_key_with_another_body_is_refused(service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, group, 10)
    assert consume(service, user, group, 3, key="k-1").status == 200
    for other in ({"tokens": 4}, {"maxOverdraft": 1}, {"offerGroup": ids("g")}):
        body = {"offerGroup": group, "tokens": 3, **other}
        reply = service.call("POST", f"/users/{user}/consume", body, iam=True, headers={"Idempotency-Key": "k-1"})
        assert reply.status == 422 and reply.body["error"] == "idempotency_key_reused"
    assert read_group(user, group).balance == 7
    balanced(user)


def test_keys_are_scoped_per_user(service: Any, ids: Any, balanced: Any) -> None:
    alice, bob, group = ids("u"), ids("u"), ids("g")
    grant(service, alice, group, 10)
    grant(service, bob, group, 10)
    assert consume(service, alice, group, 3, key="shared").body["balance"] == 7
    assert consume(service, bob, group, 4, key="shared").body["balance"] == 6
    balanced(alice, bob)


def test_a_refusal_with_a_key_is_not_stored_so_a_retry_after_a_top_up_succeeds(
    service: Any, ids: Any, balanced: Any
) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, group, 2)
    refused = consume(service, user, group, 5, key="k-1")
    assert refused.status == 402 and refused.body["balance"] == 2
    grant(service, user, group, 10)
    reply = consume(service, user, group, 5, key="k-1")
    assert reply.status == 200 and reply.body["balance"] == 7
    assert consume(service, user, group, 5, key="k-1").body == reply.body
    balanced(user)


def test_credits_low_is_sent_once_per_downward_crossing(service: Any, ids: Any, events: Any, balanced: Any) -> None:
    user, group, other = ids("u"), ids("g"), ids("g")
    service.setenv("LOW_BALANCE_THRESHOLDS", json.dumps({group: 5}))
    grant(service, user, group, 10)
    grant(service, user, other, 10)
    assert consume(service, user, group, 3).body["balance"] == 7
    assert events.of_type("CreditsLow") == []
    assert consume(service, user, group, 3, key="cross").body["balance"] == 4
    assert consume(service, user, group, 1).body["balance"] == 3
    # A replay of the crossing request changes nothing, so it announces nothing.
    consume(service, user, group, 3, key="cross")
    # A group without a threshold never warns.
    consume(service, user, other, 9)
    low = events.of_type("CreditsLow")
    assert len(low) == 1
    assert low[0]["userId"] == user and low[0]["offerGroup"] == group and low[0]["balance"] == 4
    assert "expiresAt" in low[0]
    # Back above the threshold, a second crossing is a new event.
    grant(service, user, group, 10)
    assert consume(service, user, group, 9).body["balance"] == 4
    assert len(events.of_type("CreditsLow")) == 2
    balanced(user)


def test_landing_exactly_on_the_threshold_is_not_low(service: Any, ids: Any, events: Any) -> None:
    user, group = ids("u"), ids("g")
    service.setenv("LOW_BALANCE_THRESHOLDS", json.dumps({group: 5}))
    grant(service, user, group, 10)
    consume(service, user, group, 5)
    assert events.of_type("CreditsLow") == []
    consume(service, user, group, 1)
    assert len(events.of_type("CreditsLow")) == 1


def emitted_metrics(capsys: pytest.CaptureFixture[str]) -> set[str]:
    """Metric names in the EMF lines Powertools printed when the handler returned."""
    names: set[str] = set()
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("{") and '"_aws"' in line:
            for directive in json.loads(line)["_aws"]["CloudWatchMetrics"]:
                names |= {metric["Name"] for metric in directive["Metrics"]}
    return names


def test_a_low_balance_event_that_cannot_be_sent_is_sent_when_the_stream_delivers_again(
    service: Any, ids: Any, events: Any, balanced: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    user, group = ids("u"), ids("g")
    service.setenv("LOW_BALANCE_THRESHOLDS", json.dumps({group: 5}))
    grant(service, user, group, 10)
    events.fail_next = 2
    capsys.readouterr()
    reply = consume(service, user, group, 8)
    # The consume is answered whatever EventBridge does; the stream record failed twice, then went
    # through: one event (the failed sends recorded nothing), one ledger entry, under one eventId.
    assert reply.status == 200 and reply.body["balance"] == 2
    [low] = events.of_type("CreditsLow")
    assert (low["balance"], low["threshold"]) == (2, 5)
    assert "EventsFailed" in emitted_metrics(capsys)
    assert [(int(r.delta), int(r.balanceAfter)) for r in ledger(user)] == [(10, 10), (-8, 2)]
    balanced(user)


