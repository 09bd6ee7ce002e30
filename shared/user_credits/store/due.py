"""Keys of the sparse `byDue` index (see `store.models.DueIndex`): who is due when, spread over shards."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Final

from user_credits.domain.clock import to_iso

# Partition keys of the byDue index: what falls due at one moment spreads over all of them.
DUE_SHARDS: Final = 16


def due_shard(user_id: str, offer_group: str) -> str:
    digest = hashlib.sha256(f"{user_id}#{offer_group}".encode()).digest()
    return f"due#{int.from_bytes(digest[:4], 'big') % DUE_SHARDS:02d}"


def due_shards() -> list[str]:
    return [f"due#{n:02d}" for n in range(DUE_SHARDS)]


def due_sort(user_id: str, offer_group: str, moment: datetime) -> str:
    return f"{to_iso(moment)}#{user_id}#{offer_group}"
