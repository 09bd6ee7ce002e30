"""SPEC 2.8 and 2.9 when the function dies: holds placed, settled and released with a crash before or
after any of their DynamoDB calls, then the call repeated as a caller would repeat it (issue 12).

- A keyed hold retried with its Idempotency-Key holds once, and answers the hold the first attempt
  placed (or would have placed: a keyed hold's id comes from its key and body), whether the stream has
  delivered the first attempt's write by the time of the retry or not; a 503 means "retry later", and
  once the first attempt's claim is older than HOLD_SECONDS the retry decides (time travel).
- An unkeyed hold either happened or not; either way the balance and the ledger agree, and a hold
  nobody knows the id of is released once due, when its group is next touched.
- A settle or release repeated answers 200 with the first outcome and changes the balance once, on the
  one-write path and on the rewrite path (a lot the hold took from expired meanwhile; a hold past its
  expiry, released by the touch).
- The stream function killed at each of its calls while it handles a hold's or a close's record is
  delivered again: every ledger entry once, the keyed hold's record completed with its 201 answer.

The crash (conftest `crash`) is raised from a botocore event hook on the clients pynamodb builds, on
DynamoDB Local: `before-call` (the call never reached DynamoDB) or `after-call` (DynamoDB applied it,
the function never saw the answer). The stream function also dies by its invocation ending (`Ended`,
which no handler catches), where an error would be caught. Each path's calls are listed once (the
tuples below) and checked by the first test, so the crash points cannot silently fall behind the code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine
from conftest import IN_STREAM, Service, dynamodb_hooks

from user_credits.domain.clock import to_iso
from user_credits.store import holds as hold_store
from user_credits.store.balances import PREPARED, read_group
from user_credits.store.consumption import HOLD_SECONDS, MARKER_BALANCE
from user_credits.store.due import due_sort
from user_credits.store.models import IdempotencyRecord, LedgerRecord, book_sk, group_sk

# The request's calls, per path.
KEYED_HOLD = ("PutItem", "UpdateItem")  # the key's claim; the debit that places the hold, with the marker
# The same, when an open hold of the group expires later than this one (the item's holdDue): the first
# debit is refused, the second lowers holdDue.
KEYED_HOLD_LOWERING = ("PutItem", "UpdateItem", "UpdateItem")
# The same on a group with a hold past its expiry: the debit is refused, the group is read (the refusal
# is decided on it) and rewritten (the due hold released), then the debit goes through.
KEYED_HOLD_TOUCHING = ("PutItem", "UpdateItem", "BatchGetItem", "BatchGetItem", "TransactWriteItems", "UpdateItem")
# A keyed hold refused (402): its claim is deleted, so a retry after a top-up decides afresh.
KEYED_REFUSAL = ("PutItem", "UpdateItem", "DeleteItem")
UNKEYED_HOLD = ("UpdateItem",)
# A retry that finds the claim unfinished and older than HOLD_SECONDS, with no marker: the refused claim,
# the transaction that debits, the read of the marker (the answer). With the marker there (the first
# attempt's debit landed), the transaction is refused and its old item answers.
RECOVERY = ("PutItem", "TransactWriteItems", "GetItem")
RECOVERY_MARKED = ("PutItem", "TransactWriteItems")
CLOSE = ("UpdateItem",)
# The one write is refused (a lot the hold took from has expired, or the hold is due): the group is
# read and rewritten.
REWRITE = ("UpdateItem", "BatchGetItem", "TransactWriteItems")
# A hold refused at the gate of 16 holds waiting for the book (15 placed and settled since the last
# rewrite, one placed): the refusal, the group read (the refusal is decided on it) and read again by the fold, the
# closed holds' outcomes archived, the new book prepared on the book item, the balance item swung to it,
# the book promoted; then the debit. No transaction: on AWS one would make the item's other writes fail.
FOLDING_HOLD = ("UpdateItem", "BatchGetItem", "BatchGetItem", "BatchWriteItem", "UpdateItem", "UpdateItem",
                "UpdateItem", "UpdateItem")
# The stream function's calls for a keyed hold's record: its ledger entry, the key's record completed,
# the marker removed, the sweep's index brought forward to the hold's expiry.
STREAM_OF_A_KEYED_HOLD = ("PutItem", "UpdateItem", "UpdateItem", "UpdateItem")
# For a close's record: its one ledger entry; for a rewrite's, its entries in one batch.
STREAM_OF_A_CLOSE = ("PutItem",)
STREAM_OF_A_REWRITE = ("BatchWriteItem",)

KEY = "model-call-1"


# ----------------------------------------------------------------------------- calls

def grant(service: Service, user: str, group: str, tokens: int, **extra: Any) -> str:
    reply = service.call("POST", f"/admin/users/{user}/grants", {"offerGroup": group, "tokens": tokens, **extra},
                         iam=True)
    assert reply.status == 201, reply.body
    return str(reply.body["lotId"])


def hold(service: Service, user: str, group: str, tokens: int, key: str | None = None, **extra: Any) -> Any:
    headers = {"Idempotency-Key": key} if key else None
    return service.call("POST", f"/users/{user}/holds", {"offerGroup": group, "tokens": tokens, **extra},
                        iam=True, headers=headers)


def placed(service: Service, user: str, group: str, tokens: int, **extra: Any) -> str:
    reply = hold(service, user, group, tokens, **extra)
    assert reply.status == 201, reply.body
    return str(reply.body["holdId"])


def close(service: Service, user: str, hold_id: str, settle: int | None) -> Any:
    """A settle of `settle` tokens, or with None a release."""
    if settle is None:
        return service.call("POST", f"/users/{user}/holds/{hold_id}/release", {}, iam=True)
    return service.call("POST", f"/users/{user}/holds/{hold_id}/settle", {"tokens": settle}, iam=True)


def settled() -> Any:
    """The time a caller's retries reach once the first attempt can no longer land its debit."""
    return time_machine.travel(datetime.now(UTC) + timedelta(seconds=HOLD_SECONDS + 1), tick=True)


