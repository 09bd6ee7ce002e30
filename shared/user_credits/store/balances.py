"""Balance items (`GROUP#<group>`), their books (`BOOK#<group>`), and the one way a read-then-write
path changes them.

`read_group` reads both items (one consistent BatchGetItem, checked for a torn pair), with the book
brought up to date (the consumes since the last rewrite burned in spending order, see `domain.lots`).
`stage_group_change` adds to a transaction the balance update (conditioned on the `seq` that was read,
carrying the write's `change`) and the new book. If anything changed the group in between, the whole
transaction fails and the caller re-reads (see `transactions.optimistic`). The ledger follows from the
table's stream (`logic.stream`).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Final, TypeVar

from botocore.exceptions import ClientError
from pynamodb.exceptions import UpdateError
from pynamodb.expressions.condition import Condition
from pynamodb.expressions.operand import Path
from pynamodb.expressions.update import Action
from pynamodb.models import Model
from pynamodb.transactions import TransactWrite

from user_credits.domain.changes import Change, Event
from user_credits.domain.lots import Book, Held, Movement, replay
from user_credits.errors import ServiceBusy
from user_credits.store import holds as hold_items
from user_credits.store.due import due_shard, due_sort
from user_credits.store.models import (
    BalanceRecord,
    BookRecord,
    IdempotencyRecord,
    book_sk,
    group_sk,
    single_attempt_client,
)
from user_credits.store.transactions import StaleRead

T = TypeVar("T")

# Reads of a group torn by a concurrent rewrite, tried again before giving up (as a lost race).
TORN_READ_ATTEMPTS: Final = 5


@dataclass(frozen=True)
class GroupState:
    """One user's group as read: the stored balance and sequence, and the book as of now."""

    user_id: str
    offer_group: str
    book: Book
    balance: int = 0
    seq: int = 0
    exists: bool = False
    # What the item says: a group whose stored nextExp is stale is rewritten by the sweep.
    stored_next_expiry: datetime | None = None
    book_version: int = 0
    # The holds on the balance item (open, and closed but not yet folded into the book).
    holds: tuple[hold_items.ItemHold, ...] = ()
    stored_hold_due: datetime | None = None
    # The item's count of hold writes (None: never a hold): part of the read-then-write guard.
    hold_writes: int | None = None
    # The open holds as the stored book has them (before the events since were replayed).
    stored_holds: tuple[Held, ...] = ()
    # The item's entry in the sweep's index (`dueSort`), as stored.
    stored_due_sort: str | None = None
    # The book item's own version as read: `book_version`, or one behind it while the book the balance
    # was swung to is still only prepared there; and the books prepared there (`p_<token>`).
    book_item_version: int = 0
    prepared: tuple[str, ...] = ()

    @property
    def expires_at(self) -> datetime | None:
        return self.book.expires_at


class TornRead(Exception):
    """A balance and a book from different rewrites (a read that a transaction interleaved): read again."""


# A book prepared by a rewrite made without a transaction: `p_<token>` on the book item (`rewrite_group`).
PREPARED: Final = "p_"


def stored_book(record: BalanceRecord, book: BookRecord | None, raw_book: Mapping[str, Any] | None = None) -> Book:
    """The book as the last rewrite stored it; the two items must come from the same rewrite: the book
    item's own book at the balance's `bookVer`, or the one prepared there under the balance's `bookTok`
    (a rewrite without a transaction swung the balance to it and it is not promoted yet: the token is
    random and written once, so the book under it is the one that rewrite swung to)."""
    version = int(record.bookVer or 0)
    found = int(book.ver or 0) if book is not None else 0
    if found == version:
        return Book.from_record(record.offerGroup, book.book if book is not None else None)
    prepared = (raw_book or {}).get(PREPARED + record.bookTok, {}).get("S") if record.bookTok else None
    if prepared is None or found > version:
        raise TornRead(f"book {found} != balance's {version} for {record.offerGroup!r}")
    return Book.from_record(record.offerGroup, BookRecord.book.deserialize(prepared))


