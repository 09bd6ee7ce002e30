"""SPEC 2.6, the expiry sweep, on moto and on DynamoDB Local, with time travel.

Each test gets tables of its own: the sweep's stored position and the expiry index are table-wide, and
counting items read needs an index that holds only what the test put there.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import time_machine
from conftest import Backend, EventRecorder, Service, hook_dynamodb_clients
from seeding import seed_lot

from user_credits.domain.clock import to_iso
from user_credits.domain.ledger import LedgerEntry
from user_credits.domain.lots import Book, NewLot
from user_credits.logic import expiry as expiry_logic
from user_credits.logic.invariants import check_user
from user_credits.store import consumption as consumption_store
from user_credits.store.balances import GroupState, read_group
from user_credits.store.due import due_shard, due_sort
from user_credits.store.expiry import index_entries, position_through
from user_credits.store.ledger import ledger_record
from user_credits.store.models import (
    BalanceRecord,
    BookRecord,
    LedgerRecord,
    book_sk,
    group_sk,
)
from user_credits_dev import template as tpl
from user_credits_dev.lambda_events import LambdaContext, scheduled_event
from user_credits_dev.meters import ReadMeter

REPO_ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2031, 3, 10, 12, 0, 0, tzinfo=UTC)
DAY = timedelta(days=1)


# ---------------------------------------------------------------- fixtures


def _on_own_tables(backend: Backend, monkeypatch: pytest.MonkeyPatch, events: EventRecorder) -> Iterator[Service]:
    client = backend.client()
    tables = tpl.create_tables(client, f"sweep-{uuid.uuid4().hex[:8]}")
    service = Service(Backend(backend.name, backend.endpoint, tables), monkeypatch, events)
    yield service
    for name in tables.values():
        client.delete_table(TableName=name)


@pytest.fixture
def sweep_service(backend: Backend, monkeypatch: pytest.MonkeyPatch, events: EventRecorder) -> Iterator[Service]:
    """The service on fresh tables of its own (same engine as `backend`)."""
    yield from _on_own_tables(backend, monkeypatch, events)


@pytest.fixture
def local_sweep_service(
    ddblocal_backend: Backend, monkeypatch: pytest.MonkeyPatch, events: EventRecorder,
) -> Iterator[Service]:
    """The same on DynamoDB Local only: for races, where moto's transactions are not enough."""
    yield from _on_own_tables(ddblocal_backend, monkeypatch, events)


@pytest.fixture
def reads(sweep_service: Service, monkeypatch: pytest.MonkeyPatch) -> ReadMeter:
    meter = ReadMeter()
    hook_dynamodb_clients(monkeypatch, sweep_service, {"after-call.dynamodb": meter.after_call})
    return meter