def as_a_caller(call: Callable[[], Any]) -> tuple[Any, list[int]]:
    """A 503 means "retry shortly" (Retry-After): the caller does, later. The answer, and every status seen."""
    reply = call()
    statuses = [reply.status]
    if reply.status == 503:
        with settled():
            reply = call()
        statuses.append(reply.status)
    return reply, statuses


# ----------------------------------------------------------------------------- what is stored

def ledger(user: str) -> list[tuple[int, str, str | None]]:
    records = sorted(LedgerRecord.query(user, consistent_read=True), key=lambda r: (r.offerGroup, int(r.seq)))
    return [(int(r.delta), r.reason, r.holdId) for r in records]


def balance_item(service: Service, user: str, group: str) -> dict[str, Any]:
    item: dict[str, Any] = service.backend.client().get_item(
        TableName=service.backend.tables["AccountsTable"], ConsistentRead=True,
        Key={"userId": {"S": user}, "sk": {"S": group_sk(group)}}).get("Item", {})
    return item


def holds_on_item(service: Service, user: str, group: str) -> dict[str, hold_store.ItemHold]:
    return {h.ref.hold_id: h for h in hold_store.holds_on(balance_item(service, user, group))}


def key_record(user: str, key: str) -> IdempotencyRecord:
    return IdempotencyRecord.get(f"{hold_store.HOLD_ROUTE}#{user}#{key}", consistent_read=True)


def markers(service: Service, user: str, group: str) -> list[str]:
    return [name for name in balance_item(service, user, group) if name.startswith(MARKER_BALANCE)]


def receipt(user: str, group: str, held: hold_store.ItemHold, balance: int) -> dict[str, Any]:
    """A hold's 201 body, for the hold as the balance item shows it."""
    return {"holdId": held.ref.hold_id, "userId": user, "offerGroup": group, "tokens": held.ref.tokens,
            "balance": balance, "expiresAt": to_iso(held.expires_at)}


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


# ----------------------------------------------------------------------------- closes, case by case

