"""The expiry sweep (SPEC 2.6): expire the lots that are due, warn about those that soon will be.

Choices (see README, "Expiry sweep"):
- Lots expire one by one: each lot with tokens whose `expiresAt` has passed goes to 0 with an `expire`
  ledger entry and a `CreditsExpired` event of its own (`lotId`, `expiredTokens`). Debt is never
  expired (that would forgive it); the next credit pays it back.
- Each expiry re-reads the group and commits with the seq guard: a purchase, refund, grant or consume
  that changed the group since it was read wins, and the sweep re-reads and decides again. A second
  sweep finds nothing due and changes nothing. A rewrite that closes no hold (lots expire, holds are
  folded, warnings claimed) is made without a transaction (`store.balances.rewrite_group`); one that
  releases due holds is a transaction, since each released hold's outcome is archived with it.
- A group whose stored `nextExp` is stale (its soonest lot was spent by consumes, or has expired with
  nothing left) is rewritten with the right one, so consumes are not refused for a lot that is gone.
- Warnings: one `CreditsExpiringSoon` per lot (`lotId`, `expiringTokens`), claimed in the lot's
  stored `warned` flag by the same guarded rewrite that carries the event (so exactly one per lot).
- One group that fails (throttling, a bug) is logged, counted (`SweepFailures`) and reported; the sweep
  goes on with the others. The stored position does not pass a failed entry, so it is retried on the
  next run (everything after it is re-read then, harmlessly).
- Expiries read only the index entries from the stored position to now (store.expiry), about 2 items per
  due group: the index entry and the consistent re-read. The position is what makes a backlog drain
  over several runs; exactly-once comes from the data (seq guard, nothing due after), so re-reading an
  entry twice is harmless.
- The warning window is read whole on every run (the groups with a lot about to be due), so its cost is
  the groups with a lot expiring within the window, once per run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pynamodb.transactions import TransactWrite

from user_credits.domain.changes import Event
from user_credits.domain.clock import to_iso
from user_credits.domain.lots import Book, Lot, Movement
from user_credits.errors import ServiceBusy
from user_credits.observability import count, logger
from user_credits.store.balances import GroupState, read_group, rewrite_group, stage_group_change
from user_credits.store.consumption import gates_open
from user_credits.store.due import due_sort
from user_credits.store.expiry import (
    DueEntry,
    Progress,
    index_entries,
    load_progress,
    position_before,
    position_through,
    save_progress,
)
from user_credits.store.holds import Outcome
from user_credits.store.transactions import commit, optimistic

# Lambda time left (ms) below which the sweep stops taking new groups: more than one group's worst case
# (an optimistic retry series with backoff) and time to store the position. A short budget (a test's
# context) keeps a fifth of it instead, but never less than MIN_SAFETY_MS.
SAFETY_MS = 20_000
MIN_SAFETY_MS = 500
# The position stored trails `now` by this much, so an index entry that reached the GSI late (it is
# eventually consistent) or a group written with an expiry just behind `now` is still seen next run.
SETTLE = timedelta(seconds=15)
# Store the position every so many entries, so a crash (not a clean stop) repeats little work.
SAVE_EVERY = 200
# Due groups are expired this many at a time, side by side: each is a few round trips that wait on the
# network, so a backlog drains several times faster than one by one. The time limit is checked between
# batches, and the position only moves over a batch once all of it is done.
BATCH = 32
WORKERS = 8
# Kept for the life of the container: pynamodb gives each thread its own botocore session and client
# (building one parses botocore's models, ~0.1 s of CPU), so fresh threads every run would pay that
# eight times per warm invocation.
_pool: ThreadPoolExecutor | None = None


def _workers() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="sweep")
    return _pool


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
    changed: int = 0  # lots expired, or warnings sent
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


@dataclass(frozen=True)
class Expiry:
    """What one group's expiry rewrite did: the group before and after, and one movement per lot."""

    before: GroupState
    after: GroupState
    movements: tuple[Movement, ...]



def expired_events(
    before: GroupState, movements: list[Movement], now: datetime,
) -> Callable[[GroupState], list[Event]]:
    """One CreditsExpired per expire movement (a lot that lost tokens, or the tokens a released hold
    gave back to a lot that had expired meanwhile), sent by the stream function."""
    lots = {lot.lot_id: lot for lot in before.book.lots}

    def events(after: GroupState) -> list[Event]:
        return [Event("CreditsExpired", {
            "userId": before.user_id, "offerGroup": before.offer_group,
            "balance": after.book.spendable(now),
            "expiresAt": to_iso(lots[str(m.lot_id)].expires_at) if str(m.lot_id) in lots else None,
            "lotId": m.lot_id, "expiredTokens": -m.delta,
        }) for m in movements if m.reason == "expire"]

    return events


