"""The stream function's use case: from one Accounts stream record, the ledger entries and the events.

Lambda delivers each record at least once, in order per item. Everything done here is derived from
the record alone and repeatable: the ledger items go under deterministic keys with the same content,
a keyed consume's record is completed with the same answer, and the events keep their `eventId`. A
failure raises, the record is reported failed and delivered again (partial batch responses).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from user_credits.config import load_settings
from user_credits.domain.balances import crossed_below
from user_credits.domain.changes import Event, GroupWrite, KeyedRequest, stamped
from user_credits.domain.clock import to_iso
from user_credits.domain.ledger import LedgerEntry
from user_credits.events.publisher import send
from user_credits.observability import count, logger
from user_credits.store import consumption, holds, idempotency, ledger
from user_credits.store.balances import promote_book
from user_credits.store.stream import EventsWrite, Swing, read_record, swing_of


@dataclass
class StreamBatch:
    """One invocation's records. Each is read once; the ledger entries of all of them go first, in
    BatchWriteItem calls of 25 (one round trip per 25 entries instead of one per record: a hot user's
    records all come down one shard); each record is then applied on its own (events, a keyed
    consume's record); last, the markers of the keyed consumes applied are removed, one UpdateItem per
    balance item."""

    # Each record read without a fault, by SequenceNumber: its change and its ledger entries.
    read: dict[str, tuple[GroupWrite | EventsWrite | None, list[LedgerEntry]]] = field(default_factory=dict)
    # Whether those entries are written already (else each record writes its own).
    prewritten: bool = False
    markers: dict[tuple[str, str], list[KeyedRequest]] = field(default_factory=dict)
    # The soonest-expiring hold placed in this batch, per balance item (for the sweep's index).
    placed: dict[tuple[str, str], tuple[datetime, str]] = field(default_factory=dict)
    # Balance items swung to a prepared book: promoted here too, in case the rewrite died before it did.
    swings: list[Swing] = field(default_factory=list)

    @classmethod
    def of(cls, records: Sequence[Mapping[str, Any]]) -> StreamBatch:
        batch = cls()
        for record in records:
            dynamodb = record.get("dynamodb") or {}
            try:
                write = read_record(dynamodb)
                entries = write.entries() if isinstance(write, GroupWrite) else []
            except Exception:
                continue  # read again, and failed, on its own in `apply`
            batch.read[str(dynamodb.get("SequenceNumber"))] = (write, entries)
        entries = [entry for _, found in batch.read.values() for entry in found]
        try:
            ledger.write_entries(entries)
        except Exception:
            # Each record writes its own entries instead (the same items: nothing is written twice).
            logger.warning("the batch's ledger entries were not written at once", exc_info=True)
            return batch
        if entries:
            count("LedgerEntries", len(entries))
        batch.prewritten = True
        return batch

    def apply(self, dynamodb: Mapping[str, Any]) -> None:
        """Apply one record; one that fails raises (Powertools reports it, Lambda delivers it again)."""
        found = self.read.get(str(dynamodb.get("SequenceNumber")))
        if found is not None:
            write, entries = found
            marker = _apply(write, entries, entries_written=self.prewritten)
        else:
            write = read_record(dynamodb)
            marker = _apply(write, write.entries() if isinstance(write, GroupWrite) else [], entries_written=False)
        if marker is not None:
            user_id, offer_group, keyed = marker
            self.markers.setdefault((user_id, offer_group), []).append(keyed)
        swing = swing_of(dynamodb)
        if swing is not None:
            self.swings.append(swing)
        if isinstance(write, GroupWrite) and write.change.hold_until is not None:
            where, placed = (write.user_id, write.offer_group), (write.change.hold_until,
                                                                 str(write.change.movements[0].hold_id))
            self.placed[where] = min(self.placed.get(where, placed), placed)

    def finish(self) -> None:
        """Remove the markers of the keyed consumes applied (their records are completed), bring the
        sweep's index entry of each group with a new hold forward to it, if it is sooner, and promote
        the books that balance items were swung to (`store.balances.promote_book`; a no-op when the
        rewrite did it already)."""
        for (user_id, offer_group), keys in self.markers.items():
            consumption.remove_markers(user_id, offer_group, keys)
        for (user_id, offer_group), (until, hold_id) in self.placed.items():
            holds.index_hold(user_id, offer_group, hold_id, until)
        for swing in self.swings:
            promote_book(swing.user_id, swing.offer_group, swing.version, swing.token)


def _apply(
    write: GroupWrite | EventsWrite | None, entries: list[LedgerEntry], *, entries_written: bool,
) -> tuple[str, str, KeyedRequest] | None:
    """Apply one record's change (None: the record carries none). Returns the (user, group, key) whose
    marker may go, for a keyed consume whose record is now completed."""
    if write is None:
        return None
    events = list(write.change.events)
    marker = None
    if isinstance(write, GroupWrite):
        if entries and not entries_written:
            ledger.write_entries(entries)
            count("LedgerEntries", len(entries))
        keyed = write.change.keyed
        if keyed is not None:
            status, answer = _keyed_answer(write)
            if not idempotency.complete(keyed.record_key, keyed.request_hash, status, answer):
                # Its record expired and was claimed again by another body (or is gone): nothing to keep.
                logger.warning("a keyed consume's record was not there to complete",
                               extra={"user_id": write.user_id, "offer_group": write.offer_group})
                count("KeyRecordsMissing")
            # Its marker may go only once the record is completed (see store.consumption).
            marker = (write.user_id, write.offer_group, keyed)
        low = _low_balance(write)
        if low is not None:
            events.append(low)
    if events:
        send(stamped(write.change.change_id, events))
    if isinstance(write, GroupWrite) and (drawn := _drawn(write)) is not None:
        count(drawn)
    return marker


def _drawn(write: GroupWrite) -> str | None:
    """`Consumes` or `HoldsPlaced` for the record of a consume's or a hold's one write (its one movement,
    `consume` with no hold, or `hold`). Counted here, where its ledger entry is written, and not in the
    handler: the hot route then prints no EMF line per request (~0.05 ms of its CPU, one log line per
    consume). Like the events, at least once: a batch delivered again counts again."""
    if len(write.change.movements) != 1:
        return None
    movement = write.change.movements[0]
    if movement.reason == "hold":
        return "HoldsPlaced"
    return "Consumes" if movement.reason == "consume" and movement.hold_id is None else None


def _keyed_answer(write: GroupWrite) -> tuple[int, dict[str, Any]]:
    """The answer a keyed consume (or hold) gave, from its write: what its key's record keeps."""
    movement = write.change.movements[0]
    if movement.reason == "hold":
        ref = holds.parse_ref(str(movement.hold_id))
        assert ref is not None and write.change.hold_until is not None
        return 201, consumption.hold_receipt(write.user_id, ref, write.balance_after, write.change.hold_until)
    return 200, consumption.receipt(write.user_id, write.offer_group, -movement.delta, write.balance_after,
                                    write.expires_at)


def _low_balance(write: GroupWrite) -> Event | None:
    """SPEC 2.7: the consumption (or hold: it spends like one) whose write took the balance from >=
    threshold to < threshold. The images before and after are those of one conditional write, so no
    two see the same crossing."""
    if not any(movement.reason in ("consume", "hold") for movement in write.change.movements):
        return None
    threshold = load_settings().low_balance_thresholds.get(write.offer_group)
    if not crossed_below(threshold, write.balance_before, write.balance_after):
        return None
    return Event("CreditsLow", {
        "userId": write.user_id, "offerGroup": write.offer_group, "balance": write.balance_after,
        "expiresAt": to_iso(write.expires_at), "threshold": threshold,
    })
