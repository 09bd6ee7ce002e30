"""SPEC 1's invariants: for every (user, group), balance == sum of the group's ledger deltas, and the
group's book is sound (no lot below 0 or above what it was granted; a debt only when every lot is empty).

The balance compared is the stored one: a lot that has expired but that the sweep has not reached yet
still counts there, and in the ledger, until its `expire` entry is written.

The ledger follows the balance through the table's stream (SPEC 2.8), so this is meant for quiet
moments, once the stream has drained (tests, an operator's `user-credits check`): an entry still on its
way, or a write between the balance read and the ledger read, shows up as a transient mismatch. It
also checks that each group's entries have `seq` 1, 2, ... up to the balance item's `seq`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from user_credits.store.balances import read_group
from user_credits.store.ledger import group_entries
from user_credits.store.models import GROUP_PREFIX, AccountItem, BalanceRecord, LedgerRecord


@dataclass(frozen=True)
class Mismatch:
    user_id: str
    offer_group: str
    balance: int
    ledger_sum: int
    # Where the entries' seq is not 1..n with n the balance item's seq: what they are instead.
    seq_problem: str | None = None


@dataclass
class InvariantReport:
    users: int = 0
    groups: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    unsound_books: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.unsound_books

    def merge(self, other: InvariantReport) -> None:
        self.users += other.users
        self.groups += other.groups
        self.mismatches.extend(other.mismatches)
        self.unsound_books.extend(other.unsound_books)


def _records(user_id: str) -> list[BalanceRecord]:
    query = BalanceRecord.query(user_id, BalanceRecord.sk.startswith(GROUP_PREFIX), consistent_read=True)
    return [r for r in query if isinstance(r, BalanceRecord)]


def book_problems(user_id: str, offer_group: str) -> list[str]:
    book = read_group(user_id, offer_group).book
    where = f"{user_id}/{offer_group}"
    problems = [f"{where}: lot {lot.lot_id} holds {lot.remaining} of {lot.granted}"
                for lot in book.lots if not 0 <= lot.remaining <= lot.granted]
    if book.debt < 0:
        problems.append(f"{where}: negative debt {book.debt}")
    if book.debt > 0 and any(lot.remaining for lot in book.lots):
        problems.append(f"{where}: a debt of {book.debt} beside lots that hold tokens")
    return problems


def check_user(user_id: str) -> InvariantReport:
    records = _records(user_id)
    balances = {r.offerGroup: (int(r.balance), int(r.seq)) for r in records}
    ledgers = group_entries(user_id)
    report = InvariantReport(users=1, groups=len(set(balances) | set(ledgers)))
    for record in records:
        report.unsound_books.extend(book_problems(user_id, record.offerGroup))
    for group in sorted(set(balances) | set(ledgers)):
        (balance, seq), entries = balances.get(group, (0, 0)), ledgers.get(group, [])
        total = sum(entry.delta for entry in entries)
        seqs = [entry.seq for entry in entries]
        seq_problem = None if seqs == list(range(1, seq + 1)) else f"seq {_runs(seqs)}, balance item at {seq}"
        if balance != total or seq_problem is not None:
            report.mismatches.append(Mismatch(user_id, group, balance, total, seq_problem))
    return report


def _runs(seqs: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3,5' (short enough for a report)."""
    runs: list[str] = []
    for value in seqs:
        if runs and value == int(runs[-1].split("-")[-1]) + 1:
            runs[-1] = f"{runs[-1].split('-')[0]}-{value}"
        else:
            runs.append(str(value))
    return ",".join(runs) or "none"


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
