"""What a user holds (one Query) and the history of how it changed (the ledger, newest first)."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, Final

from user_credits.domain.clock import to_iso, utc_now
from user_credits.domain.orders import PAID_STATUSES
from user_credits.errors import ValidationFailed
from user_credits.store import ledger as ledger_store
from user_credits.store import subscriptions as subscription_store
from user_credits.store.balances import partition, states_of, untorn
from user_credits.store.orders import orders_among

# Orders that still stand for credits the user bought: the one definition of a paid order.
LISTED_ORDER_STATUSES = PAID_STATUSES


def credits_of(user_id: str) -> dict[str, Any]:
    """Balances, their live lots and paid orders from ONE Query of the user's partition.

    The balance counts live lots only (SPEC 2.5), whether or not the sweep has expired the others yet,
    and each lot's `remaining` includes every consume so far (the book is burned as it is read).
    """
    # A rewrite that commits while the Query reads the partition tears a balance from its book: read again.
    return untorn(lambda: _credits_once(user_id), "the credits of this user")


def _credits_once(user_id: str) -> dict[str, Any]:
    now = utc_now()
    items = list(partition(user_id))
    groups: list[dict[str, Any]] = []
    orders = [order.to_json() for order in orders_among(items) if order.status in LISTED_ORDER_STATUSES]
    # A Query is read-committed per item, not a snapshot: `states_of` refuses a torn balance/book pair.
    for state in states_of(items):
        book = state.book
        groups.append({
            "offerGroup": state.offer_group, "balance": book.spendable(now), "expiresAt": to_iso(book.expires_at),
            "lots": [lot.to_json() for lot in book.live_lots(now)],
        })
    groups.sort(key=lambda g: g["offerGroup"])
    orders.sort(key=lambda o: (o["createdAt"] or "", o["orderId"]), reverse=True)
    return {"userId": user_id, "groups": groups, "orders": orders}


def subscriptions_of(user_id: str) -> dict[str, Any]:
    """GET subscriptions: each of the user's Stripe subscriptions as the webhook last learnt it."""
    return {"subscriptions": [s.to_json() for s in subscription_store.list_subscriptions(user_id)]}


DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 1000
_ENTRY_KEY = re.compile(r"^\d{8}T\d{6}\.\d{6}#[A-Za-z0-9_\-.:@]{1,128}#\d{12}$")


def encode_cursor(entry_key: str) -> str:
    """Opaque to clients; it only names the last entry seen, so the user and group come from the
    request, never from the cursor (a cursor cannot open someone else's ledger)."""
    raw = json.dumps({"after": entry_key}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        after = json.loads(raw)["after"]
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise ValidationFailed("cursor is not a cursor this service returned") from exc
    if not isinstance(after, str) or not _ENTRY_KEY.fullmatch(after):
        raise ValidationFailed("cursor is not a cursor this service returned")
    return after


def ledger_of(user_id: str, offer_group: str | None, limit: int, cursor: str | None) -> dict[str, Any]:
    after = None if cursor is None else decode_cursor(cursor)
    page = ledger_store.read_page(user_id, offer_group, limit, after)
    return {
        "items": [entry.to_json() for entry in page.entries],
        "nextCursor": None if page.last_key is None else encode_cursor(page.last_key),
    }
