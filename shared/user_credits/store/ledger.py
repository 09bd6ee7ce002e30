"""Ledger items: built in one place, written only by the stream function (`logic.stream`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from user_credits.domain.ledger import LedgerEntry, entry_key
from user_credits.store.models import LedgerRecord

# A page of a one-group read asks DynamoDB for this many items at a time before filtering.
FILTERED_PAGE: int = 100


def ledger_record(entry: LedgerEntry) -> LedgerRecord:
    return LedgerRecord(
        entry.user_id,
        entry_key(entry.at, entry.offer_group, entry.seq),
        offerGroup=entry.offer_group,
        delta=entry.delta,
        balanceAfter=entry.balance_after,
        reason=entry.reason,
        seq=entry.seq,
        at=entry.at,
        orderId=entry.order_id,
        idempotencyKey=entry.idempotency_key,
        shortfall=entry.shortfall,
        note=entry.note,
        lotId=entry.lot_id,
        holdId=entry.hold_id,
        subscriptionId=entry.subscription_id,
    )


def write_entries(entries: Sequence[LedgerEntry]) -> None:
    """Put the entries under their deterministic keys. No condition: a redelivered stream record
    writes the same items with the same content, so a second write changes nothing."""
    if len(entries) == 1:
        ledger_record(entries[0]).save()
        return
    with LedgerRecord.batch_write() as batch:
        for entry in entries:
            batch.save(ledger_record(entry))


def to_entry(record: LedgerRecord) -> LedgerEntry:
    return LedgerEntry(
        user_id=record.userId,
        offer_group=record.offerGroup,
        delta=int(record.delta),
        balance_after=int(record.balanceAfter),
        reason=record.reason,
        at=record.at,
        seq=int(record.seq),
        order_id=record.orderId,
        idempotency_key=record.idempotencyKey,
        shortfall=int(record.shortfall) if record.shortfall is not None else None,
        note=record.note,
        lot_id=record.lotId,
        hold_id=record.holdId,
        subscription_id=record.subscriptionId,
    )


@dataclass(frozen=True)
class LedgerPage:
    entries: list[LedgerEntry]
    # The entryKey of the last entry returned when more remain, else None.
    last_key: str | None


def read_page(user_id: str, offer_group: str | None, limit: int, after_key: str | None) -> LedgerPage:
    """Up to `limit` entries, newest first, strictly older than `after_key`; consistent reads.

    Asks for one item more than it returns, so that `last_key` is None exactly when nothing is left
    (no cursor that leads to an empty page). One group's entries are the user's partition filtered:
    the ledger has no index, so that writing an entry costs one write, not two.
    """
    start = None if after_key is None else {"userId": {"S": user_id}, "entryKey": {"S": after_key}}
    condition = None if offer_group is None else LedgerRecord.offerGroup == offer_group
    records = list(LedgerRecord.query(
        user_id, filter_condition=condition, scan_index_forward=False, limit=limit + 1,
        page_size=limit + 1 if condition is None else max(limit + 1, FILTERED_PAGE), consistent_read=True,
        last_evaluated_key=start,
    ))
    more = len(records) > limit
    records = records[:limit]
    return LedgerPage([to_entry(r) for r in records], records[-1].entryKey if more and records else None)


def group_entries(user_id: str) -> dict[str, list[LedgerEntry]]:
    """Every entry of one user, per group, in seq order (a consistent Query of the user's partition)."""
    groups: dict[str, list[LedgerEntry]] = {}
    for record in LedgerRecord.query(user_id, consistent_read=True):
        groups.setdefault(record.offerGroup, []).append(to_entry(record))
    for entries in groups.values():
        entries.sort(key=lambda entry: entry.seq)
    return groups


def ledger_sums(user_id: str) -> dict[str, int]:
    """Sum of deltas per group for one user."""
    return {group: sum(e.delta for e in entries) for group, entries in group_entries(user_id).items()}
