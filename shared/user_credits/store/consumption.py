"""The hot consume path: one conditional write decides, an outbox on the balance item carries the ledger.

Why an outbox: under contention an optimistic read-then-transact loop collapses (every concurrent
writer invalidates the others' reads). Here the decision is ONE conditional UpdateItem, which DynamoDB
serialises per item, so it never conflicts with itself. The same UpdateItem records the change on the
balance item as top-level attributes named by a fresh entry id `eid`:

- `obm_<eid>`: JSON meta (delta, reason, at, Idempotency-Key and its record key and request hash);
- `oba_<eid>`: `if_not_exists(balance, 0) - :t` - right-hand sides are evaluated against the OLD item,
  so this is exactly the balanceAfter of this change, whatever other writers did before or after;
- `obs_<eid>`: the entry's seq, `obx_<eid>`: the group's expiresAt at that instant (or NULL).

A second call, the flush, is one TransactWriteItems that Puts the ledger item(s) under their
deterministic keys (`entry_key(at, group, seq)`, so a re-flush overwrites with identical content),
completes the Idempotency-Key record of keyed entries, and REMOVEs the outbox attributes. Every writer
flushes every entry it sees, so an entry left behind by a crashed or failed flush goes out with the
next writer of the group, with `flush_outbox`, or with the invariant checker. Balance == sum of ledger
deltas + outbox deltas holds at every instant; after a flush the outbox part is empty.

With an Idempotency-Key the decision is instead a TransactWriteItems of [Put the key's record
`in_progress` if absent, the same conditional balance update], so the debit and the record exist
together or not at all: a retry that finds the record knows the debit happened and only has to flush
and replay, and a concurrent duplicate fails on the record's condition and cannot debit twice.

DynamoDB calls on the success path: 2 without a key (UpdateItem, TransactWriteItems); 3 with one
(TransactWriteItems, a consistent GetItem for the entry's balanceAfter, TransactWriteItems). A refusal
is 1 call and writes nothing; refusals are not stored under the key, so a retry after a top-up can
succeed.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from user_credits.domain.clock import from_iso, to_iso
from user_credits.domain.ledger import LedgerEntry
from user_credits.errors import CreditsExpired, IdempotencyKeyReused, InsufficientCredits, ServiceBusy
from user_credits.observability import count, logger
from user_credits.store.idempotency import TTL_SECONDS, StoredResponse
from user_credits.store.ledger import ledger_record
from user_credits.store.models import BalanceRecord, IdempotencyRecord, LedgerRecord, group_sk

T = TypeVar("T")

META, AFTER, SEQ, EXPIRY = "obm_", "oba_", "obs_", "obx_"
OUTBOX_PREFIXES: Final = (META, AFTER, SEQ, EXPIRY)
# Per flush transaction: 2 items per keyed entry + the balance update (<= 41 of the 100 allowed), and
# 80 REMOVE paths, which moto's recursive expression parser still handles. Backlogs go in batches.
MAX_FLUSH_ENTRIES: Final = 20
CONSUME_ROUTE: Final = "consume"

# Only errors that guarantee nothing was applied: a 500 after an unkeyed debit may have debited.
_RETRYABLE_CODES: Final = {
    "TransactionConflictException", "TransactionInProgressException", "ThrottlingException",
    "ProvisionedThroughputExceededException", "RequestLimitExceeded",
}
_RETRYABLE_REASONS: Final = {"TransactionConflict", "ThrottlingError", "ProvisionedThroughputExceeded"}


@dataclass(frozen=True)
class OutboxEntry:
    eid: str
    user_id: str
    offer_group: str
    delta: int
    reason: str
    at: datetime
    balance_after: int
    seq: int
    expires_at: datetime | None
    idempotency_key: str | None = None
    record_key: str | None = None
    request_hash: str | None = None

    def ledger_entry(self) -> LedgerEntry:
        return LedgerEntry(
            user_id=self.user_id, offer_group=self.offer_group, delta=self.delta,
            balance_after=self.balance_after, reason=self.reason, at=self.at, seq=self.seq,
            idempotency_key=self.idempotency_key,
        )


@dataclass(frozen=True)
class Debit:
    """A consumption that happened: what the deciding request reports and bases CreditsLow on."""

    user_id: str
    offer_group: str
    tokens: int
    balance_after: int
    expires_at: datetime | None

    @property
    def balance_before(self) -> int:
        return self.balance_after + self.tokens

    def receipt(self) -> dict[str, Any]:
        return receipt(self.user_id, self.offer_group, self.tokens, self.balance_after, self.expires_at)


def receipt(
    user_id: str, offer_group: str, tokens: int, balance_after: int, expires_at: datetime | None,
) -> dict[str, Any]:
    """The 200 body of a consume. It lives beside the outbox because any flusher of a keyed entry
    must store exactly the response the deciding request gave (or would have given)."""
    return {"userId": user_id, "offerGroup": offer_group, "consumed": tokens, "balance": balance_after,
            "expiresAt": to_iso(expires_at)}


# ----------------------------------------------------------------------------- low-level plumbing

def _client() -> Any:
    # The client of the connection pynamodb uses for this table: one connection pool, one endpoint.
    return BalanceRecord._get_connection().connection.client


def _time(moment: datetime) -> str:
    # The same fixed-width serialization as BalanceRecord.expiresAt, so string order is time order.
    return str(BalanceRecord.expiresAt.serialize(moment))


def _key(user_id: str, offer_group: str) -> dict[str, Any]:
    return {"userId": {"S": user_id}, "sk": {"S": group_sk(offer_group)}}


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _reasons(error: ClientError) -> list[dict[str, Any]]:
    reasons: Any = error.response.get("CancellationReasons") or []
    return [dict(reason) for reason in reasons]


def _retryable(error: ClientError) -> bool:
    if _error_code(error) in _RETRYABLE_CODES:
        return True
    codes = {r.get("Code") for r in _reasons(error)}
    return bool(codes & _RETRYABLE_REASONS) and "ConditionalCheckFailed" not in codes


def _with_backoff(call: Callable[[], T], *, attempts: int = 10, base_delay: float = 0.004) -> T:
    """Retry conflicts and throttling with full-jitter exponential backoff, then give up with 503."""
    for number in range(attempts):
        try:
            return call()
        except ClientError as error:
            if not _retryable(error):
                raise
            count("ConsumeRetries")
            if number == attempts - 1:
                break
            time.sleep(random.uniform(0, min(0.25, base_delay * (2**number))))
    raise ServiceBusy("too much contention on this balance, retry shortly")


# ----------------------------------------------------------------------------- the decision

@dataclass(frozen=True)
class _Update:
    user_id: str
    offer_group: str
    eid: str
    expression: str
    condition: str
    names: dict[str, str]
    values: dict[str, Any]

    def request(self, table: str) -> dict[str, Any]:
        return {
            "TableName": table, "Key": _key(self.user_id, self.offer_group), "UpdateExpression": self.expression,
            "ConditionExpression": self.condition, "ExpressionAttributeNames": self.names,
            "ExpressionAttributeValues": self.values,
        }


def _debit_update(
    user_id: str, offer_group: str, tokens: int, max_overdraft: int, now: datetime,
    idempotency_key: str | None = None, record_key: str | None = None, body_hash: str | None = None,
) -> _Update:
    eid = uuid.uuid4().hex
    meta = {"delta": -tokens, "reason": "consume", "at": to_iso(now), "key": idempotency_key,
            "record": record_key, "hash": body_hash}
    floor = tokens - max_overdraft
    names = {
        "#b": "balance", "#s": "seq", "#t": "itemType", "#g": "offerGroup", "#u": "updatedAt",
        "#e": "expiresAt", "#n": "nextExp", "#m": META + eid, "#a": AFTER + eid, "#q": SEQ + eid,
        "#x": EXPIRY + eid,
    }
    values = {
        ":t": {"N": str(tokens)}, ":z": {"N": "0"}, ":one": {"N": "1"}, ":type": {"S": "balance"},
        ":g": {"S": offer_group}, ":now": {"S": _time(now)}, ":meta": {"S": json.dumps(meta)},
        ":nul": {"NULL": True}, ":floor": {"N": str(floor)},
    }
    expression = (
        "SET #b = if_not_exists(#b, :z) - :t, #s = if_not_exists(#s, :z) + :one, "
        "#t = if_not_exists(#t, :type), #g = if_not_exists(#g, :g), #u = :now, #m = :meta, "
        "#a = if_not_exists(#b, :z) - :t, #q = if_not_exists(#s, :z) + :one, #x = if_not_exists(#e, :nul)"
    )
    # SPEC 2.5: balance - tokens >= -maxOverdraft, counting live lots only. While no lot that held
    # tokens at the last rewrite has expired (nextExp > now), the stored balance is exactly that; once
    # one has, the condition fails and the caller expires it first (`LotsDue`). A missing group has
    # balance 0, which passes exactly when tokens <= maxOverdraft (decided here: it involves no attribute).
    funds = "#b >= :floor OR attribute_not_exists(#b)" if floor <= 0 else "#b >= :floor"
    condition = f"(attribute_not_exists(#n) OR #n > :now) AND ({funds})"
    return _Update(user_id, offer_group, eid, expression, condition, names, values)


class LotsDue(Exception):
    """The consume was refused because a lot that held tokens has expired since the group's last
    rewrite: the stored balance still counts it, so the caller must look at the group's lots."""


