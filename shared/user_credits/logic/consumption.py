"""SPEC 2.5, 2.7, 2.8 for consumption: decide in the store, then tell the world about low balances."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from user_credits.config import load_settings
from user_credits.domain.balances import crossed_below
from user_credits.domain.clock import to_iso, utc_now
from user_credits.errors import CreditsExpired, InsufficientCredits
from user_credits.events.publisher import publish
from user_credits.observability import count
from user_credits.store import consumption as store
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
    try:
        if idempotency_key is None:
            debit = store.debit(user_id, offer_group, tokens, max_overdraft, now)
        else:
            outcome = store.debit_once(
                user_id, offer_group, tokens, max_overdraft, now, idempotency_key,
                scoped_key(user_id, store.CONSUME_ROUTE, idempotency_key), request_hash(request_body),
            )
    except (InsufficientCredits, CreditsExpired):
        count("ConsumeRefusals")
        raise
    if idempotency_key is not None:
        if outcome.replay is not None:
            # A replay changed nothing, so it announces nothing: the first request did.
            return ConsumeResult(outcome.replay.status_code, outcome.replay.body)
        assert outcome.debit is not None
        debit = outcome.debit
    count("Consumes")
    announce_low_balance(debit)
    return ConsumeResult(200, debit.receipt())


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
