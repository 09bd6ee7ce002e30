"""A change: what one write to a balance (or an order) did, carried on the item it wrote.

Every write that changes a balance sets the item's `change` attribute: a fresh id, the instant, its
movements in order, and the events it must send. The table's stream then shows the item before and
after; the stream function turns that pair into ledger entries and events (`entries`, `event_id`),
so both follow from the write itself: a function that dies right after its write loses neither.

Everything here is derived from the two images alone, so a redelivered stream record gives the same
ledger items under the same keys and the same events under the same ids.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from user_credits.domain.clock import from_iso, to_iso
from user_credits.domain.ledger import LedgerEntry
from user_credits.domain.lots import Movement


@dataclass(frozen=True)
class Event:
    """One event to send to EventBridge (SPEC 4); `eventId` is added when it is sent."""

    detail_type: str
    detail: Mapping[str, Any]


@dataclass(frozen=True)
class KeyedRequest:
    """The Idempotency-Key record a keyed consume must complete with its answer."""

    key: str  # the Idempotency-Key as the caller sent it
    record_key: str  # its record's key (scoped per user and route)
    request_hash: str


@dataclass(frozen=True)
class Change:
    change_id: str
    at: datetime
    movements: tuple[Movement, ...] = ()
    events: tuple[Event, ...] = ()
    keyed: KeyedRequest | None = None
    # A hold placed by this write expires then (its keyed answer, and the sweep's index, need it).
    hold_until: datetime | None = None

    def to_json(self) -> str:
        body: dict[str, Any] = {"id": self.change_id, "at": to_iso(self.at)}
        if self.movements:
            body["movements"] = [_movement_json(m) for m in self.movements]
        if self.events:
            body["events"] = [{"type": e.detail_type, "detail": dict(e.detail)} for e in self.events]
        if self.keyed is not None:
            body["keyed"] = {"key": self.keyed.key, "record": self.keyed.record_key, "hash": self.keyed.request_hash}
        if self.hold_until is not None:
            body["holdUntil"] = to_iso(self.hold_until)
        return json.dumps(body, separators=(",", ":"), default=str)

    @classmethod
    def from_json(cls, text: str) -> Change:
        body = json.loads(text)
        keyed = body.get("keyed")
        return cls(
            change_id=body["id"], at=from_iso(body["at"]),
            movements=tuple(_movement(m) for m in body.get("movements", [])),
            events=tuple(Event(e["type"], e["detail"]) for e in body.get("events", [])),
            keyed=KeyedRequest(keyed["key"], keyed["record"], keyed["hash"]) if keyed else None,
            hold_until=from_iso(body["holdUntil"]) if body.get("holdUntil") else None,
        )


_MOVEMENT_FIELDS = {"lotId": "lot_id", "shortfall": "shortfall", "orderId": "order_id",
                    "key": "idempotency_key", "note": "note", "holdId": "hold_id",
                    "subscriptionId": "subscription_id"}


def _movement_json(movement: Movement) -> dict[str, Any]:
    body: dict[str, Any] = {"delta": movement.delta, "reason": movement.reason}
    for name, attribute in _MOVEMENT_FIELDS.items():
        value = getattr(movement, attribute)
        if value is not None:
            body[name] = value
    return body


def _movement(body: Mapping[str, Any]) -> Movement:
    extra = {attribute: body[name] for name, attribute in _MOVEMENT_FIELDS.items() if name in body}
    return Movement(delta=int(body["delta"]), reason=str(body["reason"]), **extra)


@dataclass(frozen=True)
class GroupWrite:
    """A balance item's change as the stream shows it: the item's seq and balance before and after."""

    user_id: str
    offer_group: str
    change: Change
    seq_before: int
    balance_before: int
    seq_after: int
    balance_after: int
    expires_at: datetime | None = None

    def entries(self) -> list[LedgerEntry]:
        """One entry per movement, `seq` from the item's seq before, `balanceAfter` from its balance."""
        balance, seq = self.balance_before, self.seq_before
        entries = []
        for movement in self.change.movements:
            balance += movement.delta
            seq += 1
            entries.append(LedgerEntry(
                user_id=self.user_id, offer_group=self.offer_group, delta=movement.delta, balance_after=balance,
                reason=movement.reason, at=self.change.at, seq=seq, order_id=movement.order_id,
                idempotency_key=movement.idempotency_key, shortfall=movement.shortfall, note=movement.note,
                lot_id=movement.lot_id, hold_id=movement.hold_id, subscription_id=movement.subscription_id,
            ))
        if (balance, seq) != (self.balance_after, self.seq_after):
            # A write whose movements do not explain it: a bug, never to be papered over in the ledger.
            raise ValueError(
                f"change {self.change.change_id} of {self.user_id}/{self.offer_group}: movements give "
                f"balance {balance} seq {seq}, the item has {self.balance_after} and {self.seq_after}"
            )
        return entries


def event_id(change_id: str, index: int, detail_type: str) -> str:
    """Stable across redeliveries: the same change's n-th event always has the same id."""
    return hashlib.sha256(f"{change_id}#{index}#{detail_type}".encode()).hexdigest()[:32]


def stamped(change_id: str, events: Sequence[Event]) -> list[Event]:
    """The events with their `eventId` (SPEC 4)."""
    return [Event(e.detail_type, {**e.detail, "eventId": event_id(change_id, i, e.detail_type)})
            for i, e in enumerate(events)]