def to_state(
    record: BalanceRecord, book: BookRecord | None, raw: Mapping[str, Any] | None = None,
    raw_book: Mapping[str, Any] | None = None,
) -> GroupState:
    holds = tuple(hold_items.holds_on(raw)) if raw is not None else ()
    stored = stored_book(record, book, raw_book)
    events = [event for hold in holds for event in (hold.opened, hold.closed) if event is not None]
    return GroupState(
        user_id=record.userId,
        offer_group=record.offerGroup,
        balance=int(record.balance),
        seq=int(record.seq),
        exists=True,
        # The book as of now: the stored one with everything since applied (`domain.lots.replay`).
        book=replay(stored, events, int(record.balance)),
        stored_next_expiry=record.nextExp,
        book_version=int(record.bookVer or 0),
        holds=holds,
        stored_hold_due=hold_items.hold_due(raw) if raw is not None else None,
        hold_writes=hold_items.hold_writes(raw) if raw is not None else None,
        stored_holds=stored.holds,
        stored_due_sort=record.dueSort,
        book_item_version=int(book.ver or 0) if book is not None else 0,
        prepared=tuple(name for name in (raw_book or {}) if name.startswith(PREPARED)),
    )


def _client() -> Any:
    return BalanceRecord._get_connection().connection.client