def _refusal(old: Mapping[str, Any] | None, now: datetime) -> InsufficientCredits | CreditsExpired | LotsDue:
    """Why a condition failed, from the item as it was (ReturnValuesOnConditionCheckFailure=ALL_OLD)."""
    old = old or {}
    next_expiry = old.get("nextExp", {}).get("S")
    if next_expiry is not None and next_expiry <= _time(now):
        return LotsDue(f"a lot of {old.get('offerGroup', {}).get('S')!r} is due")
    balance = int(old["balance"]["N"]) if "balance" in old else 0
    expires = old.get("expiresAt", {}).get("S")
    if expires is not None and expires <= _time(now):
        return CreditsExpired("the credits of this group have expired", balance=balance)
    return InsufficientCredits("not enough credits in this group", balance=balance)


def _entries(user_id: str, item: Mapping[str, Any]) -> list[OutboxEntry]:
    """The outbox entries on a balance item (DynamoDB JSON), oldest first."""
    offer_group = item["offerGroup"]["S"]
    found = []
    for name, value in item.items():
        if not name.startswith(META):
            continue
        eid = name[len(META):]
        if AFTER + eid not in item or SEQ + eid not in item:
            continue
        meta = json.loads(value["S"])
        expiry = item.get(EXPIRY + eid, {}).get("S")
        found.append(OutboxEntry(
            eid=eid, user_id=user_id, offer_group=offer_group, delta=int(meta["delta"]), reason=meta["reason"],
            at=from_iso(meta["at"]), balance_after=int(item[AFTER + eid]["N"]), seq=int(item[SEQ + eid]["N"]),
            expires_at=BalanceRecord.expiresAt.deserialize(expiry) if expiry else None,
            idempotency_key=meta.get("key"), record_key=meta.get("record"), request_hash=meta.get("hash"),
        ))
    return sorted(found, key=lambda e: e.seq)


