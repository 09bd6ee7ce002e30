"""Balance items (`GROUP#<group>`) and the one way a read-then-write path changes them.

`read_group` takes a consistent snapshot; `stage_group_change` adds to a transaction the balance update
(conditioned on the `seq` that was read) and one ledger item per entry, with exact `balanceAfter`
values. If anything changed the group in between, the whole transaction fails and the caller
re-reads (see `transactions.optimistic`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from pynamodb.expressions.operand import Path
from pynamodb.expressions.update import Action
from pynamodb.transactions import TransactWrite

from user_credits.domain.balances import Balance
from user_credits.domain.clock import to_iso
from user_credits.domain.ledger import LedgerEntry
from user_credits.store.ledger import expiry_bucket, ledger_record
from user_credits.store.models import BalanceRecord, LedgerRecord, group_sk


@dataclass(frozen=True)
class GroupState:
    user_id: str
    offer_group: str
    balance: int = 0
    expires_at: datetime | None = None
    seq: int = 0
    exists: bool = False
    warned_for: datetime | None = None

    def as_balance(self) -> Balance:
        return Balance(self.user_id, self.offer_group, self.balance, self.expires_at)


@dataclass(frozen=True)
class EntryDraft:
    """A ledger entry before it has a sequence number and a balanceAfter."""

    delta: int
    reason: str
    order_id: str | None = None
    idempotency_key: str | None = None
    shortfall: int | None = None
    note: str | None = None


def to_state(record: BalanceRecord) -> GroupState:
    return GroupState(
        user_id=record.userId,
        offer_group=record.offerGroup,
        balance=int(record.balance),
        expires_at=record.expiresAt,
        seq=int(record.seq),
        exists=True,
        warned_for=record.warnedFor,
    )


def read_group(user_id: str, offer_group: str) -> GroupState:
    try:
        record = BalanceRecord.get(user_id, group_sk(offer_group), consistent_read=True)
    except BalanceRecord.DoesNotExist:
        return GroupState(user_id, offer_group)
    return to_state(record)


def expiry_index_actions(user_id: str, offer_group: str, expires_at: datetime | None) -> list[Action]:
    """Keep the sparse expiry index in step with expiresAt: present iff the group expires."""
    if expires_at is None:
        return [BalanceRecord.expiryBucket.remove(), BalanceRecord.expirySort.remove()]
    return [
        BalanceRecord.expiryBucket.set(expiry_bucket(expires_at)),
        BalanceRecord.expirySort.set(f"{to_iso(expires_at)}#{user_id}#{offer_group}"),
    ]


def stage_group_change(
    tx: TransactWrite,
    before: GroupState,
    drafts: Sequence[EntryDraft],
    expires_at: datetime | None,
    at: datetime,
) -> tuple[GroupState, list[LedgerEntry]]:
    """Add the balance write and its ledger items to `tx`; returns the state after and the entries."""
    balance, seq = before.balance, before.seq
    entries: list[LedgerEntry] = []
    for draft in drafts:
        balance += draft.delta
        seq += 1
        entries.append(
            LedgerEntry(
                user_id=before.user_id, offer_group=before.offer_group, delta=draft.delta, balance_after=balance,
                reason=draft.reason, at=at, seq=seq, order_id=draft.order_id,
                idempotency_key=draft.idempotency_key, shortfall=draft.shortfall, note=draft.note,
            )
        )
    after = replace(before, balance=balance, seq=seq, expires_at=expires_at, exists=True)
    key = BalanceRecord(before.user_id, group_sk(before.offer_group))
    actions: list[Action] = [
        BalanceRecord.offerGroup.set(before.offer_group),
        # Set by hand: an UpdateItem may create the item, and queries need its discriminator.
        Path("itemType").set("balance"),
        BalanceRecord.balance.set(balance),
        BalanceRecord.seq.set(seq),
        BalanceRecord.updatedAt.set(at),
        BalanceRecord.expiresAt.set(expires_at) if expires_at is not None else BalanceRecord.expiresAt.remove(),
        *expiry_index_actions(before.user_id, before.offer_group, expires_at),
    ]
    # The read-then-write guard: nothing (a consume, another purchase) changed the group since `before`.
    guard = BalanceRecord.seq == before.seq if before.exists else BalanceRecord.sk.does_not_exist()
    tx.update(key, actions=actions, condition=guard)
    for entry in entries:
        tx.save(ledger_record(entry), condition=LedgerRecord.entryKey.does_not_exist())
    return after, entries
