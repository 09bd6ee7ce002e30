"""The expiry sweep (SPEC 2.6): expire what is due, warn what will be due soon.

Choices (see README, "Expiry sweep"):
- Only positive balances are expired. A negative balance (overdraft debt) is left as it is at expiry:
  expiring it would forgive the debt, and the next purchase pays it back anyway.
- An expired group keeps its old `expiresAt`, so consumption stays refused (SPEC 2.5) and a purchase
  knows the group had expired.
- Each expiry re-reads the group and commits through `stage_group_change` (seq guard): a purchase,
  refund or grant that changed the group since it was read wins, and the sweep re-reads and decides
  again; a purchase that extended `expiresAt` leaves nothing due. A second sweep finds balance 0 and
  changes nothing.
- Warnings go only to positive balances, once per (user, group, expiresAt): the claim is a conditional
  write of `warnedFor` (made before the event is sent, so the event is sent at most once).
- One group that fails (throttling, a bug) is logged, counted (`SweepFailures`) and reported; the sweep
  goes on with the others. The stored position does not pass a failed entry, so it is retried on the
  next run (everything after it is re-read then, harmlessly: balances already at 0 are skipped).
- Expiries read only the index days from the stored position to now (store.expiry), about 2 items per
  due group: the index entry and the consistent re-read. The position is what makes a backlog drain
  over several runs; exactly-once comes from the data (seq guard, balance 0 after), so re-reading an
  entry twice is harmless.
- The warning window is read whole on every run (a group whose expiry moved inside the window must be
  warned again), so its cost is the groups expiring within the window, once per run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pynamodb.transactions import TransactWrite

from user_credits.domain.clock import to_iso
from user_credits.domain.crediting import GroupSnapshot, expire_remainder
from user_credits.events.publisher import publish
from user_credits.observability import count, logger
from user_credits.store.balances import EntryDraft, GroupState, read_group, stage_group_change
from user_credits.store.expiry import (
    Progress,
    claim_warning,
    day_position,
    index_entries,
    load_progress,
    position_before,
    position_through,
    save_progress,
)
from user_credits.store.models import BalanceRecord
from user_credits.store.transactions import commit, optimistic

# Lambda time left (ms) below which the sweep stops taking new groups: more than one group's worst case
# (an optimistic retry series with backoff) and time to store the position. A short budget (a test's
# context) keeps a fifth of it instead, but never less than MIN_SAFETY_MS.
SAFETY_MS = 20_000
MIN_SAFETY_MS = 500
# The position stored trails `now` by this much, so an index entry that reached the GSI late (it is
# eventually consistent) or a group written with an expiry just behind `now` is still seen next run.
SETTLE = timedelta(seconds=15)
# With no stored position (first run, or after the clock went back), the sweep starts this far back;
# the empty days on the way cost one small probe each (see store.expiry.index_entries). A year and a
# month: what expired before the sweep first ran on a table (data brought in from elsewhere).
FIRST_RUN_LOOKBACK = timedelta(days=400)
# Store the position every so many entries, so a crash (not a clean stop) repeats little work.
SAVE_EVERY = 200
# Due groups are expired this many at a time, side by side: each is a few round trips that wait on the
# network, so a backlog drains several times faster than one by one. The time limit is checked between
# batches, and the position only moves over a batch once all of it is done.
BATCH = 32
WORKERS = 8


class Deadline:
    """Stops a run cleanly before the Lambda time limit (`context.get_remaining_time_in_millis`)."""

    def __init__(self, remaining_ms: Callable[[], int], safety_ms: int | None = None) -> None:
        self._remaining_ms = remaining_ms
        if safety_ms is None:
            safety_ms = max(MIN_SAFETY_MS, min(SAFETY_MS, remaining_ms() // 5))
        self.safety_ms = safety_ms

    def reached(self) -> bool:
        return self._remaining_ms() < self.safety_ms


@dataclass(frozen=True)
class Failure:
    user_id: str
    offer_group: str
    stage: str  # expire | warn
    error: str

    def to_json(self) -> dict[str, str]:
        return {"userId": self.user_id, "offerGroup": self.offer_group, "stage": self.stage, "error": self.error}


@dataclass
class PassReport:
    changed: int = 0  # groups expired, or warnings sent
    examined: int = 0  # index entries looked at
    failures: list[Failure] = field(default_factory=list)
    complete: bool = True  # False when the time limit stopped the pass


@dataclass(frozen=True)
class SweepSummary:
    expiry: PassReport
    warning: PassReport

    def to_json(self) -> dict[str, Any]:
        return {
            "expired": self.expiry.changed,
            "warned": self.warning.changed,
            "examined": self.expiry.examined + self.warning.examined,
            "complete": self.expiry.complete and self.warning.complete,
            "failures": [f.to_json() for f in self.expiry.failures + self.warning.failures],
        }


def expiry_drafts(state: GroupState, now: datetime) -> list[EntryDraft]:
    """SPEC 2.6 with the rule purchases and grants apply first: a due group's positive remainder goes."""
    snapshot = GroupSnapshot(state.offer_group, state.balance, state.expires_at, state.exists)
    changes, _ = expire_remainder(snapshot, now)
    return [EntryDraft(change.delta, change.reason) for change in changes]


def needs_warning(record: BalanceRecord, now: datetime, window: timedelta) -> bool:
    """From the (eventually consistent) index copy; the claim re-checks all of it in its condition."""
    expires_at = record.expiresAt
    return (
        expires_at is not None
        and now < expires_at <= now + window
        and int(record.balance) > 0
        and record.warnedFor != expires_at
    )


