"""The sweep's reads: groups with a lot due, or soon due, from the sparse `byDue` index, and its progress.

The index has `DUE_SHARDS` partition keys (`dueShard`, a hash of user and group) and is sorted by
`<iso nextExp>#<userId>#<group>` (`dueSort`), so the sweep reads, in each shard, only the entries
between where it stopped last time and now: what it reads grows with the groups that have a lot due,
never with the users, and no partition holds everything due on one day.

The index projects keys only (a consume changes nothing it holds, so a consume never writes it); the
sort key itself says who and when, and callers re-read the group before they decide.

Progress is one item in the accounts table (`userId` "#sweep": `#` cannot occur in a real id). Its
`expireCursor` is a `dueSort` position: every index entry whose key is <= the cursor has been
handled. A position is either a full key (the sweep stopped right after that entry) or a shorter
prefix such as `2026-11-26T00:34:16` (everything due before that second).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pynamodb.exceptions import UpdateError

from user_credits.domain.clock import from_iso
from user_credits.store.due import due_shards
from user_credits.store.models import BalanceRecord, SweepProgressRecord

SWEEP_USER = "#sweep"
SWEEP_SK = "EXPIRY"
# Sorts below every character that follows a key prefix, so `position + LOWEST` is the first key after it
# (a range condition has one operator, and BETWEEN is inclusive).
LOWEST = "\x00"
# Index pages: small enough that stopping for the time limit wastes little of a page already read.
PAGE_SIZE = 100


@dataclass(frozen=True)
class Progress:
    cursor: str | None
    stored: bool


@dataclass(frozen=True)
class DueEntry:
    """One index entry: the group, and the soonest expiry of a lot with tokens as of its last rewrite."""

    sort_key: str
    due_at: datetime
    user_id: str
    offer_group: str

    @classmethod
    def from_sort_key(cls, key: str) -> DueEntry:
        # Ids never contain `#` (SPEC 3), so the key splits into exactly three parts.
        moment, user_id, offer_group = key.split("#")
        return cls(key, from_iso(moment), user_id, offer_group)


def second_prefix(moment: datetime) -> str:
    """`YYYY-MM-DDTHH:MM:SS` of the second containing `moment`: sorts before every key of that second."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")


def position_before(moment: datetime) -> str:
    """A position covering exactly the entries that expire before the second containing `moment`."""
    return second_prefix(moment)


def position_through(moment: datetime) -> str:
    """An inclusive upper bound covering every entry that expires at or before `moment` (and, at most,
    the rest of its second: callers compare `expiresAt` itself)."""
    return second_prefix(moment.replace(microsecond=0) + timedelta(seconds=1))


def load_progress() -> Progress:
    try:
        record = SweepProgressRecord.get(SWEEP_USER, SWEEP_SK, consistent_read=True)
    except SweepProgressRecord.DoesNotExist:
        return Progress(cursor=None, stored=False)
    return Progress(cursor=record.expireCursor, stored=True)


def save_progress(read: Progress, cursor: str, at: datetime) -> bool:
    """Store `cursor` unless a concurrent sweep already stored a later one; False when it had."""
    record = SweepProgressRecord(SWEEP_USER, SWEEP_SK)
    field = SweepProgressRecord.expireCursor
    # A concurrent run may have moved on; only the position we read, or an earlier one, is overwritten
    # (moving back from what we read happens once after the clock went back, see logic.expiry).
    condition = field.does_not_exist() | (field < cursor)
    if read.cursor is not None:
        condition = condition | (field == read.cursor)
    try:
        record.update(
            actions=[field.set(cursor), SweepProgressRecord.updatedAt.set(at)],
            condition=condition,
        )
    except UpdateError as error:
        if error.cause_response_code == "ConditionalCheckFailedException":
            return False
        raise
    return True


def _shard_entries(shard: str, lower: str, upper: str) -> Iterator[DueEntry]:
    """One shard's entries with lower <= dueSort <= upper, in key order (a low-level Query: a keys-only
    index has no `itemType`, which pynamodb's model queries filter on)."""
    client: Any = BalanceRecord._get_connection().connection.client
    request: dict[str, Any] = {
        "TableName": BalanceRecord.Meta.table_name, "IndexName": BalanceRecord.byDue.Meta.index_name,
        "KeyConditionExpression": "#h = :h AND #r BETWEEN :lo AND :hi",
        "ExpressionAttributeNames": {"#h": "dueShard", "#r": "dueSort"},
        "ExpressionAttributeValues": {":h": {"S": shard}, ":lo": {"S": lower}, ":hi": {"S": upper}},
        "Limit": PAGE_SIZE,
    }
    while True:
        page = client.query(**request)
        for item in page.get("Items", []):
            yield DueEntry.from_sort_key(item["dueSort"]["S"])
        if "LastEvaluatedKey" not in page:
            return
        request["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def index_entries(after: str, through: str) -> Iterator[DueEntry]:
    """Index entries with `after` < dueSort <= `through` over every shard, merged in key order.

    Reads are eventually consistent (a GSI offers nothing else): callers re-read before they write, and
    trust an index entry only to find candidates.
    """
    lower = after + LOWEST
    if lower > through:
        return
    yield from heapq.merge(*(_shard_entries(shard, lower, through) for shard in due_shards()),
                           key=lambda entry: entry.sort_key)