def _debit_of(update: _Update, tokens: int, item: Mapping[str, Any]) -> Debit:
    expiry = item.get(EXPIRY + update.eid, {}).get("S")
    return Debit(
        update.user_id, update.offer_group, tokens, int(item[AFTER + update.eid]["N"]),
        BalanceRecord.expiresAt.deserialize(expiry) if expiry else None,
    )


def debit(user_id: str, offer_group: str, tokens: int, max_overdraft: int, now: datetime) -> Debit:
    """Consume without an Idempotency-Key: one conditional UpdateItem, then one flush transaction."""
    update = _debit_update(user_id, offer_group, tokens, max_overdraft, now)
    request = {**update.request(BalanceRecord.Meta.table_name), "ReturnValues": "ALL_NEW",
               "ReturnValuesOnConditionCheckFailure": "ALL_OLD"}

    def decide() -> dict[str, Any]:
        try:
            response: dict[str, Any] = _client().update_item(**request)
        except ClientError as error:
            if _error_code(error) == "ConditionalCheckFailedException":
                old: Any = error.response.get("Item")
                raise _refusal(old, now) from error
            raise
        return response

    item = _with_backoff(decide)["Attributes"]
    _flush_quietly(user_id, item)
    return _debit_of(update, tokens, item)


# ----------------------------------------------------------------------------- keyed decision

@dataclass(frozen=True)
class KeyedOutcome:
    """Either a fresh debit (this request decided) or the stored first response (a replay)."""

    debit: Debit | None = None
    replay: StoredResponse | None = None


def _in_progress_record(record_key: str, body_hash: str, eid: str, now: datetime) -> dict[str, Any]:
    record = IdempotencyRecord(
        record_key, requestHash=body_hash, status="in_progress", ttl=int(now.timestamp()) + TTL_SECONDS,
        createdAt=now,
    )
    item: dict[str, Any] = record.serialize()
    item["entryId"] = {"S": eid}
    return item