class RunsOutAfter(LambdaContext):
    """A Lambda context whose time runs out once `groups` groups have been expired: a time limit that
    hits at a chosen point of the sweep, whatever the speed of the machine."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, groups: int) -> None:
        super().__init__(function_name="ExpirySweepFunction", budget_ms=300_000)
        self.groups = groups
        self.expired = 0
        self.lock = threading.Lock()
        real = expiry_logic.expire_group

        def counted(user_id: str, offer_group: str, now: datetime) -> Any:
            outcome = real(user_id, offer_group, now)
            if outcome is not None and outcome.movements:
                with self.lock:
                    self.expired += 1
            return outcome

        monkeypatch.setattr(expiry_logic, "expire_group", counted)

    def get_remaining_time_in_millis(self) -> int:
        with self.lock:
            return 300_000 if self.expired < self.groups else 100


# ---------------------------------------------------------------- helpers


def ledger_entry(user: str, group: str, delta: int, at: datetime, seq: int = 1) -> LedgerEntry:
    return LedgerEntry(user_id=user, offer_group=group, delta=delta, balance_after=delta, reason="grant",
                       at=at, seq=seq)


def seed_in_bulk(rows: list[tuple[str, str, int, datetime]], at: datetime) -> None:
    """(user, group, balance, expiresAt) groups of one lot with its one ledger entry, written by
    BatchWriteItem in the shape `stage_group_change` gives them (the first test checks both side by side)."""
    with BalanceRecord.batch_write() as batch, BookRecord.batch_write() as books:
        for user, group, balance, expires_at in rows:
            book, _ = Book(group).credit(NewLot("seed", "grant", balance, at, expires_at), "grant")
            batch.save(BalanceRecord(
                user, group_sk(group), offerGroup=group, balance=balance, expiresAt=expires_at, seq=1,
                updatedAt=at, bookVer=1, nextExp=expires_at, dueShard=due_shard(user, group),
                dueSort=due_sort(user, group, expires_at),
            ))
            books.save(BookRecord(user, book_sk(group), offerGroup=group, book=book.to_record(), ver=1))
    with LedgerRecord.batch_write() as batch:
        for user, group, balance, _ in rows:
            batch.save(ledger_record(ledger_entry(user, group, balance, at)))


def give(user: str, group: str, tokens: int, expires_at: datetime | None, at: datetime,
         lot_id: str | None = None) -> GroupState:
    """A lot of `tokens` expiring at `expires_at`, through the one primitive."""
    return seed_lot(user, group, tokens, expires_at=expires_at, at=at, lot_id=lot_id)


def ledger_of(user: str) -> list[LedgerRecord]:
    return sorted(LedgerRecord.query(user, consistent_read=True), key=lambda r: (r.offerGroup, int(r.seq)))


def assert_balances_match_ledger(pairs: list[tuple[str, str]]) -> None:
    """SPEC 1: for every (user, group), balance == sum of its ledger deltas."""
    for user in sorted({u for u, _ in pairs}):
        report = check_user(user)
        assert report.ok, report.mismatches
        assert report.groups == sum(1 for u, _ in pairs if u == user)


def expire_entries(user: str, group: str) -> list[LedgerRecord]:
    return [r for r in ledger_of(user) if r.offerGroup == group and r.reason == "expire"]


def sweep(service: Service, **kwargs: Any) -> dict[str, Any]:
    result: dict[str, Any] = service.invoke_schedule("ExpirySweepFunction", **kwargs)
    return result


def sweep_handler(service: Service) -> Callable[[dict[str, Any], Any], dict[str, Any]]:
    spec = next(s for s in service.specs if s.logical_id == "ExpirySweepFunction")
    handler: Callable[[dict[str, Any], Any], dict[str, Any]] = tpl.load_handler(spec)
    return handler


# ---------------------------------------------------------------- tests


def test_sweep_reads_grow_with_due_groups_not_with_users(sweep_service: Service, reads: ReadMeter, ids: Any) -> None:
    group = ids("g")
    far, due = [ids("far") for _ in range(400)], [ids("due") for _ in range(10)]
    with time_machine.travel(T0, tick=True):
        seed_in_bulk([(user, group, 50, T0 + timedelta(days=200)) for user in far], T0 - DAY)
        seed_in_bulk([(user, group, 30, T0 + timedelta(hours=1)) for user in due[1:]], T0 - DAY)
        give(due[0], group, 30, T0 + timedelta(hours=1), T0 - DAY)
        # Seeded items carry the index keys the store writes.
        written, seeded = (BalanceRecord.get(u, group_sk(group)) for u in due[:2])
        assert (written.nextExp, written.dueSort.split("#")[0]) == (seeded.nextExp, seeded.dueSort.split("#")[0])
        assert written.bookVer == seeded.bookVer == 1
        written_book, seeded_book = (BookRecord.get(u, book_sk(group)) for u in due[:2])
        assert written_book.book["lots"][0]["remaining"] == seeded_book.book["lots"][0]["remaining"] == 30
        assert sum(1 for _ in index_entries("", position_through(T0 + timedelta(days=200)))) == 410

    with time_machine.travel(T0 + timedelta(hours=2), tick=True):
        reads.reset()
        summary = sweep(sweep_service)
        items_read = reads.items

    assert summary["expired"] == 10 and summary["failures"] == [] and summary["complete"]
    # Per due group: its index entry and the consistent re-read before the write; plus the position item.
    assert items_read <= 3 * len(due) + 5, (reads.by_operation, reads.requests)
    print(f"\nitems read: {items_read} ({dict(reads.by_operation)}), requests: {dict(reads.requests)}")
    assert sorted(e["userId"] for e in sweep_service.events.of_type("CreditsExpired")) == sorted(due)
    for user in due:
        assert read_group(user, group).balance == 0
        assert [int(e.delta) for e in expire_entries(user, group)] == [-30]
    assert all(read_group(user, group).balance == 50 for user in far[:20])
    assert_balances_match_ledger([(u, group) for u in due + far[:20]])


def test_an_expired_group_keeps_its_expiry_and_a_second_sweep_changes_nothing(
    sweep_service: Service, reads: ReadMeter, ids: Any,
) -> None:
    user, group = ids("u"), ids("g")
    expires_at = T0 + timedelta(hours=1)
    with time_machine.travel(T0, tick=True):
        give(user, group, 40, expires_at, T0, lot_id="lot-1")
    with time_machine.travel(T0 + timedelta(hours=3), tick=True):
        assert sweep(sweep_service)["expired"] == 1
        after_first = read_group(user, group)
        reads.reset()
        second = sweep(sweep_service)
        second_reads = reads.items
    with time_machine.travel(T0 + timedelta(days=2), tick=True):
        third = sweep(sweep_service)
    assert (second["expired"], third["expired"]) == (0, 0)
    # The position moved past the expired entry: later runs do not read it again.
    assert second_reads <= 1, reads.by_operation
    assert (after_first.balance, after_first.expires_at) == (0, expires_at)
    assert read_group(user, group) == after_first
    assert len(expire_entries(user, group)) == 1
    detail = sweep_service.events.of_type("CreditsExpired")
    assert detail == [{"userId": user, "offerGroup": group, "balance": 0, "expiresAt": to_iso(expires_at),
                       "lotId": "lot-1", "expiredTokens": 40}]
    assert_balances_match_ledger([(user, group)])


def test_a_change_that_commits_while_the_sweep_runs_makes_it_decide_again(
    sweep_service: Service, monkeypatch: pytest.MonkeyPatch, ids: Any,
) -> None:
    raced, other, group = ids("raced"), ids("other"), ids("g")
    old_expiry, new_expiry = T0 + timedelta(hours=1), T0 + timedelta(days=30)
    with time_machine.travel(T0, tick=True):
        give(raced, group, 25, old_expiry, T0)
        give(other, group, 5, old_expiry, T0)

    real_read = expiry_logic.read_group
    extended: list[GroupState] = []

    def read_then_purchase(user: str, offer_group: str) -> GroupState:
        # The sweep found the group due and read it; a purchase commits before the sweep's write.
        state = real_read(user, offer_group)
        if user == raced and not extended:
            extended.append(give(raced, group, 10, new_expiry, T0 + timedelta(hours=2)))
        return state

    monkeypatch.setattr(expiry_logic, "read_group", read_then_purchase)
    with time_machine.travel(T0 + timedelta(hours=2), tick=True):
        summary = sweep(sweep_service)

    # The sweep's write lost to the new lot's, so it read again: the due lot still expires, the new one stays.
    assert extended and summary["expired"] == 2 and summary["failures"] == []
    now = read_group(raced, group)
    assert (now.balance, now.expires_at) == (10, new_expiry)
    assert [int(e.delta) for e in expire_entries(raced, group)] == [-25]
    assert sorted(e["userId"] for e in sweep_service.events.of_type("CreditsExpired")) == sorted([raced, other])
    assert_balances_match_ledger([(raced, group), (other, group)])


def test_overdraft_debt_and_empty_groups_are_left_as_they_are_at_expiry(sweep_service: Service, ids: Any) -> None:
    debtor, empty, group = ids("debtor"), ids("empty"), ids("g")
    with time_machine.travel(T0, tick=True):
        give(debtor, group, 7, T0 + timedelta(hours=1), T0)
        consumption_store.debit(debtor, group, 14, 7, T0)
        give(empty, group, 0, T0 + timedelta(hours=1), T0)
    with time_machine.travel(T0 + timedelta(hours=2), tick=True):
        summary = sweep(sweep_service)
    assert summary["expired"] == 0
    assert read_group(debtor, group).balance == -7 and read_group(empty, group).balance == 0
    # The spent lot has left the debtor's book; the debt stays, for the next credit to pay.
    assert read_group(debtor, group).book.lots == () and read_group(debtor, group).book.debt == 7
    assert expire_entries(debtor, group) == [] and sweep_service.events.of_type("CreditsExpired") == []
    assert_balances_match_ledger([(debtor, group), (empty, group)])


def test_expiring_soon_is_sent_once_per_lot(sweep_service: Service, ids: Any) -> None:
    user, empty, later, group = ids("u"), ids("empty"), ids("later"), ids("g")
    first_expiry = T0 + timedelta(days=2)  # inside the 3-day window
    with time_machine.travel(T0, tick=True):
        give(user, group, 12, first_expiry, T0, lot_id="first")
        give(empty, group, 0, first_expiry, T0)
        give(later, group, 12, T0 + timedelta(days=5), T0, lot_id="later")
        assert sweep(sweep_service)["warned"] == 1
        assert sweep(sweep_service)["warned"] == 0
    with time_machine.travel(T0 + timedelta(hours=6), tick=True):
        assert sweep(sweep_service)["warned"] == 0
        # A second lot, also expiring inside the window: it gets its own warning, the first one no other.
        second_expiry = T0 + timedelta(days=2, hours=12)
        give(user, group, 3, second_expiry, T0 + timedelta(hours=6), lot_id="second")
        assert sweep(sweep_service)["warned"] == 1
        assert sweep(sweep_service)["warned"] == 0
    with time_machine.travel(T0 + timedelta(days=2, hours=1), tick=True):
        # `later` has entered the window now; the first lot has expired meanwhile.
        assert sweep(sweep_service)["warned"] == 1

    soon = sweep_service.events.of_type("CreditsExpiringSoon")
    assert [(e["userId"], e["lotId"], e["expiresAt"], e["expiringTokens"], e["balance"]) for e in soon] == [
        (user, "first", to_iso(first_expiry), 12, 12), (user, "second", to_iso(second_expiry), 3, 15),
        (later, "later", to_iso(T0 + timedelta(days=5)), 12, 12),
    ]
    assert all(e["offerGroup"] == group for e in soon)
    assert [(e["userId"], e["lotId"], e["balance"]) for e in sweep_service.events.of_type("CreditsExpired")] == [
        (user, "first", 3)]
    assert_balances_match_ledger([(user, group), (empty, group), (later, group)])


def test_a_time_limit_mid_sweep_leaves_the_rest_to_the_next_run_exactly_once(
    sweep_service: Service, monkeypatch: pytest.MonkeyPatch, ids: Any,
) -> None:
    # Groups are expired in batches, with the time checked between them: batches of 2 here.
    monkeypatch.setattr(expiry_logic, "BATCH", 2)
    group = ids("g")
    users = [ids("due") for _ in range(10)]
    with time_machine.travel(T0, tick=True):
        seed_in_bulk([(user, group, 10 + n, T0 + timedelta(minutes=10 + n)) for n, user in enumerate(users)], T0)
    handler = sweep_handler(sweep_service)
    with time_machine.travel(T0 + timedelta(hours=1), tick=True):
        # Time runs out after 4 groups: the run stops cleanly and stores where it stopped.
        first = handler(scheduled_event(), RunsOutAfter(monkeypatch, groups=4))
        assert (first["expired"], first["complete"]) == (4, False)
    with time_machine.travel(T0 + timedelta(hours=1, minutes=5), tick=True):
        second = sweep(sweep_service)
        third = sweep(sweep_service)
    assert (second["expired"], second["complete"]) == (6, True)
    assert third["expired"] == 0
    expired = [e["userId"] for e in sweep_service.events.of_type("CreditsExpired")]
    assert sorted(expired) == sorted(users) and len(expired) == 10
    for user in users:
        assert len(expire_entries(user, group)) == 1 and read_group(user, group).balance == 0
    assert_balances_match_ledger([(u, group) for u in users])


def test_a_budget_below_the_safety_margin_does_nothing_and_the_next_run_does_it(
    sweep_service: Service, ids: Any,
) -> None:
    user, group = ids("u"), ids("g")
    with time_machine.travel(T0, tick=True):
        give(user, group, 9, T0 + timedelta(minutes=1), T0)
    with time_machine.travel(T0 + timedelta(hours=1), tick=True):
        starved = sweep(sweep_service, budget_ms=expiry_logic.MIN_SAFETY_MS - 1)
        full = sweep(sweep_service)
    assert (starved["expired"], starved["complete"]) == (0, False)
    assert (full["expired"], full["complete"]) == (1, True)
    assert_balances_match_ledger([(user, group)])


def test_one_failing_group_never_stops_the_others_and_is_retried_next_run(
    sweep_service: Service, monkeypatch: pytest.MonkeyPatch, ids: Any,
) -> None:
    group = ids("g")
    users = [ids("due") for _ in range(5)]
    broken = users[1]
    with time_machine.travel(T0, tick=True):
        seed_in_bulk([(user, group, 20, T0 + timedelta(minutes=n)) for n, user in enumerate(users)], T0)
    real_read = expiry_logic.read_group
    counted: list[str] = []
    real_count = expiry_logic.count

    def failing_read(user: str, offer_group: str) -> GroupState:
        if user == broken:
            raise RuntimeError("simulated outage for one user")
        return real_read(user, offer_group)

    def spy_count(name: str, value: int = 1) -> None:
        counted.append(name)
        real_count(name, value)

    monkeypatch.setattr(expiry_logic, "read_group", failing_read)
    monkeypatch.setattr(expiry_logic, "count", spy_count)
    with time_machine.travel(T0 + timedelta(hours=1), tick=True):
        first = sweep(sweep_service)
    assert first["expired"] == 4 and counted.count("SweepFailures") == 1
    assert [(f["userId"], f["offerGroup"], f["stage"]) for f in first["failures"]] == [(broken, group, "expire")]
    assert read_group(broken, group).balance == 20

    monkeypatch.setattr(expiry_logic, "read_group", real_read)
    with time_machine.travel(T0 + timedelta(hours=2), tick=True):
        second = sweep(sweep_service)
    assert (second["expired"], second["failures"]) == (1, [])
    assert sorted(e["userId"] for e in sweep_service.events.of_type("CreditsExpired")) == sorted(users)
    assert_balances_match_ledger([(u, group) for u in users])


def test_the_sample_event_runs_the_handler(sweep_service: Service) -> None:
    event = json.loads((REPO_ROOT / "events" / "expiry_sweep.json").read_text())
    summary = sweep_handler(sweep_service)(event, LambdaContext(function_name="ExpirySweepFunction", budget_ms=15_000))
    assert summary == {"expired": 0, "warned": 0, "examined": 0, "complete": True, "failures": []}


def test_the_first_sweep_catches_up_on_a_backlog_spread_over_many_days(
    sweep_service: Service, reads: ReadMeter, ids: Any,
) -> None:
    group = ids("g")
    users = [ids("old") for _ in range(15)]
    with time_machine.travel(T0, tick=True):
        seed_in_bulk([(user, group, 5, T0 - timedelta(days=1 + 19 * n)) for n, user in enumerate(users)],
                     T0 - timedelta(days=300))
        reads.reset()
        summary = sweep(sweep_service)
    assert (summary["expired"], summary["complete"]) == (15, True)
    # Empty days cost a probe that reads nothing; a day with entries, one item more.
    assert reads.items <= 3 * len(users) + 5, reads.by_operation
    assert all(read_group(user, group).balance == 0 for user in users)
    assert_balances_match_ledger([(u, group) for u in users])


def test_a_clock_that_went_back_does_not_hide_what_is_due(sweep_service: Service, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    with time_machine.travel(T0 + timedelta(days=30), tick=True):
        sweep(sweep_service)  # stores a position a month ahead of what follows
    with time_machine.travel(T0, tick=True):
        seed_in_bulk([(user, group, 8, T0 - timedelta(hours=1))], T0 - DAY)
        summary = sweep(sweep_service)
    assert summary["expired"] == 1
    assert read_group(user, group).balance == 0
    assert_balances_match_ledger([(user, group)])


def test_two_sweeps_at_the_same_time_expire_each_group_once(local_sweep_service: Service, ids: Any) -> None:
    group = ids("g")
    users = [ids("due") for _ in range(12)]
    with time_machine.travel(T0, tick=True):
        seed_in_bulk([(user, group, 3 + n, T0 + timedelta(minutes=n)) for n, user in enumerate(users)], T0)
    with time_machine.travel(T0 + timedelta(hours=1), tick=True):
        # A scheduler retry can overlap a slow run: both find the same due groups.
        handler = sweep_handler(local_sweep_service)
        with ThreadPoolExecutor(max_workers=2) as pool:
            runs = list(pool.map(lambda _: handler(scheduled_event(), LambdaContext(budget_ms=300_000)), range(2)))
        again = sweep(local_sweep_service)
    assert sum(r["expired"] for r in runs) == len(users) and again["expired"] == 0
    assert all(r["failures"] == [] for r in runs)
    expired = [e["userId"] for e in local_sweep_service.events.of_type("CreditsExpired")]
    assert sorted(expired) == sorted(users)
    for user in users:
        assert len(expire_entries(user, group)) == 1
    assert_balances_match_ledger([(u, group) for u in users])
