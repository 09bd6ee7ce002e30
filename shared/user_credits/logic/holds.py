"""SPEC 2.9: holds. Reserve tokens before the work, settle the real cost after.

- Placing a hold is a debit like a consume (`logic.consumption.draw`): one conditional UpdateItem of
  the balance item (two calls with an Idempotency-Key), which also writes the hold on that item.
- Settling or releasing is one conditional UpdateItem of the same item (`store.holds.close`): the
  balance gets back what is returned, or loses a settle's excess under SPEC 2.5's condition. Which
  lots the returned tokens go back to is derived from the item's stamps (`domain.lots.replay`).
- When that one write cannot be exact (a lot the hold took from has expired, so those tokens expire
  instead; a hold or lot is due), the close is a rewrite of the group (`_close_by_rewrite`), which also
  releases due holds and folds the others into the book. When only too many hold events wait for the
  book, they are folded by a rewrite without a transaction, and the plain close goes again.
- A repeated close: the hold's outcome stays on the item until the next rewrite, then in an
  Idempotency record for a day; the same call replays it, any other is 409 `hold_closed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pynamodb.transactions import TransactWrite

from user_credits.domain.clock import utc_now
from user_credits.errors import HoldClosed, HoldNotFound, InsufficientCredits
from user_credits.logic import consumption, expiry
from user_credits.observability import count
from user_credits.store import holds as store
from user_credits.store.balances import read_group, rewrite_group, stage_group_change
from user_credits.store.consumption import gates_open
from user_credits.store.models import group_sk
from user_credits.store.transactions import StaleRead, commit, optimistic


@dataclass(frozen=True)
class HoldResult:
    status: int
    body: Any


def place_hold(
    user_id: str, offer_group: str, tokens: int, max_overdraft: int, ttl_seconds: int,
    idempotency_key: str | None, request_body: dict[str, Any],
) -> HoldResult:
    """201 {"holdId", "userId", "offerGroup", "tokens", "balance", "expiresAt"} (expiresAt: the hold's).

    Raises InsufficientCredits / CreditsExpired (402), IdempotencyKeyReused (422), ServiceBusy (503)."""
    result = consumption.draw(user_id, offer_group, tokens, max_overdraft, idempotency_key, request_body,
                              hold_for=timedelta(seconds=ttl_seconds))
    return HoldResult(result.status, result.body)


def settle_hold(user_id: str, hold_id: str, tokens: int, max_overdraft: int) -> dict[str, Any]:
    """200 {"holdId", "settled", "released", "balance", "status": "settled"}.

    Raises HoldNotFound (404), HoldClosed (409), InsufficientCredits / CreditsExpired (402), ServiceBusy."""
    return _close(user_id, hold_id, "settled", tokens, max_overdraft)


def release_hold(user_id: str, hold_id: str) -> dict[str, Any]:
    """200 {"holdId", "settled": 0, "released", "balance", "status": "released"}.

    Raises HoldNotFound (404), HoldClosed (409), ServiceBusy (503)."""
    return _close(user_id, hold_id, "released", 0, 0)


def _close(user_id: str, hold_id: str, status: str, settled: int, max_overdraft: int) -> dict[str, Any]:
    ref = store.parse_ref(hold_id)
    if ref is None:
        raise HoldNotFound("no such hold")
    closing = store.Closing(ref, status, settled, max_overdraft)
    now = utc_now()
    key = {"userId": {"S": user_id}, "sk": {"S": group_sk(ref.offer_group)}}

    def attempt() -> store.Outcome:
        try:
            balance = store.close(closing, now, key)
        except store.AlreadyClosed as closed:
            return _replay(closed.outcome, closing)
        except store.HoldGone:
            return _remembered(user_id, closing, now)
        except store.InsufficientForExcess as short:
            count("HoldSettleRefusals")
            raise InsufficientCredits("not enough credits in this group for the settle's excess",
                                      balance=short.balance) from short
        except store.HoldNeedsRewrite:
            return _close_by_rewrite(user_id, closing, now)
        count("HoldsClosed")
        return store.Outcome(ref.hold_id, status, settled, closing.returned, balance)

    return optimistic(attempt, attempts=10, base_delay=0.004, metric="HoldRetries").body()


def _replay(outcome: store.Outcome, closing: store.Closing) -> store.Outcome:
    if outcome.same_call(closing.status, closing.settled):
        return outcome
    raise HoldClosed(f"the hold was already {outcome.status}")


def _remembered(user_id: str, closing: store.Closing, now: datetime) -> store.Outcome:
    """A hold no longer on its balance item: its remembered outcome, or it never was (404)."""
    outcome = store.archived(user_id, closing.ref.hold_id, now)
    if outcome is None:
        raise HoldNotFound("no such hold")
    return _replay(outcome, closing)


def _close_by_rewrite(user_id: str, closing: store.Closing, now: datetime) -> store.Outcome:
    """The close as a rewrite of the group: due lots expire, due holds are released, then this one."""
    ref = closing.ref
    state = read_group(user_id, ref.offer_group)
    on_item = next((hold for hold in state.holds if hold.ref.rid == ref.rid), None)
    if on_item is None or on_item.ref.tokens != ref.tokens:
        return _remembered(user_id, closing, now)
    if on_item.outcome is not None:
        return _replay(on_item.outcome, closing)
    if gates_open(state, now) and (on_item.lots_expire is None or on_item.lots_expire > now):
        # Refused only at the gate of waiting hold events, and another writer has folded them since:
        # the plain close passes now (folding again would race that writer's next write).
        raise StaleRead("the group's gates are open again")
    book, movements = state.book.expire(now)
    book, releases, outcomes = expiry.release_due(book, now)
    movements += releases
    lots_expire = book.hold_lots_expiry(ref.hold_id)
    if not movements and (lots_expire is None or lots_expire > now):
        # Nothing is due: only the gate of waiting hold events refused the close. Fold them without a
        # transaction (one would make every concurrent write of the item fail on AWS), then close plainly.
        rewrite_group(state, [], book, now)
        raise StaleRead("the hold events were folded")
    mine = next((outcome for outcome in outcomes if outcome.hold_id == ref.hold_id), None)
    held = book.held(ref.hold_id)
    if mine is None and (held is None or held.expires_at <= now):
        # It is due, but more holds are due than one rewrite releases: release them all, then again.
        expiry.expire_group(user_id, ref.offer_group, now)
        raise StaleRead("due holds were being released")
    # A hold that was due is released by this touch, before the call (SPEC 2.9): the call then
    # replays that outcome if it is a release, and is refused as `hold_closed` if it is a settle.
    if mine is None:
        balance = state.balance + sum(move.delta for move in movements)
        book, moves = expiry.close_in_book(book, ref.hold_id, closing.settled)
        returned = sum(move.delta for move in moves if move.reason == "release")
        available = balance + returned + sum(move.delta for move in moves if move.reason == "expire")
        if closing.excess and available - closing.excess < -closing.max_overdraft:
            count("HoldSettleRefusals")
            raise InsufficientCredits("not enough credits in this group for the settle's excess", balance=balance)
        movements += moves
        mine = store.Outcome(ref.hold_id, closing.status, closing.settled, returned,
                             balance + sum(move.delta for move in moves))
        outcomes.append(mine)
    events = expiry.expired_events(state, movements, now)

    def build(tx: TransactWrite) -> None:
        stage_group_change(tx, state, movements, book, now, events=events, closed=outcomes)

    commit(build)
    count("HoldsClosed")
    return _replay(mine, closing)
