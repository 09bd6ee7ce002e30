"""Idempotency-Key records: the first response to a keyed request, written in the same transaction
as the request's effect, so that the record exists if and only if the effect happened.

Keys are scoped per user and route; a record lives 24 hours (DynamoDB TTL on `ttl`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pynamodb.exceptions import UpdateError
from pynamodb.transactions import TransactWrite

from user_credits.errors import IdempotencyKeyReused
from user_credits.store.models import IdempotencyRecord

TTL_SECONDS = 24 * 3600


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    body: Any


def scoped_key(user_id: str, route: str, key: str) -> str:
    return f"{route}#{user_id}#{key}"


def request_hash(body: Any) -> str:
    """The same JSON body, whatever its key order or spacing, hashes the same."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _read(record_key: str) -> IdempotencyRecord | None:
    try:
        record = IdempotencyRecord.get(record_key, consistent_read=True)
    except IdempotencyRecord.DoesNotExist:
        return None
    # DynamoDB deletes expired items lazily (up to days later): an expired record is no record.
    if int(record.ttl) <= int(time.time()):
        return None
    return record


def lookup(record_key: str, body_hash: str) -> StoredResponse | None:
    """The first response for this key, or None; a different body under the same key is refused."""
    record = _read(record_key)
    if record is None:
        return None
    if record.requestHash != body_hash:
        raise IdempotencyKeyReused("this Idempotency-Key was used with a different request body")
    if record.status != "completed" or record.statusCode is None:
        return None
    return StoredResponse(int(record.statusCode), record.response)


@dataclass(frozen=True)
class KeyedCall:
    """A request as its Idempotency-Key sees it: its record's key and body hash (None without a key),
    and the first response if this is a repeat."""

    record_key: str | None = None
    body_hash: str | None = None
    replay: StoredResponse | None = None


def keyed_call(user_id: str, route: str, key: str | None, body: Mapping[str, Any]) -> KeyedCall:
    """Look the key up (one GetItem); a different body under the same key is refused."""
    if key is None:
        return KeyedCall()
    record_key, body_hash = scoped_key(user_id, route, key), request_hash(dict(body))
    return KeyedCall(record_key, body_hash, lookup(record_key, body_hash))


def stage_record(
    tx: TransactWrite, record_key: str, body_hash: str, status_code: int, response: Any, now: datetime,
    ttl_seconds: int = TTL_SECONDS,
) -> None:
    """Add the key's record to the transaction that performs the effect; fails it if the key exists
    (an expired record is no record: DynamoDB's TTL deletes lazily, `lookup` ignores it already)."""
    epoch = int(now.timestamp())
    tx.save(
        IdempotencyRecord(
            record_key, requestHash=body_hash, status="completed", statusCode=status_code, response=response,
            ttl=epoch + ttl_seconds, createdAt=now,
        ),
        condition=IdempotencyRecord.key.does_not_exist() | (IdempotencyRecord.ttl <= epoch),
    )


def complete(record_key: str, body_hash: str, status_code: int, response: Any) -> bool:
    """Mark a record `completed` with its answer (the stream function, for keyed consumes). Only the
    record of that request: a record that expired and was claimed again by another body is left
    alone. False when there was no such record."""
    try:
        IdempotencyRecord(record_key).update(
            actions=[IdempotencyRecord.status.set("completed"), IdempotencyRecord.statusCode.set(status_code),
                     IdempotencyRecord.response.set(response)],
            condition=IdempotencyRecord.requestHash == body_hash,
        )
    except UpdateError as error:
        if error.cause_response_code == "ConditionalCheckFailedException":
            return False
        raise
    return True