def expire_group(
    user_id: str, offer_group: str, now: datetime, *, unless_open: bool = False, due_holds_only: bool = False,
) -> Expiry | None:
    """Expire the group's due lots, release its due holds, fold its holds into the book (and correct a
    stale nextExp, holdDue or index entry); None when nothing needed doing. More due holds than one
    rewrite releases take more rewrites, all done here. `unless_open`: for a writer refused only at the
    gate of waiting hold events, nothing once a read finds the gates open (another writer folded).
    `due_holds_only`: nothing once a read finds no hold due (a rewrite that follows folds the rest)."""
    done: Expiry | None = None
    for _ in range(MAX_REWRITES):
        step = _expire_once(user_id, offer_group, now, unless_open, due_holds_only)
        if step is None:
            return done
        done = step if done is None else Expiry(done.before, step.after, done.movements + step.movements)
        if not any(held.expires_at <= now for held in step.after.book.holds):
            return done
    raise ServiceBusy("the holds of this group are being released, retry shortly")


# Rewrites one expire_group makes at most (each releases up to RELEASES_PER_REWRITE due holds).
MAX_REWRITES = 8


def _expire_once(
    user_id: str, offer_group: str, now: datetime, unless_open: bool = False, due_holds_only: bool = False,
) -> Expiry | None:
    def attempt() -> Expiry | None:
        state = read_group(user_id, offer_group)
        if not state.exists or (unless_open and gates_open(state, now)):
            return None
        if due_holds_only and not any(held.expires_at <= now for held in state.book.holds):
            return None
        book, movements = state.book.expire(now)
        book, releases, released = release_due(book, now)
        movements += releases
        pending = any(hold.opened is not None or hold.closed is not None for hold in state.holds)
        hold_due = min((held.expires_at for held in book.holds), default=None)
        due = [date for date in (book.next_expiry, hold_due) if date is not None]
        entry = due_sort(user_id, offer_group, min(due)) if due else None
        if (not movements and book == state.book and state.stored_next_expiry == book.next_expiry
                and not pending and state.stored_hold_due == hold_due and state.stored_due_sort == entry):
            return None
        events = expired_events(state, movements, now)
        if not released:
            # Closes no hold (a fold, an expiry): no transaction with the balance item (`rewrite_group`).
            return Expiry(state, rewrite_group(state, movements, book, now, events=events), tuple(movements))
        after: list[GroupState] = []

        def build(tx: TransactWrite) -> None:
            after.append(stage_group_change(tx, state, movements, book, now, events=events, closed=released))

        commit(build)
        return Expiry(state, after[0], tuple(movements))

    return optimistic(attempt)


# Due holds one rewrite releases at most: with up to MAX_PENDING outcomes folded beside them, a
# rewrite's transaction (100 items) keeps room for the rest of a purchase's items.
RELEASES_PER_REWRITE = 32


def release_due(book: Book, now: datetime) -> tuple[Book, list[Movement], list[Outcome]]:
    """Release the holds of `book` past their expiresAt (SPEC 2.9), at most `RELEASES_PER_REWRITE`
    (the rest by the next rewrite: `expire_group` makes as many as it takes)."""
    movements: list[Movement] = []
    outcomes: list[Outcome] = []
    # The balance as `book` leaves it (after the lots this rewrite expires), not as read.
    balance = book.total
    due = sorted((held for held in book.holds if held.expires_at <= now), key=lambda h: h.expires_at)
    for held in due[:RELEASES_PER_REWRITE]:
        book, moves = close_in_book(book, held.hold_id, 0)
        movements += moves
        balance += sum(move.delta for move in moves)
        outcomes.append(Outcome(held.hold_id, "released", 0, held.tokens, balance))
    return book, movements, outcomes


def close_in_book(book: Book, hold_id: str, settled: int) -> tuple[Book, list[Movement]]:
    """Close the hold in the book: the movements (release, expiries of returned tokens whose lot is
    gone, a settle's excess consumed)."""
    book, returned = book.close(hold_id, settled)
    moves: list[Movement] = []
    if returned.released:
        moves.append(Movement(returned.released, "release", hold_id=hold_id))
    moves += [Movement(-n, "expire", lot_id=lot_id, hold_id=hold_id) for lot_id, n in returned.expired]
    if returned.excess:
        moves.append(Movement(-returned.excess, "consume", hold_id=hold_id))
    return book, moves


def read_touched(user_id: str, offer_group: str, now: datetime) -> GroupState:
    """The group for a rewrite (purchase, grant, refund, renewal): its holds past their expiresAt are
    released first (SPEC 2.9: as soon as the group is touched), by a rewrite of their own."""
    state = read_group(user_id, offer_group)
    if any(held.expires_at <= now for held in state.book.holds):
        # Only while some are due: a fold of the rest here would be a rewrite without a transaction,
        # which archives outcomes with calls these functions are not granted; theirs folds them anyway.
        expire_group(user_id, offer_group, now, due_holds_only=True)
        state = read_group(user_id, offer_group)
    return state


