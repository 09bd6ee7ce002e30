"""Ledger items: built in one place so that every writer (transaction or outbox flush) agrees on keys."""

from __future__ import annotations

from datetime import datetime

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
    )


def expiry_bucket(moment: datetime) -> str:
    """The sparse expiry index is partitioned by UTC day; the sweep queries only the days that are due."""
    return moment.strftime("%Y-%m-%d")
