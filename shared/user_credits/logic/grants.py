"""Admin grants: promotional or corrective credits (ledger reason `grant`), idempotent with a key.

Rules (documented in README):
- A positive grant adds tokens. With `expiresAt` the group's expiry becomes the later of the old and
  the new (null = never), as for a purchase: a grant never shortens a group. Without `expiresAt`
  the group keeps its expiry (a new group never expires).
- A grant into an expired group first expires the remainder (an `expire` entry), then the group
  starts afresh with the grant's `expiresAt` (null = never).
- A negative (corrective) grant never takes the balance below 0 (402 insufficient_credits with the
  balance), never changes the expiry (so `expiresAt` is refused with it), and cannot correct an
  expired group (402 credits_expired: the sweep zeroes it).
- `expiresAt` must be in the future: a grant that is already expired is a mistake.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from user_credits.domain.clock import to_iso, utc_now
from user_credits.domain.crediting import GroupSnapshot, expire_remainder
from user_credits.domain.durations import later_expiry
from user_credits.errors import CreditsExpired, InsufficientCredits, ValidationFailed
from user_credits.events.publisher import publish
from user_credits.observability import count
from user_credits.store.balances import EntryDraft, GroupState, read_group, stage_group_change
from user_credits.store.idempotency import lookup, request_hash, scoped_key, stage_record
from user_credits.store.transactions import commit, optimistic

GRANT_ROUTE = "grant"


@dataclass(frozen=True)
class GrantResult:
    status: int
    body: Any
    fresh: bool


def plan_grant(
    before: GroupState, tokens: int, expires_at: datetime | None, key: str | None, now: datetime,
    note: str | None = None,
) -> tuple[list[EntryDraft], datetime | None]:
    """The ledger drafts and the group's new expiry, or a refusal (pure: no I/O)."""
    if expires_at is not None and expires_at <= now:
        raise ValidationFailed("expiresAt must be in the future")
    expired = before.exists and before.expires_at is not None and before.expires_at <= now
    if tokens < 0:
        if expires_at is not None:
            raise ValidationFailed("a negative grant cannot set expiresAt")
        if expired:
            raise CreditsExpired("the credits of this group have expired", balance=before.balance)
        if before.balance + tokens < 0:
            raise InsufficientCredits("a corrective grant cannot take the balance below 0", balance=before.balance)
        return [EntryDraft(tokens, "grant", idempotency_key=key, note=note)], before.expires_at
    # The same rule as a purchase: an expired group's remainder goes first, on its own ledger entry.
    snapshot = GroupSnapshot(before.offer_group, before.balance, before.expires_at, before.exists)
    remainder, _ = expire_remainder(snapshot, now)
    drafts = [EntryDraft(change.delta, change.reason) for change in remainder]
    if expired or not before.exists:
        new_expiry = expires_at
    elif expires_at is None:
        new_expiry = before.expires_at
    else:
        new_expiry = later_expiry(before.expires_at, expires_at)
    drafts.append(EntryDraft(tokens, "grant", idempotency_key=key, note=note))
    return drafts, new_expiry


def grant_credits(
    user_id: str, offer_group: str, tokens: int, expires_at: datetime | None, note: str | None, key: str | None,
    request_body: dict[str, Any],
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
        before = read_group(user_id, offer_group)
        drafts, new_expiry = plan_grant(before, tokens, expires_at, key, now, note)
        body: dict[str, Any] = {}

        def build(tx: Any) -> None:
            after, _ = stage_group_change(tx, before, drafts, new_expiry, now)
            body.update({"userId": user_id, "offerGroup": offer_group, "balance": after.balance,
                         "expiresAt": to_iso(after.expires_at)})
            if record_key is not None:
                stage_record(tx, record_key, body_hash, 201, dict(body), now)

        commit(build)
        return GrantResult(201, body, fresh=True)

    result = optimistic(attempt)
    if result.fresh:
        count("Grants")
    if result.fresh and tokens > 0:
        publish("CreditsGranted", {**result.body, "tokens": tokens, "reason": "grant", "note": note})
    return result
