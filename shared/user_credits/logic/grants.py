"""Admin grants: promotional or corrective credits (ledger reason `grant`), idempotent with a key.

Rules (documented in README):
- A positive grant is a lot of its own (SPEC 1): its `expiresAt` (null = never) and `priority`
  (default 50) are the lot's. Like a purchase, it never shortens the group, and lots already expired
  leave first, each with its own `expire` entry.
- A negative (corrective) grant is no lot: it is taken from the live lots in spending order, never
  takes the balance below 0 (402 insufficient_credits with the balance), never sets an expiry or a
  priority (refused with it), and cannot correct a group whose lots have all expired (402
  credits_expired: the sweep zeroes it).
- `expiresAt` must be in the future: a grant that is already expired is a mistake.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from user_credits.domain.changes import Event
from user_credits.domain.clock import to_iso, utc_now
from user_credits.domain.lots import DEFAULT_PRIORITY, Book, Movement, NewLot
from user_credits.errors import ValidationFailed
from user_credits.logic import expiry
from user_credits.logic.consumption import require_credits
from user_credits.observability import count
from user_credits.store.balances import GroupState, stage_group_change
from user_credits.store.idempotency import lookup, request_hash, scoped_key, stage_record
from user_credits.store.transactions import commit, optimistic

GRANT_ROUTE = "grant"


@dataclass(frozen=True)
class GrantResult:
    status: int
    body: Any
    fresh: bool


@dataclass(frozen=True)
class GrantPlan:
    movements: list[Movement]
    book: Book
    lot_id: str | None


def plan_grant(
    before: GroupState, tokens: int, expires_at: datetime | None, key: str | None, now: datetime,
    note: str | None = None, priority: int | None = None,
) -> GrantPlan:
    """The movements and the book after, or a refusal (pure: no I/O)."""
    if expires_at is not None and expires_at <= now:
        raise ValidationFailed("expiresAt must be in the future")
    if tokens < 0:
        if expires_at is not None:
            raise ValidationFailed("a negative grant cannot set expiresAt")
        if priority is not None:
            raise ValidationFailed("a negative grant is no lot, so it cannot set priority")
        require_credits(before.book, -tokens, 0, now, short="a corrective grant cannot take the balance below 0")
        book, movements = before.book.expire(now)
        book, _ = book.take(-tokens)
        movements.append(Movement(tokens, "grant", idempotency_key=key, note=note))
        return GrantPlan(movements, book, None)
    book, movements = before.book.expire(now)
    lot_id = f"grant-{uuid.uuid4().hex}"
    new = NewLot(lot_id, "grant", tokens, now, expires_at, DEFAULT_PRIORITY if priority is None else priority)
    book, movement = book.credit(new, "grant")
    movements.append(replace(movement, idempotency_key=key, note=note))
    return GrantPlan(movements, book, lot_id)


def grant_credits(
    user_id: str, offer_group: str, tokens: int, expires_at: datetime | None, note: str | None,
    priority: int | None, key: str | None, request_body: dict[str, Any],
) -> GrantResult:
    """Grant (or correct) credits; the request's free-text `reason` is the ledger entry's `note` and
    travels in the CreditsGranted event."""
    record_key = None if key is None else scoped_key(user_id, GRANT_ROUTE, key)
    body_hash = request_hash(request_body)

    def attempt() -> GrantResult:
        if record_key is not None:
            # Inside the loop: a concurrent duplicate that commits first makes our transaction fail
            # on the record's condition, and the next attempt replays its response.
            stored = lookup(record_key, body_hash)
            if stored is not None:
                return GrantResult(stored.status_code, stored.body, fresh=False)
        now = utc_now()
        before = expiry.read_touched(user_id, offer_group, now)
        plan = plan_grant(before, tokens, expires_at, key, now, note, priority)
        body: dict[str, Any] = {}

        def answer(after: GroupState) -> list[Event]:
            body.update({"userId": user_id, "offerGroup": offer_group, "balance": after.book.spendable(now),
                         "expiresAt": to_iso(after.expires_at), "lotId": plan.lot_id})
            if tokens <= 0:
                return []
            return [Event("CreditsGranted", {**body, "tokens": tokens, "reason": "grant", "note": note})]

        def build(tx: Any) -> None:
            stage_group_change(tx, before, plan.movements, plan.book, now, events=answer)
            if record_key is not None:
                stage_record(tx, record_key, body_hash, 201, dict(body), now)

        commit(build)
        return GrantResult(201, body, fresh=True)

    result = optimistic(attempt)
    if result.fresh:
        count("Grants")
    return result