def expire_group(user_id: str, offer_group: str, now: datetime) -> GroupState | None:
    """Set a due, positive group to 0 with an `expire` ledger entry; the state before, or None."""

    def attempt() -> GroupState | None:
        state = read_group(user_id, offer_group)
        drafts = expiry_drafts(state, now)
        if not drafts:
            return None

        def build(tx: TransactWrite) -> None:
            # The old expiresAt stays: the group remains expired, so consumption stays refused.
            stage_group_change(tx, state, drafts, state.expires_at, now)

        commit(build)
        return state

    return optimistic(attempt)


def _expire_entry(record: BalanceRecord, now: datetime) -> GroupState | Exception | None:
    """`expire_group` for a worker thread: an unexpected error is returned, to be reported in order."""
    try:
        return expire_group(record.userId, record.offerGroup, now)
    except Exception as error:
        return error


def _batches(entries: Iterator[BalanceRecord], size: int) -> Iterator[list[BalanceRecord]]:
    batch: list[BalanceRecord] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _failure(record: BalanceRecord, stage: str, error: Exception) -> Failure:
    logger.error("sweep failed on one group", exc_info=error, extra={
        "userId": record.userId, "offerGroup": record.offerGroup, "stage": stage})
    count("SweepFailures")
    return Failure(record.userId, record.offerGroup, stage, f"{type(error).__name__}: {error}")


def _start_position(progress: Progress, now: datetime) -> tuple[str, bool]:
    """Where this run starts, and whether the stored position was dropped (it was in the future)."""
    if progress.cursor is not None and progress.cursor <= position_through(now):
        return progress.cursor, False
    # No position yet, or one ahead of our clock: only a clock that went back (time travel in tests)
    # leaves that; re-reading a while back is safe because an expired group has balance 0.
    return day_position(now - FIRST_RUN_LOOKBACK), progress.cursor is not None


def expire_due_groups(now: datetime, deadline: Deadline) -> PassReport:
    """Expire every group due at `now` after the stored position; store how far it got."""
    report = PassReport()
    progress = load_progress()
    start, rewound = _start_position(progress, now)
    through = position_through(now)
    settled = position_before(now - SETTLE)
    # Every entry with a key <= `reached` is handled; it does not pass an entry that failed.
    reached = start
    blocked = False
    saved = progress

    def store(position: str) -> Progress:
        target = min(position, settled)
        if not rewound and saved.cursor is not None:
            target = max(target, saved.cursor)
        if target == saved.cursor and saved.stored:
            return saved
        if not save_progress(saved, target, now):
            logger.info("a concurrent sweep stored a later position", extra={"position": target})
        return Progress(cursor=target, stored=True)

    if deadline.reached():
        report.complete = False
        return report
    since_save = 0
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        for batch in _batches(index_entries(start, through), BATCH):
            if deadline.reached():
                report.complete = False
                break
            report.examined += len(batch)
            since_save += len(batch)
            # Entries later in the current second are not due yet: left for the next run.
            due = [r for r in batch if r.expiresAt is not None and r.expiresAt <= now]
            for record, outcome in zip(due, pool.map(lambda r: _expire_entry(r, now), due), strict=True):
                if isinstance(outcome, Exception):
                    report.failures.append(_failure(record, "expire", outcome))
                    blocked = True
                    continue
                if not blocked:
                    reached = record.expirySort
                if outcome is not None:
                    report.changed += 1
                    publish("CreditsExpired", {
                        "userId": outcome.user_id, "offerGroup": outcome.offer_group, "balance": 0,
                        "expiresAt": to_iso(outcome.expires_at), "expiredTokens": outcome.balance,
                    })
            if since_save >= SAVE_EVERY:
                saved, since_save = store(reached), 0
        else:
            if not blocked:
                reached = through
    store(reached)
    if report.changed:
        count("GroupsExpired", report.changed)
    return report


def warn_expiring_groups(now: datetime, window: timedelta, deadline: Deadline) -> PassReport:
    """One `CreditsExpiringSoon` per (user, group, expiresAt) for positive groups expiring within `window`.

    The whole window is read on every run (it is the set of groups about to be due), so a group whose
    expiry moved within the window is warned again for its new expiresAt.
    """
    report = PassReport()
    if window <= timedelta(0):
        return report
    if deadline.reached():
        report.complete = False
        return report
    for record in index_entries(position_before(now), position_through(now + window)):
        if deadline.reached():
            report.complete = False
            break
        report.examined += 1
        if not needs_warning(record, now, window):
            continue
        try:
            claimed = claim_warning(record.userId, record.offerGroup, record.expiresAt)
        except Exception as error:
            report.failures.append(_failure(record, "warn", error))
            continue
        if claimed is None:
            continue  # already warned by a concurrent run, or the group changed since the index copy
        report.changed += 1
        publish("CreditsExpiringSoon", {
            "userId": claimed.userId, "offerGroup": claimed.offerGroup, "balance": int(claimed.balance),
            "expiresAt": to_iso(claimed.expiresAt),
        })
    return report


def run_sweep(now: datetime, deadline: Deadline, warn_before_expiry_seconds: int) -> SweepSummary:
    """The scheduled sweep: expiries first (they change balances), then warnings while time remains."""
    expiry = expire_due_groups(now, deadline)
    warning = warn_expiring_groups(now, timedelta(seconds=warn_before_expiry_seconds), deadline)
    summary = SweepSummary(expiry, warning)
    logger.info("expiry sweep", extra={"summary": summary.to_json()})
    return summary
