"""The expiry sweep's cost against the number of users: `python -m benchmarks.sweep`.

For 100, 1,000 and 10,000 users (1% of them due) on DynamoDB Local, each size on tables of its own:
the balances are written in bulk, a first sweep runs before anything is due (it stores the sweep's
position, as the scheduled function does every few minutes in production), the clock moves past the
due instants (time-machine), and the measured sweep expires the due groups; a repeat sweep right after
should find nothing. Items read are counted from botocore's `after-call` event on every DynamoDB client
pynamodb makes (`user_credits_dev.meters.ReadMeter`, the tests' meter too): Query/Scan `ScannedCount`, 1 per
GetItem, the items a BatchGetItem returned.

The events (CreditsExpired, CreditsExpiringSoon) and the ledger entries come from the Accounts table's
stream: after each sweep (untimed, outside the read meter's window) a StreamPump delivers what the sweep
wrote to the real stream function in this process (`benchmarks.common.StreamRunner`); the bulk seeding
is skipped (`skip_to_now`), as its items carry no change.

Writes benchmarks/results/sweep.json and sweep.md and prints the table.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from user_credits_dev.meters import ReadMeter

from benchmarks.common import (
    RESULTS_DIR,
    CapturedOutput,
    EventSink,
    Stopwatch,
    StreamRunner,
    apply_base_env,
    function_environment,
    machine_load,
    markdown_table,
)

SIZES = (100, 1_000, 10_000)
DUE_SHARE = 0.01


@dataclass
class SweepRun:
    expired: int
    warned: int
    items_read: int
    queries: int
    get_items: int
    seconds: float
    stream_records: int = 0  # what the stream function was then given (its ledger entries and events)


@dataclass
class SizeResult:
    users: int
    due: int
    seed_seconds: float
    first: SweepRun
    due_sweep: SweepRun
    repeat: SweepRun


def seed(users: int, due: int, start: datetime) -> list[str]:
    """`users` balances with one ledger entry each; the first `due` expire a few minutes after `start`,
    the others 10 to 375 days later (never inside the warning window)."""
    from user_credits.domain.ledger import LedgerEntry
    from user_credits.domain.lots import Book, NewLot
    from user_credits.store.due import due_shard, due_sort
    from user_credits.store.ledger import ledger_record
    from user_credits.store.models import BalanceRecord, BookRecord, LedgerRecord, book_sk, group_sk

    group = "bench-group"
    ids = [f"user-{uuid.uuid4().hex[:12]}" for _ in range(users)]
    with BalanceRecord.batch_write() as balances, BookRecord.batch_write() as books, \
            LedgerRecord.batch_write() as ledger:
        for number, user in enumerate(ids):
            if number < due:
                expires_at = start + timedelta(minutes=5, seconds=number)
            else:
                expires_at = start + timedelta(days=10 + number % 366, seconds=number)
            book, _ = Book(group).credit(NewLot("bench", "grant", 100, start, expires_at), "grant")
            balances.save(BalanceRecord(
                user, group_sk(group), offerGroup=group, balance=100, expiresAt=expires_at, seq=1,
                updatedAt=start, bookVer=1, nextExp=expires_at, dueShard=due_shard(user, group),
                dueSort=due_sort(user, group, expires_at),
            ))
            books.save(BookRecord(user, book_sk(group), offerGroup=group, book=book.to_record(), ver=1))
            ledger.save(ledger_record(LedgerEntry(
                user_id=user, offer_group=group, delta=100, balance_after=100, reason="grant", at=start, seq=1)))
    return ids[:due]


def run_sweep(handler: Any, meter: ReadMeter, stream: StreamRunner) -> SweepRun:
    from user_credits_dev.lambda_events import LambdaContext, scheduled_event

    meter.reset()
    watch = Stopwatch()
    with CapturedOutput():
        summary = handler(scheduled_event(), LambdaContext(function_name="ExpirySweepFunction", budget_ms=300_000))
    seconds = watch.seconds()
    if summary["failures"] or not summary["complete"]:
        raise RuntimeError(f"the sweep did not finish cleanly: {summary}")
    items_read, queries, get_items = meter.items, meter.requests["Query"], meter.requests["GetItem"]
    drained = stream.drain()  # the events and ledger entries follow from the stream
    if drained.failed_items:
        raise RuntimeError(f"the stream function failed {drained.failed_items} record(s) after the sweep")
    return SweepRun(
        expired=summary["expired"], warned=summary["warned"], items_read=items_read,
        queries=queries, get_items=get_items, seconds=seconds, stream_records=drained.records,
    )


def measure_size(client: Any, endpoint: str, users: int, meter: ReadMeter) -> SizeResult:
    import time_machine

    from user_credits.config import load_settings
    from user_credits.events import publisher
    from user_credits.store import models
    from user_credits_dev import template as tpl

    tables = tpl.create_tables(client, f"sweep-{users}-{uuid.uuid4().hex[:6]}")
    os.environ.update(function_environment(endpoint, tables))
    sink = EventSink()
    publisher.client_factory = lambda: sink
    publisher.reset_client()
    models._bound = None
    models.bind_tables(load_settings())
    spec = next(s for s in tpl.functions(tables) if s.logical_id == "ExpirySweepFunction")
    handler = tpl.load_handler(spec)

    start = datetime.now(UTC).replace(microsecond=0)
    due = max(1, round(users * DUE_SHARE))
    watch = Stopwatch()
    due_users = seed(users, due, start)
    seed_seconds = watch.seconds()
    stream = StreamRunner(endpoint, tables)
    stream.skip_to_now()  # the seeded items carry no change: nothing for the stream function
    with time_machine.travel(start, tick=True):
        first = run_sweep(handler, meter, stream)
    with time_machine.travel(start + timedelta(minutes=10), tick=True):
        due_sweep = run_sweep(handler, meter, stream)
        repeat = run_sweep(handler, meter, stream)
    expired = sorted(json.loads(e["Detail"])["userId"] for e in sink.entries if e["DetailType"] == "CreditsExpired")
    if expired != sorted(due_users) or due_sweep.expired != due:
        raise RuntimeError(f"{users} users: expected {due} expiries, the sweep reported {due_sweep.expired}")
    for name in tables.values():
        client.delete_table(TableName=name)
    return SizeResult(users, due, seed_seconds, first, due_sweep, repeat)


def table(results: list[SizeResult]) -> str:
    headers = ["", *(f"{r.users:,} users" for r in results)]

    def row(label: str, pick: Any) -> list[Any]:
        return [label, *(pick(r) for r in results)]

    rows = [
        row("groups due (1%)", lambda r: r.due),
        row("due sweep: lots expired", lambda r: r.due_sweep.expired),
        row("due sweep: items read", lambda r: r.due_sweep.items_read),
        row("due sweep: items read per due group", lambda r: round(r.due_sweep.items_read / r.due, 2)),
        row("due sweep: Query / GetItem requests", lambda r: f"{r.due_sweep.queries} / {r.due_sweep.get_items}"),
        row("due sweep: seconds", lambda r: round(r.due_sweep.seconds, 2)),
        row("due sweep: stream records then delivered to the stream function", lambda r: r.due_sweep.stream_records),
        row("repeat sweep: items read", lambda r: r.repeat.items_read),
        row("repeat sweep: seconds", lambda r: round(r.repeat.seconds, 2)),
        row("first sweep (no position yet; nothing due, the 1% warned): items read", lambda r: r.first.items_read),
        row("first sweep: warnings sent", lambda r: r.first.warned),
        row("first sweep: Query requests (16 shards x 2 passes, pages)", lambda r: r.first.queries),
        row("first sweep: seconds", lambda r: round(r.first.seconds, 2)),
        row("seeding (BatchWriteItem): seconds", lambda r: round(r.seed_seconds, 1)),
    ]
    return markdown_table(headers, rows)


def main() -> None:
    import warnings

    import boto3

    from user_credits_dev.dynamodb_local import DynamoDBLocal

    apply_base_env()
    warnings.filterwarnings("ignore", message="No application metrics to publish")
    from user_credits_dev.meters import ReadMeter, meter_pynamodb_sessions

    meter = ReadMeter()
    meter_pynamodb_sessions(meter)
    engine = DynamoDBLocal().start()
    try:
        client = boto3.client("dynamodb", endpoint_url=engine.endpoint)
        results = [measure_size(client, engine.endpoint, users, meter) for users in SIZES]
    finally:
        engine.stop()
    text = table(results)
    note = (
        "Expiry sweep on DynamoDB Local, 1% of users due; items read counted from botocore responses "
        "(Query ScannedCount, 1 per GetItem, the items a BatchGetItem returns: a due group is its index entry, "
        f"its balance item and its book). Machine load: {machine_load()}."
    )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "sweep.json").write_text(json.dumps(
        {"note": note, "results": [asdict(r) for r in results]}, indent=2) + "\n")
    (RESULTS_DIR / "sweep.md").write_text(f"{note}\n\n{text}\n")
    print(note)
    print()
    print(text)


if __name__ == "__main__":
    main()
