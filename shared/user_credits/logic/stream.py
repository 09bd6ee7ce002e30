"""The stream function's use case: from one Accounts stream record, the ledger entries and the events.

Lambda delivers each record at least once, in order per item. Everything done here is derived from
the record alone and repeatable: the ledger items go under deterministic keys with the same content,
a keyed consume's record is completed with the same answer, and the events keep their `eventId`. A
failure raises, the record is reported failed and delivered again (partial batch responses).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from user_credits.config import load_settings
from user_credits.domain.balances import crossed_below
from user_credits.domain.changes import Event, GroupWrite, stamped
from user_credits.domain.clock import to_iso
from user_credits.events.publisher import send
from user_credits.observability import count
from user_credits.store import consumption, idempotency, ledger
from user_credits.store.stream import read_record


def apply_record(dynamodb: Mapping[str, Any]) -> None:
    """Apply one stream record (its `dynamodb` part); records without a change are skipped."""
    write = read_record(dynamodb)
    if write is None:
        return
    events = list(write.change.events)
    if isinstance(write, GroupWrite):
        entries = write.entries()
        if entries:
            ledger.write_entries(entries)
            count("LedgerEntries", len(entries))
        keyed = write.change.keyed
        if keyed is not None:
            tokens = -write.change.movements[0].delta
            answer = consumption.receipt(write.user_id, write.offer_group, tokens, write.balance_after,
                                         write.expires_at)
            idempotency.complete(keyed.record_key, keyed.request_hash, 200, answer)
            # Only once the record is completed (see store.consumption): a retry now replays it.
            consumption.remove_marker(write.user_id, write.offer_group, keyed.record_key)
        low = _low_balance(write)
        if low is not None:
            events.append(low)
    if events:
        send(stamped(write.change.change_id, events))


def _low_balance(write: GroupWrite) -> Event | None:
    """SPEC 2.7: the consumption whose write took the balance from >= threshold to < threshold. The
    images before and after are those of one conditional write, so no two see the same crossing."""
    if not any(movement.reason == "consume" for movement in write.change.movements):
        return None
    threshold = load_settings().low_balance_thresholds.get(write.offer_group)
    if not crossed_below(threshold, write.balance_before, write.balance_after):
        return None
    return Event("CreditsLow", {
        "userId": write.user_id, "offerGroup": write.offer_group, "balance": write.balance_after,
        "expiresAt": to_iso(write.expires_at), "threshold": threshold,
    })