# name: (tokens settled or None for a release, the answer without holdId, the ledger entries after the
# grants, the balance after, the request's calls, the stream function's calls for the close's record).
CLOSES: dict[str, tuple[int | None, dict[str, Any], list[tuple[int, str]], int, tuple[str, ...], tuple[str, ...]]] = {
    "settle-below": (2, {"settled": 2, "released": 4, "balance": 8, "status": "settled"},
                     [(-6, "hold"), (4, "release")], 8, CLOSE, STREAM_OF_A_CLOSE),
    "settle-above": (9, {"settled": 9, "released": 0, "balance": 1, "status": "settled"},
                     [(-6, "hold"), (-3, "consume")], 1, CLOSE, STREAM_OF_A_CLOSE),
    # Nothing moves: no entry, but the outcome is kept all the same.
    "settle-exact": (6, {"settled": 6, "released": 0, "balance": 4, "status": "settled"},
                     [(-6, "hold")], 4, CLOSE, ()),
    "release": (None, {"settled": 0, "released": 6, "balance": 10, "status": "released"},
                [(-6, "hold"), (6, "release")], 10, CLOSE, STREAM_OF_A_CLOSE),
    # The hold took 10 from a lot that has expired since, and 2 from another: 5 kept, 7 returned, and
    # the 5 of those that go back to the expired lot expire.
    "settle-expired-lot": (5, {"settled": 5, "released": 7, "balance": 10, "status": "settled"},
                           [(-12, "hold"), (7, "release"), (-5, "expire")], 10, REWRITE, STREAM_OF_A_REWRITE),
    # A hold past its expiry: the touch releases it, before the call, and the release replays that.
    "release-due": (None, {"settled": 0, "released": 6, "balance": 10, "status": "released"},
                    [(-6, "hold"), (6, "release")], 10, REWRITE, STREAM_OF_A_CLOSE),
}


def open_case(service: Service, user: str, group: str, case: str) -> tuple[str, list[int], datetime | None]:
    """The case's group and hold: the hold's id, the grants' tokens, and the time to close it at."""
    now = datetime.now(UTC)
    if case == "settle-expired-lot":
        soon = now + timedelta(minutes=30)
        grant(service, user, group, 10, priority=10, expiresAt=iso(soon))
        grant(service, user, group, 10, priority=20)
        return placed(service, user, group, 12, ttlSeconds=7200), [10, 10], soon + timedelta(minutes=1)
    grant(service, user, group, 10)
    if case == "release-due":
        return placed(service, user, group, 6, ttlSeconds=60), [10], now + timedelta(minutes=2)
    return placed(service, user, group, 6), [10], None


def at(moment: datetime | None) -> Any:
    return time_machine.travel(moment, tick=True) if moment is not None else contextlib.nullcontext()


def expected_ledger(case: str, grants: list[int], hold_id: str) -> list[tuple[int, str, str | None]]:
    return [*((tokens, "grant", None) for tokens in grants),
            *((delta, reason, hold_id) for delta, reason in CLOSES[case][2])]


def close_as_a_caller(service: Service, user: str, hold_id: str, settle: int | None) -> Any:
    """The caller repeats the call until it is not a 503 (a conflict is retried, never a new decision)."""
    for _ in range(3):
        reply = close(service, user, hold_id, settle)
        if reply.status != 503:
            return reply
    return reply


# ----------------------------------------------------------------------------- the calls the crashes cover

