"""SPEC 2.5, 2.7, 2.8 for consumption: decide in the store, then tell the world about low balances."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from user_credits.config import load_settings
from user_credits.domain.balances import crossed_below
from user_credits.domain.clock import to_iso, utc_now
from user_credits.domain.lots import Book
from user_credits.errors import CreditsExpired, InsufficientCredits, ServiceBusy
from user_credits.events.publisher import publish
from user_credits.logic import expiry
from user_credits.observability import count
from user_credits.store import consumption as store
from user_credits.store.balances import read_group
from user_credits.store.idempotency import request_hash, scoped_key


@dataclass(frozen=True)
class ConsumeResult:
    status: int
    body: Any


def consume_tokens(
    user_id: str, offer_group: str, tokens: int, max_overdraft: int, idempotency_key: str | None,
    request_body: dict[str, Any],
) -> ConsumeResult:
    """Consume `tokens`; with an Idempotency-Key a repeat replays the first response instead."""
    now = utc_now()

    def decide() -> store.Debit | store.KeyedOutcome:
        if idempotency_key is None:
            return store.debit(user_id, offer_group, tokens, max_overdraft, now)
        return store.debit_once(
            user_id, offer_group, tokens, max_overdraft, now, idempotency_key,
            scoped_key(user_id, store.CONSUME_ROUTE, idempotency_key), request_hash(request_body),
        )

    try:
        try:
            decided = decide()
        except store.LotsDue:
            # Decided on the group as it is now (consumes since the refusal are in its balance), with
            # only its live lots: refused here, nothing is written.
            require_credits(read_group(user_id, offer_group).book, tokens, max_overdraft, now)
            # It would pass once the due lots are gone: expire them (a rewrite), then decide again.
            expiry.publish_expiry(expiry.expire_group(user_id, offer_group, now), now)
            try:
                decided = decide()
            except store.LotsDue as again:
                raise ServiceBusy("the credits of this group are being expired, retry shortly") from again
    except (InsufficientCredits, CreditsExpired):
        count("ConsumeRefusals")
        raise
    if isinstance(decided, store.Debit):
        debit = decided
    elif decided.replay is not None:
        # A replay changed nothing, so it announces nothing: the first request did.
        return ConsumeResult(decided.replay.status_code, decided.replay.body)
    else:
        assert decided.debit is not None
        debit = decided.debit
    count("Consumes")
    announce_low_balance(debit)
    return ConsumeResult(200, debit.receipt())


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


def announce_low_balance(debit: store.Debit) -> None:
    """SPEC 2.7: the one request whose atomic update crossed the threshold sends the one event.

    balance_before/after come from the same conditional update, so no two consumptions can both
    see the same downward crossing. Sent after the commit; a failed send is logged and counted by
    the publisher and never fails the consume.
    """
    threshold = load_settings().low_balance_thresholds.get(debit.offer_group)
    if crossed_below(threshold, debit.balance_before, debit.balance_after):
        publish("CreditsLow", {
            "userId": debit.user_id, "offerGroup": debit.offer_group, "balance": debit.balance_after,
            "expiresAt": to_iso(debit.expires_at), "threshold": threshold,
        })
