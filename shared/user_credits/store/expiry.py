"""The sweep's reads: due and soon-due balances from the sparse `byExpiry` index, and its stored progress.

The index is partitioned by UTC day (`expiryBucket`) and sorted by `<iso expiresAt>#<userId>#<group>`
(`expirySort`), so the sweep reads only the days between where it stopped last time and now: what it
reads grows with the groups that are due, never with the users.

Progress is one item in the accounts table (`userId` "#sweep": `#` cannot occur in a real id). Its
`expireCursor` is an `expirySort` position: every index entry whose key is <= the cursor has been
handled. A position is either a full key (the sweep stopped right after that entry) or a shorter
prefix such as `2026-11-26T00:34:16` (everything that expired before that second).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pynamodb.exceptions import UpdateError

from user_credits.store.ledger import expiry_bucket
from user_credits.store.models import BalanceRecord, SweepProgressRecord, group_sk

SWEEP_USER = "#sweep"
SWEEP_SK = "EXPIRY"
# Sorts below every character that follows a key prefix, so `position + LOWEST` is the first key after it
# (a range condition has one operator, and BETWEEN is inclusive).
LOWEST = "\x00"
# Index pages: small enough that stopping for the time limit wastes little of a page already read.
PAGE_SIZE = 100
# More day buckets than this to read (a catch-up): skip the empty ones first, probing them in parallel.
PROBE_ABOVE = 8
PROBE_THREADS = 16


@dataclass(frozen=True)
class Progress:
    cursor: str | None
    stored: bool


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


def day_position(moment: datetime) -> str:
    """A position covering every entry that expires before the UTC day of `moment`."""
    return expiry_bucket(moment.astimezone(UTC))


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


def days_between(first: str, last: str) -> list[str]:
    """The day buckets from `first` to `last` inclusive (both `YYYY-MM-DD`)."""
    day = datetime.strptime(first, "%Y-%m-%d").replace(tzinfo=UTC)
    end = datetime.strptime(last, "%Y-%m-%d").replace(tzinfo=UTC)
    days = []
    while day <= end:
        days.append(expiry_bucket(day))
        day += timedelta(days=1)
    return days


def _bucket_ranges(after: str, through: str) -> list[tuple[str, str, str]]:
    """(bucket, lower, upper) per day bucket, so that lower <= expirySort <= upper means after < key <= through."""
    ranges = []
    for bucket in days_between(after[:10], through[:10]):
        lower = after + LOWEST if bucket == after[:10] else bucket
        if lower <= through:
            ranges.append((bucket, lower, through))
    return ranges


def _has_entries(bucket_range: tuple[str, str, str]) -> bool:
    bucket, lower, upper = bucket_range
    # Not Index.count: with Select=COUNT pynamodb's `limit` never stops the paging.
    first = BalanceRecord.byExpiry.query(
        bucket, range_key_condition=BalanceRecord.expirySort.between(lower, upper), limit=1)
    return next(iter(first), None) is not None


def _nonempty(ranges: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The ranges that hold at least one entry, each probed with a one-item Query, in parallel.

    A long stretch of days (the first run, or a sweep that was down for a while) is mostly empty days;
    probing them side by side keeps it to a second or two. The first probe runs alone so that the one
    botocore client pynamodb shares between threads exists before the others start.
    """
    first = [ranges[0]] if _has_entries(ranges[0]) else []
    with ThreadPoolExecutor(max_workers=PROBE_THREADS) as pool:
        found = list(pool.map(_has_entries, ranges[1:]))
    return first + [r for r, has in zip(ranges[1:], found, strict=True) if has]


def index_entries(after: str, through: str) -> Iterator[BalanceRecord]:
    """Index entries with `after` < expirySort <= `through`, in key order, one day bucket at a time.

    Reads are eventually consistent (a GSI offers nothing else): callers re-read before they write, and
    trust an index copy only to find candidates.
    """
    ranges = _bucket_ranges(after, through)
    if len(ranges) > PROBE_ABOVE:
        ranges = _nonempty(ranges)
    for bucket, lower, upper in ranges:
        yield from BalanceRecord.byExpiry.query(
            bucket,
            range_key_condition=BalanceRecord.expirySort.between(lower, upper),
            page_size=PAGE_SIZE,
        )


def claim_warning(user_id: str, offer_group: str, expires_at: datetime) -> BalanceRecord | None:
    """Mark the group warned for `expires_at`; the group as it is now, or None if it needs no warning.

    The condition is the once-per-(user, group, expiresAt) rule itself, checked on the item rather than
    on the index copy: not warned for this instant yet, still expiring at it, still positive.
    """
    record = BalanceRecord(user_id, group_sk(offer_group))
    condition = (
        (BalanceRecord.warnedFor.does_not_exist() | (BalanceRecord.warnedFor != expires_at))
        & (BalanceRecord.expiresAt == expires_at)
        & (BalanceRecord.balance > 0)
    )
    try:
        record.update(actions=[BalanceRecord.warnedFor.set(expires_at)], condition=condition)
    except UpdateError as error:
        if error.cause_response_code == "ConditionalCheckFailedException":
            return None
        raise
    return record
