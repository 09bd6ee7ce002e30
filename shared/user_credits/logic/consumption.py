"""SPEC 2.5 and 2.8 for consumption: decide in the store; the ledger and CreditsLow follow from the stream."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Final

from user_credits.domain.changes import KeyedRequest
from user_credits.domain.clock import utc_now
from user_credits.domain.lots import Book
from user_credits.errors import CreditsExpired, InsufficientCredits, ServiceBusy
from user_credits.logic import expiry
from user_credits.observability import count
from user_credits.store import consumption as store
from user_credits.store import holds
from user_credits.store.balances import read_group
from user_credits.store.idempotency import StoredResponse, request_hash, scoped_key


@dataclass(frozen=True)
class ConsumeResult:
    status: int
    body: Any


def consume_tokens(
    user_id: str, offer_group: str, tokens: int, max_overdraft: int, idempotency_key: str | None,
    request_body: dict[str, Any],
) -> ConsumeResult:
    """Consume `tokens`; with an Idempotency-Key a repeat replays the first response instead.

    The ledger entry and CreditsLow follow from the table's stream (`logic.stream`).
    """
    return draw(user_id, offer_group, tokens, max_overdraft, idempotency_key, request_body)


def draw(
    user_id: str, offer_group: str, tokens: int, max_overdraft: int, idempotency_key: str | None,
    request_body: dict[str, Any], hold_for: timedelta | None = None,
) -> ConsumeResult:
    """Take `tokens` by SPEC 2.5: a consume, or with `hold_for` a hold placed for that long (SPEC 2.9,
    answered 201). With an Idempotency-Key a repeat replays the first response instead."""
    now = utc_now()
    route = store.CONSUME_ROUTE if hold_for is None else holds.HOLD_ROUTE
    keyed = None if idempotency_key is None else KeyedRequest(
        idempotency_key, scoped_key(user_id, route, idempotency_key), request_hash(request_body))
    placing = None
    if hold_for is not None:
        # A keyed hold's id comes from its key and body: every attempt of it places the same hold.
        seed = None if keyed is None else f"{keyed.record_key}#{keyed.request_hash}"
        placing = store.Placing(holds.new_ref(offer_group, tokens, seed), now + hold_for)
    for _ in range(CLAIMS):
        unfinished = False
        if keyed is not None:
            claim = store.claim(keyed, now)
            if claim.replay is not None:
                # A replay changed nothing: the first request did.
                return ConsumeResult(claim.replay.status_code, claim.replay.body)
            unfinished = claim.unfinished
            if unfinished and not _settled(claim.claimed_at, now):
                # The first attempt may still be on its way: only a marker (it debited) answers now.
                marked = store.marked(user_id, offer_group, tokens, keyed, placing)
                if marked is None:
                    raise ServiceBusy("the first request with this Idempotency-Key is still in progress, "
                                      "retry shortly")
                return ConsumeResult(marked.status_code, marked.body)
        try:
            decided = _decide(user_id, offer_group, tokens, max_overdraft, now, keyed, unfinished, placing)
        except store.KeyFinished:
            continue
        except (InsufficientCredits, CreditsExpired):
            if keyed is not None:
                store.release(keyed)
            raise
        if isinstance(decided, StoredResponse):
            return ConsumeResult(decided.status_code, decided.body)
        # `Consumes` and `HoldsPlaced` are counted from the write's stream record (logic.stream).
        return ConsumeResult(200 if placing is None else 201, decided.receipt())
    raise ServiceBusy("the first request with this Idempotency-Key is still being recorded, retry shortly")


# A key whose record keeps changing under us (completed, expired) is claimed again at most this often.
CLAIMS: Final = 3
# Rounds of fold-then-write for a writer refused at the gate of waiting hold events (see `_decide`).
GATE_ROUNDS: Final = 4


def _settled(claimed_at: datetime | None, now: datetime) -> bool:
    """Whether an unfinished claim is old enough that its request can no longer land its debit."""
    return claimed_at is not None and (now - claimed_at).total_seconds() >= store.HOLD_SECONDS


def _decide(
    user_id: str, offer_group: str, tokens: int, max_overdraft: int, now: datetime, keyed: KeyedRequest | None,
    unfinished: bool, placing: store.Placing | None = None,
) -> store.Debit | StoredResponse:
    def attempt() -> store.Debit | StoredResponse:
        current = placing
        for _ in range(CLAIMS):
            try:
                return store.debit(user_id, offer_group, tokens, max_overdraft, now, keyed, unfinished=unfinished,
                                   placing=current)
            except store.LowerHoldDue:
                # This hold expires before the item's holdDue: the second attempt lowers it.
                assert current is not None
                current = replace(current, lower_due=True)
            except store.HoldDueMoved:
                current = replace(current, lower_due=False) if current is not None else None
        raise ServiceBusy("the holds of this group keep changing, retry shortly")

    try:
        try:
            return attempt()
        except store.LotsDue as refused:
            # Decided on the group as it is now (consumes since the refusal are in its balance), with
            # only its live lots: refused here, nothing is written.
            book, _ = read_group(user_id, offer_group).book.expire(now)
            require_credits(book.without_due_holds(now), tokens, max_overdraft, now)
            # It would pass once the due lots (or holds) are gone: a rewrite, then decide again. Refused
            # only at the gate of waiting hold events, other writers may fill it again before this one
            # writes: a few rounds, each folding only if nobody else has.
            gate_only = isinstance(refused, store.HoldsWaiting)
            for _ in range(GATE_ROUNDS if gate_only else 1):
                expiry.expire_group(user_id, offer_group, now, unless_open=gate_only)
                try:
                    return attempt()
                except store.HoldsWaiting:
                    continue
                except store.LotsDue as again:
                    raise ServiceBusy("the credits of this group are being expired, retry shortly") from again
            raise ServiceBusy("the holds of this group are being folded, retry shortly") from refused
    except (InsufficientCredits, CreditsExpired):
        count("ConsumeRefusals")
        raise


def require_credits(
    book: Book, tokens: int, max_overdraft: int, now: datetime, short: str = "not enough credits in this group",
) -> None:
    """SPEC 2.5 on a group's book, the one copy the read-then-write paths use: taking `tokens` must leave
    the live lots' balance at or above -maxOverdraft. A refusal is `credits_expired` when the group has
    lots and all have expired, else `insufficient_credits` (with `short` as its message)."""
    spendable = book.spendable(now)
    if spendable - tokens >= -max_overdraft:
        return
    if book.all_expired(now):
        raise CreditsExpired("the credits of this group have expired", balance=spendable)
    raise InsufficientCredits(short, balance=spendable)
