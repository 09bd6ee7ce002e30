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

import hashlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Final, TypeVar

from pynamodb.expressions.operand import Path
from pynamodb.expressions.update import Action
from pynamodb.transactions import TransactWrite

from user_credits.domain.changes import Change, Event
from user_credits.domain.clock import to_iso
from user_credits.domain.lots import Book, Movement, current_book
from user_credits.errors import ServiceBusy
from user_credits.store.models import AccountItem, BalanceRecord, BookRecord, book_sk, group_sk

T = TypeVar("T")

# Partition keys of the byDue index: what falls due at one moment spreads over all of them.
DUE_SHARDS: Final = 16
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

    @property
    def expires_at(self) -> datetime | None:
        return self.book.expires_at


class TornRead(Exception):
    """A balance and a book from different rewrites (a read that a transaction interleaved): read again."""


def book_of(record: BalanceRecord, book: BookRecord | None) -> Book:
    """The group's book as of now; the two items must come from the same rewrite."""
    version = int(record.bookVer or 0)
    if (book.ver if book is not None else 0) != version:
        raise TornRead(f"book {book.ver if book else None} != balance's {version} for {record.offerGroup!r}")
    return current_book(record.offerGroup, book.book if book is not None else None, int(record.balance))


def to_state(record: BalanceRecord, book: BookRecord | None) -> GroupState:
    return GroupState(
        user_id=record.userId,
        offer_group=record.offerGroup,
        balance=int(record.balance),
        seq=int(record.seq),
        exists=True,
        book=book_of(record, book),
        stored_next_expiry=record.nextExp,
        book_version=int(record.bookVer or 0),
    )


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

    def read() -> GroupState:
        found = list(AccountItem.batch_get([(user_id, group_sk(offer_group)), (user_id, book_sk(offer_group))],
                                           consistent_read=True))
        record = next((item for item in found if isinstance(item, BalanceRecord)), None)
        if record is None:
            return GroupState(user_id, offer_group, Book(offer_group))
        return to_state(record, next((item for item in found if isinstance(item, BookRecord)), None))

    return untorn(read, "the group")


def due_shard(user_id: str, offer_group: str) -> str:
    digest = hashlib.sha256(f"{user_id}#{offer_group}".encode()).digest()
    return f"due#{int.from_bytes(digest[:4], 'big') % DUE_SHARDS:02d}"


def due_shards() -> list[str]:
    return [f"due#{n:02d}" for n in range(DUE_SHARDS)]


def due_sort(user_id: str, offer_group: str, moment: datetime) -> str:
    return f"{to_iso(moment)}#{user_id}#{offer_group}"


def due_index_actions(user_id: str, offer_group: str, next_expiry: datetime | None) -> list[Action]:
    """Keep the sparse due index in step with nextExp: present iff a lot with tokens expires."""
    if next_expiry is None:
        return [BalanceRecord.nextExp.remove(), BalanceRecord.dueShard.remove(), BalanceRecord.dueSort.remove()]
    return [
        BalanceRecord.nextExp.set(next_expiry),
        BalanceRecord.dueShard.set(due_shard(user_id, offer_group)),
        BalanceRecord.dueSort.set(due_sort(user_id, offer_group, next_expiry)),
    ]


def stage_group_change(
    tx: TransactWrite,
    before: GroupState,
    movements: Sequence[Movement],
    book: Book,
    at: datetime,
    events: Callable[[GroupState], Sequence[Event]] | None = None,
) -> GroupState:
    """Add the balance write and the book to `tx`; returns the state after.

    `book` is `before.book` with the movements applied; the two must agree, or this is a bug. The
    movements and `events(after)` travel on the balance item as its `change`, from which the stream
    function writes the ledger entries and sends the events (see `domain.changes`).
    """
    balance = before.balance + sum(movement.delta for movement in movements)
    seq = before.seq + len(movements)
    if book.total != balance:
        raise AssertionError(f"book total {book.total} != balance {balance} for {before.offer_group!r}")
    version = before.book_version + 1
    after = replace(before, balance=balance, seq=seq, exists=True, book=book, stored_next_expiry=book.next_expiry,
                    book_version=version)
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
        *due_index_actions(before.user_id, before.offer_group, book.next_expiry),
    ]
    # The read-then-write guard: nothing (a consume, another purchase) changed the group since `before`.
    guard = BalanceRecord.seq == before.seq if before.exists else BalanceRecord.sk.does_not_exist()
    tx.update(key, actions=actions, condition=guard)
    # No condition of its own: the balance's guard covers both items of the group.
    tx.save(BookRecord(before.user_id, book_sk(before.offer_group), offerGroup=before.offer_group,
                       book=book.to_record(), ver=version))
    return after