class Recorder:
    """The DynamoDB operations made since the last `take`: the request's, and the stream function's."""

    def __init__(self) -> None:
        self.calls: dict[str, list[str]] = {"request": [], "stream": []}

    def record(self, model: Any, **_: Any) -> None:
        self.calls["stream" if getattr(IN_STREAM, "active", False) else "request"].append(model.name)

    def take(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        taken = (tuple(self.calls["request"]), tuple(self.calls["stream"]))
        self.calls = {"request": [], "stream": []}
        return taken


def test_the_hold_paths_make_the_calls_the_fault_tests_cover(local_service: Service, crash: Any, ids: Any) -> None:
    service = local_service
    user, group, other, third = ids("u"), ids("g"), ids("g"), ids("g")
    grant(service, user, group, 100)
    grant(service, user, other, 10)
    grant(service, user, third, 10)
    cases = {case: (ids("u"), ids("g")) for case in CLOSES}
    opened = {case: open_case(service, case_user, case_group, case) for case, (case_user, case_group) in cases.items()}
    calls = Recorder()
    with dynamodb_hooks(service, {"before-call.dynamodb": calls.record}):
        assert hold(service, user, group, 4, key="probe").status == 201
        assert calls.take() == (KEYED_HOLD, STREAM_OF_A_KEYED_HOLD)
        assert hold(service, user, group, 4).status == 201
        assert calls.take()[0] == UNKEYED_HOLD
        # A keyed hold that expires before the open ones (holdDue is theirs): it lowers holdDue.
        assert hold(service, user, group, 4, key="short", ttlSeconds=30).status == 201
        assert calls.take()[0] == KEYED_HOLD_LOWERING
        assert hold(service, user, group, 1000, key="too-much").status == 402
        assert calls.take()[0] == KEYED_REFUSAL
        with time_machine.travel(datetime.now(UTC) + timedelta(minutes=1), tick=True):
            assert hold(service, user, group, 4, key="touching").status == 201
            assert calls.take()[0] == KEYED_HOLD_TOUCHING
        # The first attempt died after its claim; the retry, once the claim has settled.
        with service.stream_late():
            crash.arm("after", 1)
            crash.expect_crash(lambda: hold(service, user, other, 4, key="recover"))
            crash.disarm()
            with settled():
                calls.take()
                assert hold(service, user, other, 4, key="recover").status == 201
                assert calls.take()[0] == RECOVERY
            crash.arm("after", 2)
            crash.expect_crash(lambda: hold(service, user, third, 4, key="marked"))
            crash.disarm()
            with settled():
                calls.take()
                assert hold(service, user, third, 4, key="marked").status == 201
                assert calls.take()[0] == RECOVERY_MARKED
        folding_user, folding_group = ids("u"), ids("g")
        grant(service, folding_user, folding_group, 100)
        fill_the_gate(service, folding_user, folding_group)
        calls.take()
        assert hold(service, folding_user, folding_group, 4).status == 201
        assert calls.take()[0] == FOLDING_HOLD
        for case, (settle, _, _, _, request, stream) in CLOSES.items():
            hold_id, _, when = opened[case]
            with at(when):
                calls.take()
                assert close(service, cases[case][0], hold_id, settle).status == 200
                assert (case, *calls.take()) == (case, request, stream)


# ----------------------------------------------------------------------------- keyed holds

# The stream on time or late on the one-write path. On the others, late only: what the stream changes for
# a retry (the key's record completed, so the claim replays it) is the same whatever the path.
KEYED_POINTS = [
    *(("plain", n, stream) for n in range(1, len(KEYED_HOLD) + 1) for stream in ("delivered", "late")),
    *(("lowering", n, "late") for n in range(1, len(KEYED_HOLD_LOWERING) + 1)),
    *(("touching", n, "late") for n in range(1, len(KEYED_HOLD_TOUCHING) + 1)),
]


@pytest.mark.parametrize("phase", ["before", "after"])
@pytest.mark.parametrize(("path", "at_call", "stream"), KEYED_POINTS)
def test_a_keyed_hold_retried_after_a_crash_at_any_call_holds_once(
    local_service: Service, crash: Any, ids: Any, balanced: Any, path: str, at_call: int, stream: str, phase: str,
) -> None:
    service = local_service
    user, group = ids("u"), ids("g")
    grant(service, user, group, 10)
    before, other, when = 10, None, None
    if path == "lowering":
        # An open hold that expires after the keyed one: the keyed hold must lower the item's holdDue.
        other, before = placed(service, user, group, 1, ttlSeconds=7200), 9
    if path == "touching":
        # A hold past its expiry: the keyed hold's touch releases it first.
        other, when = placed(service, user, group, 6, ttlSeconds=60), datetime.now(UTC) + timedelta(minutes=2)
    with at(when):
        late = service.stream_late() if stream == "late" else contextlib.nullcontext()
        with late:
            crash.arm(phase, at_call)
            crash.expect_crash(lambda: hold(service, user, group, 4, key=KEY))
            crash.disarm()
            # What the first attempt placed, if its debit landed: the retry must answer exactly that hold.
            first = {hold_id: h for hold_id, h in holds_on_item(service, user, group).items() if hold_id != other}
            reply, statuses = as_a_caller(lambda: hold(service, user, group, 4, key=KEY))
            # A debit that landed leaves its marker (or its completed record): that answers at once.
            assert statuses in (([201],) if first else ([201], [503, 201])), (statuses, reply.body)
            mine = {hold_id: h for hold_id, h in holds_on_item(service, user, group).items() if hold_id != other}
            assert len(mine) == 1, mine
            if first:
                assert mine == first
            [held] = mine.values()
            assert reply.body == receipt(user, group, held, before - 4)
        # Once the stream has run: the record holds that answer, the marker is gone, a repeat replays it.
        assert hold(service, user, group, 4, key=KEY).body == reply.body
        record = key_record(user, KEY)
        assert (record.status, record.statusCode, record.response) == ("completed", 201, reply.body)
        assert markers(service, user, group) == []
        hold_id = held.ref.hold_id
        assert [entry for entry in ledger(user) if entry[2] == hold_id] == [(-4, "hold", hold_id)]
        if path == "touching":
            due = [(-6, "hold", other), (6, "release", other)]
            assert [entry for entry in ledger(user) if entry[2] == other] == due
        assert read_group(user, group).balance == before - 4
        # One real hold: releasing it gives its tokens back, once.
        assert close(service, user, hold_id, None).body["balance"] == before
        balanced(user)


# The first attempt died after its claim (the retry debits) or after its debit (the retry replays it).
RECOVERY_POINTS = [(1, n) for n in range(1, len(RECOVERY) + 1)] + [(2, n) for n in range(1, len(RECOVERY_MARKED) + 1)]


@pytest.mark.parametrize("phase", ["before", "after"])
@pytest.mark.parametrize(("first_dies_after", "at_call"), RECOVERY_POINTS)
def test_a_crash_while_recovering_a_keyed_hold_is_survived_too(
    local_service: Service, crash: Any, ids: Any, balanced: Any, phase: str, at_call: int, first_dies_after: int,
) -> None:
    """The first request dies after its claim (or its debit); the retry, before the stream has run and
    once the claim has settled, dies too, at every call; the next retry answers with the one hold."""
    service = local_service
    user, group = ids("u"), ids("g")
    grant(service, user, group, 10)
    with service.stream_late():
        crash.arm("after", first_dies_after)
        crash.expect_crash(lambda: hold(service, user, group, 4, key=KEY))
        with settled():
            crash.arm(phase, at_call)
            crash.expect_crash(lambda: hold(service, user, group, 4, key=KEY))
            crash.disarm()
            reply = hold(service, user, group, 4, key=KEY)
            assert reply.status == 201 and reply.body["balance"] == 6, reply.body
    [held] = holds_on_item(service, user, group).values()
    assert reply.body == receipt(user, group, held, 6)
    assert hold(service, user, group, 4, key=KEY).body == reply.body
    assert key_record(user, KEY).response == reply.body
    assert read_group(user, group).balance == 6
    assert [entry for entry in ledger(user) if entry[1] == "hold"] == [(-4, "hold", held.ref.hold_id)]
    assert close(service, user, held.ref.hold_id, None).body["balance"] == 10
    balanced(user)


@pytest.mark.parametrize("phase", ["before", "after"])
@pytest.mark.parametrize("at_call", range(1, len(KEYED_REFUSAL) + 1))
def test_a_keyed_hold_refused_and_killed_is_refused_again_then_decided_afresh(
    local_service: Service, crash: Any, ids: Any, balanced: Any, phase: str, at_call: int,
) -> None:
    """A 402 stores nothing under the key, even when the function dies around the claim's deletion."""
    service = local_service
    user, group = ids("u"), ids("g")
    grant(service, user, group, 3)
    crash.arm(phase, at_call)
    crash.expect_crash(lambda: hold(service, user, group, 4, key=KEY))
    crash.disarm()
    reply, _ = as_a_caller(lambda: hold(service, user, group, 4, key=KEY))
    assert reply.status == 402 and reply.body["error"] == "insufficient_credits", reply.body
    assert holds_on_item(service, user, group) == {} and read_group(user, group).balance == 3
    grant(service, user, group, 5)
    reply, _ = as_a_caller(lambda: hold(service, user, group, 4, key=KEY))
    assert reply.status == 201 and reply.body["balance"] == 4, reply.body
    assert [reason for _, reason, _ in ledger(user)] == ["grant", "grant", "hold"]
    balanced(user)


# ----------------------------------------------------------------------------- unkeyed holds

@pytest.mark.parametrize("stream", ["delivered", "late"])
@pytest.mark.parametrize("phase", ["before", "after"])
def test_an_unkeyed_hold_killed_happened_or_not_and_the_ledger_agrees(
    local_service: Service, crash: Any, ids: Any, balanced: Any, phase: str, stream: str,
) -> None:
    service = local_service
    user, group = ids("u"), ids("g")
    grant(service, user, group, 10)
    late = service.stream_late() if stream == "late" else contextlib.nullcontext()
    with late:
        crash.arm(phase, len(UNKEYED_HOLD))
        crash.expect_crash(lambda: hold(service, user, group, 4, ttlSeconds=60))
        crash.disarm()
    happened = phase == "after"
    orphans = list(holds_on_item(service, user, group))
    assert len(orphans) == (1 if happened else 0)
    assert read_group(user, group).balance == (6 if happened else 10)
    assert ledger(user) == [(10, "grant", None), *([(-4, "hold", orphans[0])] if happened else [])]
    balanced(user)
    # The caller never learned its id: once due, the next touch of the group releases it.
    with time_machine.travel(datetime.now(UTC) + timedelta(minutes=2), tick=True):
        reply = service.call("POST", f"/users/{user}/consume", {"offerGroup": group, "tokens": 9}, iam=True)
        assert reply.status == 200 and reply.body["balance"] == 1, reply.body
        released = [(-4, "hold", orphans[0]), (4, "release", orphans[0])] if happened else []
        assert ledger(user) == [(10, "grant", None), *released, (-9, "consume", None)]
        balanced(user)


# ----------------------------------------------------------------------------- settle and release

CLOSE_POINTS = [(case, n) for case, spec in CLOSES.items() for n in range(1, len(spec[4]) + 1)]


@pytest.mark.parametrize("phase", ["before", "after"])
@pytest.mark.parametrize(("case", "at_call"), CLOSE_POINTS)
def test_a_close_repeated_after_a_crash_at_any_call_answers_the_first_outcome_and_moves_once(
    local_service: Service, crash: Any, ids: Any, balanced: Any, case: str, at_call: int, phase: str,
) -> None:
    """The stream is late throughout (the retry meets the first attempt's write with no ledger entry
    yet): a close reads only the balance item and the closed holds' records, never what the stream
    writes, so a stream on time would show nothing more."""
    service = local_service
    user, group = ids("u"), ids("g")
    settle, answer, _, balance, _, _ = CLOSES[case]
    hold_id, grants, when = open_case(service, user, group, case)
    expected = {"holdId": hold_id, **answer}
    with at(when):
        with service.stream_late():
            crash.arm(phase, at_call)
            crash.expect_crash(lambda: close(service, user, hold_id, settle))
            crash.disarm()
            reply = close_as_a_caller(service, user, hold_id, settle)
            assert (reply.status, reply.body) == (200, expected)
            assert read_group(user, group).balance == balance
        assert close(service, user, hold_id, settle).body == expected
        assert ledger(user) == expected_ledger(case, grants, hold_id)
        balanced(user)
        # A rewrite folds the hold into the book (its outcome into a record of its own): still the same
        # answer, and the book agrees with the ledger.
        grant(service, user, group, 1)
        assert close(service, user, hold_id, settle).body == expected
        assert read_group(user, group).balance == balance + 1
        other = close(service, user, hold_id, None if settle is not None else 1)
        assert (other.status, other.body["error"]) == (409, "hold_closed")
        balanced(user)


# ----------------------------------------------------------------------------- the fold at the gate

def fill_the_gate(service: Service, user: str, group: str) -> dict[str, Any]:
    """15 holds placed and settled (1 of 2 tokens), and one more placed: 16 holds wait for the book, the
    gate is shut for the next write. Each settle's answer, by hold id."""
    closed = {}
    for _ in range(hold_store.MAX_PENDING - 1):
        hold_id = placed(service, user, group, 2)
        reply = close(service, user, hold_id, 1)
        assert reply.status == 200, reply.body
        closed[hold_id] = reply.body
    placed(service, user, group, 2)
    return closed


def book_item(service: Service, user: str, group: str) -> dict[str, Any]:
    item: dict[str, Any] = service.backend.client().get_item(
        TableName=service.backend.tables["AccountsTable"], ConsistentRead=True,
        Key={"userId": {"S": user}, "sk": {"S": book_sk(group)}}).get("Item", {})
    return item


@pytest.mark.parametrize("stream", ["delivered", "late"])
@pytest.mark.parametrize("phase", ["before", "after"])
@pytest.mark.parametrize("at_call", range(1, len(FOLDING_HOLD) + 1))
def test_a_hold_killed_while_it_folds_the_group_leaves_it_whole(
    local_service: Service, crash: Any, ids: Any, balanced: Any, at_call: int, phase: str, stream: str,
) -> None:
    """The fold a hold makes at the gate is several plain writes (no transaction): killed before or after
    any of them, the group reads whole, the hold happened or not (unkeyed), the closed holds still
    replay their outcomes, the next writes pass, and once the stream has run the book item holds the
    book the balance was swung to, with no prepared book left over."""
    service = local_service
    user, group = ids("u"), ids("g")
    grant(service, user, group, 100)
    closed = fill_the_gate(service, user, group)
    late = service.stream_late() if stream == "late" else contextlib.nullcontext()
    with late:
        crash.arm(phase, at_call)
        crash.expect_crash(lambda: hold(service, user, group, 4))
        crash.disarm()
        happened = sum(1 for h in holds_on_item(service, user, group).values() if h.outcome is None) - 1
        # The debit is the last call: only a crash after it placed the hold.
        assert happened == (1 if (phase, at_call) == ("after", len(FOLDING_HOLD)) else 0)
        state = read_group(user, group)
        assert state.balance == 100 - 17 - 4 * happened
        assert state.book.total == state.balance
        for hold_id, answer in closed.items():
            assert close(service, user, hold_id, 1).body == answer
        again = hold(service, user, group, 4)
        assert again.status == 201 and again.body["balance"] == 100 - 17 - 4 * (happened + 1), again.body
        assert close(service, user, again.body["holdId"], 4).status == 200
    balanced(user)
    balance = read_group(user, group)
    item = book_item(service, user, group)
    assert int(item["ver"]["N"]) == balance.book_version
    assert [name for name in item if name.startswith(PREPARED)] == []
    for hold_id, answer in closed.items():
        assert close(service, user, hold_id, 1).body == answer
    assert service.call("GET", f"/users/{user}/credits", iam=True).body["groups"][0]["balance"] == balance.balance


# ----------------------------------------------------------------------------- the stream function

class Ended(BaseException):
    """The Lambda runtime ended the stream function's invocation here (a timeout, out of memory): unlike
    an error, nothing catches it, nothing after it runs, and the batch is not answered at all."""


class Ending:
    """Ends the stream function's invocation at its Nth DynamoDB call, `before` or `after` it."""

    def __init__(self, phase: str, at_call: int) -> None:
        self.phase, self.at_call, self.calls, self.fired = phase, at_call, 0, False

    def hook(self, event_name: str, **_: Any) -> None:
        if not event_name.startswith(f"{self.phase}-call.") or not getattr(IN_STREAM, "active", False):
            return
        self.calls += 1
        if self.calls == self.at_call:
            self.fired = True
            raise Ended(event_name)


def with_the_stream_dying(service: Service, crash: Any, how: str, phase: str, at_call: int,
                          call: Callable[[], Any]) -> Any:
    """`call`, with the stream function dying at its Nth call on the way: an `error` it sees (as in
    tests/test_stream.py: a record it cannot finish is reported failed, the batch is delivered again at
    once), or the invocation `ended` (Lambda delivers the whole batch again, here at the next drain)."""
    if how == "error":
        crash.stream = True
        crash.arm(phase, at_call)
        reply = call()
        assert crash.fired
        crash.disarm()
        return reply
    ending = Ending(phase, at_call)
    with dynamodb_hooks(service, {"before-call.dynamodb": ending.hook, "after-call.dynamodb": ending.hook}):
        service.stream_paused = True
        try:
            reply = call()
        finally:
            service.stream_paused = False
        with pytest.raises(Ended):
            service.drain()
    assert ending.fired
    assert service.drain() > 0
    return reply


def dying_points(calls: tuple[str, ...]) -> list[tuple[int, str]]:
    """Every call with an error; the first (the batch's ledger write) also with the invocation ended,
    because an error there is caught (each record then writes its own entries) and only an ending
    makes Lambda deliver the batch again. An error at a later call fails the record: delivered again."""
    return [(n, "error") for n in range(1, len(calls) + 1)] + [(1, "ended")]


@pytest.mark.parametrize("phase", ["before", "after"])
@pytest.mark.parametrize(("at_call", "how"), dying_points(STREAM_OF_A_KEYED_HOLD))
def test_the_stream_function_killed_at_any_call_of_a_keyed_hold_is_delivered_again(
    local_service: Service, crash: Any, ids: Any, balanced: Any, phase: str, at_call: int, how: str,
) -> None:
    service = local_service
    user, group = ids("u"), ids("g")
    grant(service, user, group, 10)
    first = with_the_stream_dying(service, crash, how, phase, at_call, lambda: hold(service, user, group, 4, key=KEY))
    assert first.status == 201 and first.body["balance"] == 6, first.body
    hold_id = first.body["holdId"]
    assert ledger(user) == [(10, "grant", None), (-4, "hold", hold_id)]
    record = key_record(user, KEY)
    assert (record.status, record.statusCode, record.response) == ("completed", 201, first.body)
    assert markers(service, user, group) == []
    # The sweep's index is at the hold's expiry, so the sweep would release it.
    [held] = holds_on_item(service, user, group).values()
    assert balance_item(service, user, group)["dueSort"]["S"] == due_sort(user, group, held.expires_at)
    assert hold(service, user, group, 4, key=KEY).body == first.body
    balanced(user)


# The one-write close, and both rewrites (entries in one batch with an event; an entry and an archived
# outcome): the stream function treats every entry alike, whatever its reason.
STREAM_CLOSE_POINTS = [(case, *point) for case in ("settle-below", "settle-expired-lot", "release-due")
                       for point in dying_points(CLOSES[case][5])]


@pytest.mark.parametrize("phase", ["before", "after"])
@pytest.mark.parametrize(("case", "at_call", "how"), STREAM_CLOSE_POINTS)
def test_the_stream_function_killed_at_any_call_of_a_close_is_delivered_again(
    local_service: Service, crash: Any, ids: Any, events: Any, balanced: Any, case: str, at_call: int, phase: str,
    how: str,
) -> None:
    service = local_service
    user, group = ids("u"), ids("g")
    settle, answer, _, _, _, _ = CLOSES[case]
    hold_id, grants, when = open_case(service, user, group, case)
    with at(when):
        reply = with_the_stream_dying(service, crash, how, phase, at_call,
                                      lambda: close(service, user, hold_id, settle))
        assert (reply.status, reply.body) == (200, {"holdId": hold_id, **answer})
        assert ledger(user) == expected_ledger(case, grants, hold_id)
        expired = events.sent("CreditsExpired")
        assert len({event["eventId"] for event in expired}) == sum(
            1 for _, reason in CLOSES[case][2] if reason == "expire")
        balanced(user)