def warn_group(user_id: str, offer_group: str, now: datetime, window_end: datetime) -> list[Lot]:
    """Claim the warnings of the group's lots that expire within (now, window_end]; the lots claimed."""

    def attempt() -> list[Lot]:
        state = read_group(user_id, offer_group)
        book = state.book.claim_warnings(now, window_end)
        if not book.warnings:
            return []
        warnings = [Event("CreditsExpiringSoon", {
            "userId": state.user_id, "offerGroup": state.offer_group, "balance": state.book.spendable(now),
            "expiresAt": to_iso(lot.expires_at), "lotId": lot.lot_id, "expiringTokens": lot.remaining,
        }) for lot in book.warnings]

        rewrite_group(state, [], book, now, events=lambda _after: warnings)
        return list(book.warnings)

    return optimistic(attempt)


def _expire_entry(entry: DueEntry, now: datetime) -> Expiry | Exception | None:
    """`expire_group` for a worker thread: an unexpected error is returned, to be reported in order."""
    try:
        return expire_group(entry.user_id, entry.offer_group, now)
    except Exception as error:
        return error


def _batches(entries: Iterator[DueEntry], size: int) -> Iterator[list[DueEntry]]:
    batch: list[DueEntry] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _failure(entry: DueEntry, stage: str, error: Exception) -> Failure:
    logger.error("sweep failed on one group", exc_info=error, extra={
        "userId": entry.user_id, "offerGroup": entry.offer_group, "stage": stage})
    count("SweepFailures")
    return Failure(entry.user_id, entry.offer_group, stage, f"{type(error).__name__}: {error}")


def _start_position(progress: Progress, now: datetime) -> tuple[str, bool]:
    """Where this run starts, and whether the stored position was dropped (it was in the future)."""
    if progress.cursor is not None and progress.cursor <= position_through(now):
        return progress.cursor, False
    # No position yet, or one ahead of our clock: only a clock that went back (time travel in tests)
    # leaves that. Start from the beginning of the index: it holds only groups with a lot still to
    # expire, so this costs what is due, and re-reading an entry is harmless (nothing due after).
    return "", progress.cursor is not None


def expire_due_lots(now: datetime, deadline: Deadline) -> PassReport:
    """Expire every lot due at `now` in the groups after the stored position; store how far it got."""
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
    pool = _workers()
    for batch in _batches(index_entries(start, through), BATCH):
        if deadline.reached():
            report.complete = False
            break
        report.examined += len(batch)
        since_save += len(batch)
        # Entries later in the current second are not due yet: left for the next run.
        due = [entry for entry in batch if entry.due_at <= now]
        for entry, outcome in zip(due, pool.map(lambda e: _expire_entry(e, now), due), strict=True):
            if isinstance(outcome, Exception):
                report.failures.append(_failure(entry, "expire", outcome))
                blocked = True
                continue
            if not blocked:
                reached = entry.sort_key
            if outcome is not None and outcome.movements:
                report.changed += len(outcome.movements)
        if since_save >= SAVE_EVERY:
            saved, since_save = store(reached), 0
    else:
        if not blocked:
            reached = through
    store(reached)
    if report.changed:
        count("LotsExpired", report.changed)
    return report


def warn_expiring_lots(now: datetime, window: timedelta, deadline: Deadline) -> PassReport:
    """One `CreditsExpiringSoon` per lot with tokens expiring within `window` (SPEC 2.6).

    The whole window is read on every run: it is the set of groups with a lot about to be due.
    """
    report = PassReport()
    if window <= timedelta(0):
        return report
    if deadline.reached():
        report.complete = False
        return report
    window_end = now + window
    for entry in index_entries(position_before(now), position_through(window_end)):
        if deadline.reached():
            report.complete = False
            break
        report.examined += 1
        if not now < entry.due_at <= window_end:
            continue
        try:
            lots = warn_group(entry.user_id, entry.offer_group, now, window_end)
        except Exception as error:
            report.failures.append(_failure(entry, "warn", error))
            continue
        report.changed += len(lots)
    return report


def run_sweep(now: datetime, deadline: Deadline, warn_before_expiry_seconds: int) -> SweepSummary:
    """The scheduled sweep: expiries first (they change balances), then warnings while time remains."""
    expiry = expire_due_lots(now, deadline)
    warning = warn_expiring_lots(now, timedelta(seconds=warn_before_expiry_seconds), deadline)
    summary = SweepSummary(expiry, warning)
    logger.info("expiry sweep", extra={"summary": summary.to_json()})
    return summary