def _record_state(item: Mapping[str, Any] | None, body_hash: str) -> str:
    """`absent`, `reused` (another body), `completed` or `in_progress` for a stored record."""
    if not item or int(item.get("ttl", {}).get("N", "0")) <= int(time.time()):
        return "absent"
    if item.get("requestHash", {}).get("S") != body_hash:
        return "reused"
    return "completed" if item.get("status", {}).get("S") == "completed" else "in_progress"


def _stored(item: Mapping[str, Any]) -> StoredResponse:
    return StoredResponse(int(item["statusCode"]["N"]), json.loads(item["response"]["S"]))


def _read_record(record_key: str) -> dict[str, Any] | None:
    response = _client().get_item(TableName=IdempotencyRecord.Meta.table_name, Key={"key": {"S": record_key}},
                                  ConsistentRead=True)
    item: dict[str, Any] | None = response.get("Item")
    return item


def debit_once(
    user_id: str, offer_group: str, tokens: int, max_overdraft: int, now: datetime,
    idempotency_key: str, record_key: str, body_hash: str,
) -> KeyedOutcome:
    """Consume with an Idempotency-Key: the debit and the key's record commit in one transaction."""

    update = _debit_update(user_id, offer_group, tokens, max_overdraft, now, idempotency_key, record_key, body_hash)
    transact = [
        {"Put": {
            "TableName": IdempotencyRecord.Meta.table_name,
            "Item": _in_progress_record(record_key, body_hash, update.eid, now),
            # An expired record is no record (DynamoDB's TTL deletes lazily).
            "ConditionExpression": "attribute_not_exists(#k) OR #ttl <= :epoch",
            "ExpressionAttributeNames": {"#k": "key", "#ttl": "ttl"},
            "ExpressionAttributeValues": {":epoch": {"N": str(int(now.timestamp()))}},
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }},
        {"Update": {**update.request(BalanceRecord.Meta.table_name), "ReturnValuesOnConditionCheckFailure": "ALL_OLD"}},
    ]

    def decide() -> bool:
        """True when this request debited; False when the key's record already existed."""
        try:
            _client().transact_write_items(TransactItems=transact)
        except ClientError as error:
            reasons = _reasons(error)
            if _error_code(error) != "TransactionCanceledException" or len(reasons) != 2:
                raise
            record_reason, balance_reason = reasons[0], reasons[1]
            if record_reason.get("Code") == "ConditionalCheckFailed":
                return False
            if balance_reason.get("Code") == "ConditionalCheckFailed":
                # A refusal stores nothing: a retry after a top-up may succeed (see README).
                raise _refusal(balance_reason.get("Item"), now) from error
            raise
        return True

    if _with_backoff(decide):
        item = _client().get_item(TableName=BalanceRecord.Meta.table_name, Key=_key(user_id, offer_group),
                                  ConsistentRead=True)["Item"]
        if META + update.eid in item:
            _flush_quietly(user_id, item)
            return KeyedOutcome(debit=_debit_of(update, tokens, item))
        # Another writer flushed our entry between our two calls, completing our record as it did:
        # the record holds our response, and this request is still the one that decided.
        record = _read_record(record_key)
        if record is not None and _record_state(record, body_hash) == "completed":
            body = _stored(record).body
            expiry = body.get("expiresAt")
            return KeyedOutcome(debit=Debit(user_id, offer_group, tokens, int(body["balance"]),
                                            from_iso(expiry) if expiry else None))

    for attempt in range(8):
        record = _read_record(record_key)
        state = _record_state(record, body_hash)
        if state == "reused":
            raise IdempotencyKeyReused("this Idempotency-Key was used with a different request body")
        if state == "completed" and record is not None:
            return KeyedOutcome(replay=_stored(record))
        if state == "absent":
            # The record vanished (expired between our calls): decide afresh.
            return debit_once(user_id, offer_group, tokens, max_overdraft, now, idempotency_key, record_key,
                              body_hash)
        # in_progress: the debit committed with the record; its outbox entry completes the record.
        flush_outbox(user_id, offer_group)
        time.sleep(random.uniform(0, 0.005 * (2**attempt)))
    raise ServiceBusy("the first request with this Idempotency-Key is still being recorded, retry shortly")


# ----------------------------------------------------------------------------- the flush

