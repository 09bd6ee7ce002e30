"""SPEC 1's invariant: for every (user, group), balance == sum of the group's ledger deltas.

Consumes write their ledger entries through the balance item's outbox, so each group's outbox is
flushed before it is compared. Meant for quiet moments (tests, an operator's `user-credits check`):
a write that lands between the balance read and the ledger read shows up as a transient mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from user_credits.store.consumption import flush_outbox
from user_credits.store.ledger import ledger_sums
from user_credits.store.models import GROUP_PREFIX, AccountItem, BalanceRecord, LedgerRecord


@dataclass(frozen=True)
class Mismatch:
    user_id: str
    offer_group: str
    balance: int
    ledger_sum: int


@dataclass
class InvariantReport:
    users: int = 0
    groups: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def merge(self, other: InvariantReport) -> None:
        self.users += other.users
        self.groups += other.groups
        self.mismatches.extend(other.mismatches)


def _balances(user_id: str) -> dict[str, int]:
    return {
        r.offerGroup: int(r.balance)
        for r in BalanceRecord.query(user_id, BalanceRecord.sk.startswith(GROUP_PREFIX), consistent_read=True)
        if isinstance(r, BalanceRecord)
    }


def check_user(user_id: str) -> InvariantReport:
    for group in _balances(user_id):
        flush_outbox(user_id, group)
    balances = _balances(user_id)
    sums = ledger_sums(user_id)
    report = InvariantReport(users=1, groups=len(set(balances) | set(sums)))
    for group in sorted(set(balances) | set(sums)):
        balance, total = balances.get(group, 0), sums.get(group, 0)
        if balance != total:
            report.mismatches.append(Mismatch(user_id, group, balance, total))
    return report


def all_user_ids() -> list[str]:
    """Every user with a balance or a ledger entry (two scans; for checks, not for request paths)."""
    users = {r.userId for r in AccountItem.scan(AccountItem.sk.startswith(GROUP_PREFIX))}
    users |= {r.userId for r in LedgerRecord.scan(attributes_to_get=["userId"])}
    return sorted(users)


def check_all() -> InvariantReport:
    report = InvariantReport()
    for user_id in all_user_ids():
        report.merge(check_user(user_id))
    return report