def _batch_get(keys: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Raw items (a pynamodb model read would drop the balance item's hold attributes), consistently."""
    table = BalanceRecord.Meta.table_name
    request: dict[str, Any] = {table: {"Keys": keys, "ConsistentRead": True}}
    found: list[dict[str, Any]] = []
    for _ in range(TORN_READ_ATTEMPTS * 2):
        page = _client().batch_get_item(RequestItems=request)
        found.extend(page.get("Responses", {}).get(table, []))
        request = page.get("UnprocessedKeys") or {}
        if not request:
            return found
    raise ServiceBusy("the group could not be read, retry shortly")


def partition(user_id: str) -> Iterator[dict[str, Any]]:
    """Every item of the user's partition, raw (one Query, paged)."""
    request: dict[str, Any] = {
        "TableName": BalanceRecord.Meta.table_name, "KeyConditionExpression": "#u = :u",
        "ExpressionAttributeNames": {"#u": "userId"}, "ExpressionAttributeValues": {":u": {"S": user_id}},
    }
    while True:
        page = _client().query(**request)
        yield from page.get("Items", [])
        if "LastEvaluatedKey" not in page:
            return
        request["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def states_of(items: Sequence[Mapping[str, Any]]) -> list[GroupState]:
    """The groups among raw items of one partition (each balance with its book)."""
    books = {item["offerGroup"]["S"]: item for item in items if item.get("itemType", {}).get("S") == "book"}
    states = []
    for item in items:
        if item.get("itemType", {}).get("S") != "balance":
            continue
        raw_book = books.get(item["offerGroup"]["S"])
        book = BookRecord.from_raw_data(dict(raw_book)) if raw_book is not None else None
        states.append(to_state(BalanceRecord.from_raw_data(dict(item)), book, item, raw_book))
    return states


def untorn(read: Callable[[], T], what: str) -> T:
    """Run `read` again while a concurrent rewrite tears the balance/book pair it reads (`TornRead`):
    the one retry of the read paths, as `transactions.optimistic` is the one of the writes."""
    for _ in range(TORN_READ_ATTEMPTS):
        try:
            return read()
        except TornRead:
            continue
    raise ServiceBusy(f"{what} kept changing while it was read, retry shortly")


def read_group(user_id: str, offer_group: str) -> GroupState:
    """Both items in one consistent BatchGetItem. The two reads are not one snapshot, but every rewrite
    bumps the book's version on both items, so a pair torn by a rewrite in between is seen and read
    again; a consume in between changes only the balance, which the burn accounts for."""

    keys = [{"userId": {"S": user_id}, "sk": {"S": sk}} for sk in (group_sk(offer_group), book_sk(offer_group))]

    def read() -> GroupState:
        found = states_of(_batch_get(keys))
        return found[0] if found else GroupState(user_id, offer_group, Book(offer_group))

    return untorn(read, "the group")


def due_index_actions(
    user_id: str, offer_group: str, next_expiry: datetime | None, hold_due: datetime | None = None,
) -> list[Action]:
    """Keep nextExp and the sparse due index in step: the index entry is present iff a lot with
    tokens expires or a hold is open, at the sooner of the two."""
    actions = [BalanceRecord.nextExp.set(next_expiry) if next_expiry is not None else BalanceRecord.nextExp.remove()]
    dates = [date for date in (next_expiry, hold_due) if date is not None]
    if not dates:
        return [*actions, BalanceRecord.dueShard.remove(), BalanceRecord.dueSort.remove()]
    return [
        *actions,
        BalanceRecord.dueShard.set(due_shard(user_id, offer_group)),
        BalanceRecord.dueSort.set(due_sort(user_id, offer_group, min(dates))),
    ]


def _hold_actions(before: GroupState, book: Book, closed: Sequence[hold_items.Outcome]) -> list[Action]:
    """Fold the balance item's holds into `book`: the stamps and closed holds go, each open hold learns
    when its lots expire (`lx`), `holdDue` becomes the soonest open hold's expiry."""
    actions: list[Action] = []
    gone = {outcome.hold_id for outcome in closed}
    newly_stored = set()
    for hold in before.holds:
        if hold.opened is not None:
            newly_stored.add(hold.ref.hold_id)
            actions += [Path(hold_items.OPEN_SEQ + hold.ref.rid).remove(),
                        Path(hold_items.OPEN_BALANCE + hold.ref.rid).remove()]
        if hold.outcome is not None or hold.ref.hold_id in gone:
            actions.append(Path(hold.ref.attribute).remove())
    stored_before = {held.hold_id: held for held in before.stored_holds}
    for held in book.holds:
        # `lx` only where it may have changed (a hold stored now, or what it took changed): an update
        # expression has at most 4 KB, so not one clause per open hold on every rewrite.
        earlier = stored_before.get(held.hold_id)
        if held.hold_id not in newly_stored and earlier is not None and earlier.taken == held.taken:
            continue
        ref = hold_items.parse_ref(held.hold_id)
        assert ref is not None
        expiry = book.hold_lots_expiry(held.hold_id)
        path = Path([ref.attribute, "lx"])
        actions.append(path.set({"S": hold_items.stamp(expiry)}) if expiry is not None else path.remove())
    if before.holds or book.holds:
        actions.append(Path(hold_items.PENDING).remove())
        open_holds = Path(hold_items.OPEN)
        actions.append(open_holds.set({"N": str(len(book.holds))}) if book.holds else open_holds.remove())
    due = min((held.expires_at for held in book.holds), default=None)
    actions.append(Path(hold_items.HOLD_DUE).set({"S": hold_items.stamp(due)}) if due is not None
                   else Path(hold_items.HOLD_DUE).remove())
    return actions


def folded_outcomes(before: GroupState) -> list[hold_items.Outcome]:
    """The closed holds a rewrite of `before` folds away (their outcomes are archived by it)."""
    return [hold.outcome for hold in before.holds if hold.outcome is not None]


@dataclass(frozen=True)
class _GroupWrite:
    """A rewrite of one group, as the balance item's update: what both ways of committing it send."""

    key: BalanceRecord
    actions: list[Action]
    guard: Condition
    book: Book
    version: int
    after: GroupState


def _group_write(
    before: GroupState,
    movements: Sequence[Movement],
    book: Book,
    at: datetime,
    events: Callable[[GroupState], Sequence[Event]] | None,
    closed: Sequence[hold_items.Outcome],
) -> _GroupWrite:
    balance = before.balance + sum(movement.delta for movement in movements)
    seq = before.seq + len(movements)
    if book.total != balance:
        raise AssertionError(f"book total {book.total} != balance {balance} for {before.offer_group!r}")
    version = before.book_version + 1
    after = replace(before, balance=balance, seq=seq, exists=True, book=book, stored_next_expiry=book.next_expiry,
                    book_version=version, holds=(), stored_holds=book.holds,
                    stored_hold_due=min((held.expires_at for held in book.holds), default=None),
                    book_item_version=version, prepared=())
    dates = [date for date in (after.stored_next_expiry, after.stored_hold_due) if date is not None]
    after = replace(after, stored_due_sort=due_sort(before.user_id, before.offer_group, min(dates)) if dates else None)
    change = Change(uuid.uuid4().hex, at, tuple(movements), tuple(events(after) if events else ()))
    key = BalanceRecord(before.user_id, group_sk(before.offer_group))
    expires_at = book.expires_at
    actions: list[Action] = [
        BalanceRecord.offerGroup.set(before.offer_group),
        # Set by hand: an UpdateItem may create the item, and queries need its discriminator.
        Path("itemType").set("balance"),
        BalanceRecord.balance.set(balance),
        BalanceRecord.seq.set(seq),
        BalanceRecord.updatedAt.set(at),
        BalanceRecord.bookVer.set(version),
        BalanceRecord.change.set(change.to_json()),
        BalanceRecord.expiresAt.set(expires_at) if expires_at is not None else BalanceRecord.expiresAt.remove(),
        *due_index_actions(before.user_id, before.offer_group, book.next_expiry,
                           min((held.expires_at for held in book.holds), default=None)),
        *_hold_actions(before, book, closed),
    ]
    # The read-then-write guard: nothing (a consume, another purchase) changed the group since `before`.
    # A hold written since (even one that changed no seq: a settle that returns nothing) fails it too,
    # and so does another rewrite (one with no movement changes no seq either, but bumps bookVer).
    writes, version_read = Path(hold_items.HOLD_WRITES), BalanceRecord.bookVer
    guard: Condition
    if not before.exists:
        guard = BalanceRecord.sk.does_not_exist()
    else:
        guard = BalanceRecord.seq == before.seq
        guard &= writes.does_not_exist() if before.hold_writes is None else writes == {"N": str(before.hold_writes)}
        guard &= version_read.does_not_exist() if before.book_version == 0 else version_read == before.book_version
    return _GroupWrite(key, actions, guard, book, version, after)


def stage_group_change(
    tx: TransactWrite,
    before: GroupState,
    movements: Sequence[Movement],
    book: Book,
    at: datetime,
    events: Callable[[GroupState], Sequence[Event]] | None = None,
    closed: Sequence[hold_items.Outcome] = (),
) -> GroupState:
    """Add the balance write and the book to `tx`; returns the state after.

    `book` is `before.book` with the movements applied; the two must agree, or this is a bug. The
    movements and `events(after)` travel on the balance item as its `change`, from which the stream
    function writes the ledger entries and sends the events (see `domain.changes`). Every rewrite
    folds the item's holds into the book (`store.holds`); `closed`: holds this rewrite closes, whose
    outcomes are archived with those of the holds closed before it.
    """
    write = _group_write(before, movements, book, at, events, closed)
    tx.update(write.key, actions=[*write.actions, BalanceRecord.bookTok.remove()], condition=write.guard)
    # No condition of its own: the balance's guard covers both items of the group. Written whole, it
    # also drops the books prepared there (none of them can be swung to once this commits).
    tx.save(BookRecord(before.user_id, book_sk(before.offer_group), offerGroup=before.offer_group,
                       book=book.to_record(), ver=write.version))
    # A closed hold's outcome outlives its attribute for a day, so a repeated settle still answers.
    for outcome in [*folded_outcomes(before), *closed]:
        tx.save(hold_items.archive_record(before.user_id, outcome, at))
    return write.after


def rewrite_group(
    before: GroupState,
    movements: Sequence[Movement],
    book: Book,
    at: datetime,
    events: Callable[[GroupState], Sequence[Event]] | None = None,
) -> GroupState:
    """`stage_group_change` for a rewrite of the group alone that closes no hold (a fold, an expiry, a
    warning), without a transaction: on AWS a transaction with the balance item makes every concurrent
    consume, hold and settle of it fail (TransactionConflictException), and costs double.

    1. The outcomes of the holds closed before are archived: fixed on the item already, so writing them
       is harmless if this rewrite loses.
    2. The new book is prepared on the book item under a fresh token (`p_<token>`, written once, on the
       condition that the book item is still the one read).
    3. The balance item is swung to it: the same update and guard as in a transaction, plus `bookTok`.
       From then on a reader finds the book under the balance's token (`stored_book`).
    4. The book is promoted (`promote_book`); if this function dies first, the stream function does it
       on seeing the swing. A rewrite that loses its swing drops its own prepared book; one that dies in
       between leaves it, until the next promotion drops it.

    A lost race at 2 or 3 raises `StaleRead` (the caller reads again). Closing a hold decides an outcome
    that must be archived in the same step as the close, so a rewrite that closes one stays a transaction.
    """
    write = _group_write(before, movements, book, at, events, ())
    archive_outcomes(before.user_id, folded_outcomes(before), at)
    token = uuid.uuid4().hex[:16]
    read = before.book_item_version
    same_book = BookRecord.ver.does_not_exist() if read == 0 else BookRecord.ver == read
    kind = Path("itemType")
    _write(BookRecord, before.user_id, book_sk(before.offer_group), [
        Path(PREPARED + token).set({"S": BookRecord.book.serialize(book.to_record())}),
        kind.set(kind | {"S": "book"}),
        BookRecord.offerGroup.set(BookRecord.offerGroup | before.offer_group),
    ], same_book)
    _swing(before, write, token)
    # Every book prepared before this read was for a version this swing has now passed.
    promote_book(before.user_id, before.offer_group, write.version, token, also=before.prepared)
    return write.after


def _swing(before: GroupState, write: _GroupWrite, token: str) -> None:
    """Swing the balance item to the book prepared under `token`. Sent once (`single_attempt_client`):
    a resend after an answer lost on the way would fail its guard and look like a lost race, and a swing
    refused by its guard drops the prepared book (a fold that keeps losing, to a hot balance's consumes,
    would otherwise pile copies of the book up on the book item). Only that refusal proves the swing did
    not land: after a conflict or throttling it is read again too, but the book stays (a stray copy, in
    the rare case, rather than a balance naming a book that is gone); after anything else (a timeout)
    the error goes up and the book stays, in case the swing landed."""
    request = BalanceRecord._get_connection().get_operation_kwargs(
        before.user_id, range_key=group_sk(before.offer_group),
        actions=[*write.actions, BalanceRecord.bookTok.set(token)], condition=write.guard)
    try:
        single_attempt_client().update_item(**request)
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code not in _NOT_APPLIED:
            raise
        if code == "ConditionalCheckFailedException":
            prepared = Path(PREPARED + token)
            with contextlib.suppress(StaleRead):
                _write(BookRecord, before.user_id, book_sk(before.offer_group), [prepared.remove()],
                       prepared.exists())
        raise StaleRead(code) from error


def promote_book(user_id: str, offer_group: str, version: int, token: str, also: Sequence[str] = ()) -> bool:
    """Make the book prepared under `token`, which the balance item was swung to at `version`, the book
    item's own (and drop `also`, books prepared for versions passed). Repeatable: does nothing (False)
    once it is done, or once a later rewrite has replaced the book item. By `rewrite_group` right after
    its swing, and by the stream function on seeing the swing, in case the first died in between."""
    prepared = Path(PREPARED + token)
    dropped = [Path(name).remove() for name in dict.fromkeys(also) if name != PREPARED + token]
    condition = prepared.exists() & (BookRecord.ver.does_not_exist() | (BookRecord.ver < version))
    try:
        _write(BookRecord, user_id, book_sk(offer_group), [
            BookRecord.book.set(prepared), BookRecord.ver.set(version), prepared.remove(), *dropped,
        ], condition)
    except StaleRead:
        return False
    return True


def archive_outcomes(user_id: str, outcomes: Sequence[hold_items.Outcome], at: datetime) -> None:
    """Archive outcomes that are fixed already (closed holds on the item), outside any transaction."""
    if not outcomes:
        return
    with IdempotencyRecord.batch_write() as batch:
        for outcome in outcomes:
            batch.save(hold_items.archive_record(user_id, outcome, at))


def _write(model: type[Model], hash_key: str, range_key: str, actions: list[Action], condition: Condition) -> None:
    """One conditional UpdateItem that returns nothing; a failed condition or a conflict with a
    transaction in flight is a lost race (`StaleRead`)."""
    try:
        model._get_connection().update_item(hash_key, range_key=range_key, actions=actions, condition=condition)
    except UpdateError as error:
        if error.cause_response_code in _LOST_RACE:
            raise StaleRead(str(error.cause_response_code)) from error
        raise


# What a plain write to an item gets from DynamoDB when its condition fails, or when a transaction that
# includes the item is in flight: nothing was written, read again.
_LOST_RACE: Final = frozenset({"ConditionalCheckFailedException", "TransactionConflictException"})
# The errors of a request sent once after which it is read again and decided again (by DynamoDB's
# contract none of them was applied; botocore retries none of them on a single-attempt client).
_NOT_APPLIED: Final = _LOST_RACE | hold_items.CONFLICTS