def _flush_items(user_id: str, offer_group: str, entries: list[OutboxEntry]) -> list[dict[str, Any]]:
    ledger_table = LedgerRecord.Meta.table_name
    items: list[dict[str, Any]] = []
    removed: list[str] = []
    for entry in entries:
        # No condition: the key is deterministic and the content immutable, so a second flush of the
        # same entry rewrites the same item instead of failing the whole transaction.
        items.append({"Put": {"TableName": ledger_table, "Item": ledger_record(entry.ledger_entry()).serialize()}})
        if entry.record_key is not None:
            items.append({"Update": _complete_record(entry)})
        removed.extend(prefix + entry.eid for prefix in OUTBOX_PREFIXES)
    names = {f"#r{i}": name for i, name in enumerate(removed)}
    items.append({"Update": {
        "TableName": BalanceRecord.Meta.table_name, "Key": _key(user_id, offer_group),
        "UpdateExpression": "REMOVE " + ", ".join(names),
        # Never create a balance item from nothing: REMOVE on a missing key would.
        "ConditionExpression": "attribute_exists(#sk)",
        "ExpressionAttributeNames": {**names, "#sk": "sk"},
    }})
    return items


def _complete_record(entry: OutboxEntry) -> dict[str, Any]:
    """Mark the keyed entry's record completed with the response the deciding request gave."""
    body = receipt(entry.user_id, entry.offer_group, -entry.delta, entry.balance_after, entry.expires_at)
    created = entry.at
    return {
        "TableName": IdempotencyRecord.Meta.table_name, "Key": {"key": {"S": str(entry.record_key)}},
        # if_not_exists: the record is normally there (it committed with the debit); these keep it
        # readable should TTL have removed it before a very late flush.
        "UpdateExpression": "SET #st = :done, #code = :code, #resp = :resp, #h = if_not_exists(#h, :h), "
                            "#ttl = if_not_exists(#ttl, :ttl), #c = if_not_exists(#c, :c)",
        "ExpressionAttributeNames": {"#st": "status", "#code": "statusCode", "#resp": "response",
                                     "#h": "requestHash", "#ttl": "ttl", "#c": "createdAt"},
        "ExpressionAttributeValues": {
            ":done": {"S": "completed"}, ":code": {"N": "200"}, ":resp": {"S": json.dumps(body)},
            ":h": {"S": entry.request_hash or ""}, ":ttl": {"N": str(int(created.timestamp()) + TTL_SECONDS)},
            ":c": {"S": _time(created)},
        },
    }


def flush_entries(user_id: str, item: Mapping[str, Any]) -> int:
    """Write the outbox entries found on `item` to the ledger in one transaction; returns how many."""
    entries = _entries(user_id, item)[:MAX_FLUSH_ENTRIES]
    if not entries:
        return 0
    _client().transact_write_items(TransactItems=_flush_items(user_id, entries[0].offer_group, entries))
    return len(entries)


def _flush_quietly(user_id: str, item: Mapping[str, Any]) -> None:
    """The consume has happened whatever the flush does: a failed flush leaves the entry in the
    outbox for the next writer, `flush_outbox` or the invariant checker."""
    try:
        flush_entries(user_id, item)
    except (ClientError, BotoCoreError):
        logger.warning("outbox flush failed; the entry stays on the balance item", exc_info=True,
                       extra={"user_id": user_id})
        count("OutboxFlushFailed")


def flush_outbox(user_id: str, offer_group: str, *, rounds: int = 5) -> int:
    """Flush every pending outbox entry of one group (a consistent read, then flush transactions).

    For the expiry sweep, the invariant checker and recovery of keyed requests. Returns how many
    entries were written; conflicts with concurrent writers are retried a few times.
    """
    flushed = 0
    for attempt in range(rounds):
        response = _client().get_item(TableName=BalanceRecord.Meta.table_name, Key=_key(user_id, offer_group),
                                      ConsistentRead=True)
        item = response.get("Item")
        if not item or not _entries(user_id, item):
            return flushed
        try:
            flushed += flush_entries(user_id, item)
        except ClientError as error:
            if not _retryable(error):
                raise
            time.sleep(random.uniform(0, 0.005 * (2**attempt)))
    return flushed


def pending_entries(user_id: str, offer_group: str) -> list[OutboxEntry]:
    """The outbox of one group as it is now (for diagnostics and tests)."""
    item = _client().get_item(TableName=BalanceRecord.Meta.table_name, Key=_key(user_id, offer_group),
                              ConsistentRead=True).get("Item")
    return _entries(user_id, item) if item else []
