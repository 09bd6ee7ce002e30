"""Ledger items: built in one place so that every writer (transaction or outbox flush) agrees on keys."""

from __future__ import annotations

from dataclasses import dataclass

from user_credits.domain.ledger import LedgerEntry, entry_key
from user_credits.store.models import LedgerRecord


def user_group(user_id: str, offer_group: str) -> str:
    return f"{user_id}#{offer_group}"


def ledger_record(entry: LedgerEntry) -> LedgerRecord:
    return LedgerRecord(
        entry.user_id,
        entry_key(entry.at, entry.offer_group, entry.seq),
        userGroup=user_group(entry.user_id, entry.offer_group),
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
    )


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
    )


@dataclass(frozen=True)
class LedgerPage:
    entries: list[LedgerEntry]
    # The entryKey of the last entry returned when more remain, else None.
    last_key: str | None


def read_page(user_id: str, offer_group: str | None, limit: int, after_key: str | None) -> LedgerPage:
    """Up to `limit` entries, newest first, strictly older than `after_key`.

    Asks for one item more than it returns, so that `last_key` is None exactly when nothing is left
    (no cursor that leads to an empty page). The whole-user read is consistent; the per-group read
    goes through the byGroup index, which DynamoDB only offers eventually consistent.
    """
    if offer_group is None:
        start = None if after_key is None else {"userId": {"S": user_id}, "entryKey": {"S": after_key}}
        records = list(LedgerRecord.query(
            user_id, scan_index_forward=False, limit=limit + 1, page_size=limit + 1, consistent_read=True,
            last_evaluated_key=start,
        ))
    else:
        group_key = user_group(user_id, offer_group)
        start = None if after_key is None else {
            "userId": {"S": user_id}, "entryKey": {"S": after_key}, "userGroup": {"S": group_key},
        }
        records = list(LedgerRecord.byGroup.query(
            group_key, scan_index_forward=False, limit=limit + 1, page_size=limit + 1, last_evaluated_key=start,
        ))
    more = len(records) > limit
    records = records[:limit]
    return LedgerPage([to_entry(r) for r in records], records[-1].entryKey if more and records else None)


def ledger_sums(user_id: str) -> dict[str, int]:
    """Sum of deltas per group for one user (a consistent Query of the user's ledger partition)."""
    sums: dict[str, int] = {}
    for record in LedgerRecord.query(user_id, consistent_read=True):
        sums[record.offerGroup] = sums.get(record.offerGroup, 0) + int(record.delta)
    return sums
